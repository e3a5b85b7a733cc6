#!/usr/bin/env bash
# Install the package, then run the study with MLflow in this Python environment.
# Tracking goes to the embedded default (sqlite:///mlflow.db here, artifacts under ./mlruns)
# unless MLFLOW_TRACKING_URI points elsewhere.
# Usage: bash scripts/run.sh [mlflow run options]   (e.g. -P norm=layer -P data=PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
# The study's runs go to one named experiment (MLFLOW_EXPERIMENT_NAME, or an --experiment-name
# among the options, overrides it).
export MLFLOW_EXPERIMENT_NAME="${MLFLOW_EXPERIMENT_NAME:-cifar10-normalization}"
# Create the store (under the project's lock) and the experiment before `mlflow run` starts any
# process: MLflow's first writers would race on a new SQLite store's schema.
"$PYTHON" -c "from pipeline import tracking; tracking.check_store()"
exec "$PYTHON" -m mlflow run . --env-manager local "$@"
