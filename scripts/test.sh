#!/usr/bin/env bash
# Install the package with its dev tools, then lint (ruff, the import layers) and run the whole
# test suite, slow tests (processes, servers, browsers) included. The fast loop alone: python -m pytest
# Usage: bash scripts/test.sh [pytest args]     (e.g. -m slow, -k registry)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
lint-imports  # the package's layers (pyproject.toml): an upward import or a cycle fails here
exec "$PYTHON" -m pytest -m "slow or not slow" "$@"
