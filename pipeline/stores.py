"""The project's inter-process locks: one per SQLite store's first opening, one per registry
alias update.

MLflow creates and migrates a new SQLite store's schema in whichever process opens it first,
without a lock: several processes opening one fresh store at once crash with `duplicate column
name: step` or an alembic `Online migration expected to match one row` error. Every
`python -m pipeline` command opens its store in `tracking.check_store`, under `schema_lock`,
before anything else touches it, and `scripts/run.sh` does the same before `mlflow run`
starts any process: MLflow's own stores are used as they are, with no plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (absolute), or None for another scheme."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(os.path.abspath(os.path.expanduser(path)))


def file_lock(purpose: str, key: str, *, reentrant: bool = True) -> FileLock:
    """The project's one inter-process lock: exclusive among the processes (and threads) of
    this machine; re-entrant in the thread that holds it (`check_store` takes the schema lock,
    then builds the store, whose plugin takes it again) unless `reentrant` is false, when
    every lock object excludes every other. One lock file per purpose and key."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"cifar10-pipeline-{purpose}-{digest}.lock"
    return FileLock(path, is_singleton=reentrant)


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock per SQLite database file among the processes of this machine
    (no-op for other URIs: a tracking server or a database server creates its own schema)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with file_lock("sqlite-schema", str(path)):
        yield
