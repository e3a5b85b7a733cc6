"""SQLite tracking stores whose first schema creation is serialised among processes.

MLflow creates and migrates a new SQLite store's schema in whichever process opens it first,
without a lock: several processes opening one fresh store at once crash with `duplicate column
name: step` or an alembic `Online migration expected to match one row` error (three of four, in
this project's test). `schema_lock` holds an inter-process file lock around that first opening;
`tracking.check_store` uses it for every `python -m pipeline` command.

`tracking_store` and `registry_store` are MLflow store plugins (entry point groups
`mlflow.tracking_store` and `mlflow.model_registry_store`, scheme `sqlite`) that build MLflow's
own SQLite stores under the same lock, so that `mlflow run` processes, which open the store
before any of the project's code runs, are serialised too. MLflow imports this module while it
imports itself: keep it free of heavy imports and of MLflow imports at module level.
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


def tracking_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's SQLite tracking store, built under `schema_lock` (an MLflow store plugin)."""
    from mlflow.tracking._tracking_service import utils  # noqa: TID251 (an MLflow plugin)

    with schema_lock(store_uri):
        return utils._get_sqlalchemy_store(store_uri, artifact_uri)


def registry_store(store_uri: str, tracking_uri: str | None = None):
    """MLflow's SQLite model registry store, built under `schema_lock` (an MLflow plugin)."""
    from mlflow.tracking._model_registry import utils  # noqa: TID251 (an MLflow plugin)

    with schema_lock(store_uri):
        return utils._get_sqlalchemy_store(store_uri)
