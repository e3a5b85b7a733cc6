"""The only module that talks to MLflow: runs, params, metrics, models and the registry."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.engine import EpochMetrics

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CHAMPION = "champion"


class TrackingError(RuntimeError):
    """The tracking store or registry refused an operation; the message says which."""


class RunInterrupted(BaseException):
    """Raised by the SIGTERM handler so a terminated run ends KILLED, like Ctrl-C."""


# --------------------------------------------------------------------------- runs


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def check_store() -> None:
    """Fail fast, naming the URI, when the tracking store cannot be reached."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # A dead server would otherwise cost minutes of retries on the first call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {uri} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from None


@contextlib.contextmanager
def run(
    *,
    run_name: str,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """Start (or, under `mlflow run`, attach to) a run and always end it with the right status:
    FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM. Yields the run id.

    With `resume_run_id` the given run is reopened; a fresh run that `mlflow run` created for
    this invocation is tagged as a pointer to it and left empty.
    """
    if parent_run_id:
        tags = {**(tags or {}), "mlflow.parentRunId": parent_run_id}
    attached = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        if attached and attached != resume_run_id:
            MlflowClient().set_tag(attached, "resumed_run_id", resume_run_id)
        active = mlflow.start_run(run_id=resume_run_id)
    else:
        active = mlflow.start_run(
            run_name=None if attached else run_name, nested=nested, tags=tags or None
        )
        if attached and run_name:
            mlflow.set_tags({"mlflow.runName": run_name, **(tags or {})})
    status = RunStatus.FAILED
    try:
        yield active.info.run_id
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, RunInterrupted):
        status = RunStatus.KILLED
        raise
    finally:
        mlflow.end_run(RunStatus.to_string(status))


def end_orphaned_run(status: str = "FAILED") -> None:
    """End the run `mlflow run` created for us when we fail before attaching to it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    with contextlib.suppress(Exception):
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)


def log_params(params: dict[str, str]) -> None:
    """Log params, skipping those `mlflow run` already logged (MLflow forbids re-logging a key
    with a differently formatted value, so the string `mlflow run` wrote is kept)."""
    run_id = _active_run_id()
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_epoch(record: EpochMetrics) -> None:
    """All of one epoch's metrics in one request, at `step=epoch`."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, record.epoch) for k, v in record.metrics().items()]
    MlflowClient().log_batch(_active_run_id(), metrics=metrics, synchronous=True)


def metric_history(run_id: str) -> list[EpochMetrics]:
    """The run's per-epoch records, rebuilt from its logged metrics (complete after a resume)."""
    client = MlflowClient()
    names = [f.name for f in dataclasses.fields(EpochMetrics) if f.name != "epoch"]
    by_step: dict[int, dict[str, float]] = {}
    for name in names:
        for metric in client.get_metric_history(run_id, name):
            by_step.setdefault(metric.step, {})[name] = metric.value
    return [
        EpochMetrics(epoch=step, **values)
        for step, values in sorted(by_step.items())
        if len(values) == len(names)
    ]


def log_metrics(metrics: dict[str, float], *, step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)


def log_text(text: str, path: str) -> None:
    mlflow.log_text(text, path)


def log_dict(payload: dict, path: str) -> None:
    mlflow.log_dict(payload, path)


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(local_path), artifact_path)


def log_dataset(*, name: str, source: str, digest: str, context: str) -> None:
    """Record which data the run used (the MLflow UI's Datasets column)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        dataset_source = resolve_dataset_source(str(Path(source).expanduser().resolve()))
    except Exception:  # an unknown scheme: fall back to an opaque local path
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        dataset_source = HTTPDatasetSource(url=f"file://{source}")
    dataset = MetaDataset(source=dataset_source, name=name, digest=digest[:8])
    mlflow.log_input(dataset, context=context)


def download_artifact(uri: str) -> Path:
    """Download an artifact (`runs:/<id>/stats.json`, ...) to a temporary directory."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as error:
        raise TrackingError(f"cannot download {uri}: {error.message}") from None


def _active_run_id() -> str:
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no active MLflow run")
    return active.info.run_id


# --------------------------------------------------------------------------- models


def log_model(model, *, input_example) -> str:
    """Log `model` (in eval mode, exported with torch.export) and return its model URI."""
    model.eval()  # the exported graph fixes the mode: BatchNorm must use its running stats
    info = mlflow.pytorch.log_model(model, name=MODEL_ARTIFACT, input_example=input_example)
    return info.model_uri


def log_checkpoint(state: dict, *, path: str = "checkpoint/last.pt") -> None:
    import torch

    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory) / Path(path).name
        torch.save(state, local)
        mlflow.log_artifact(str(local), str(Path(path).parent))


def load_checkpoint(run_id: str, *, path: str = "checkpoint/last.pt") -> dict:
    import torch

    local = download_artifact(f"runs:/{run_id}/{path}")
    # weights_only: a checkpoint from a shared store must not be able to run code when loaded.
    return torch.load(local, map_location="cpu", weights_only=True)


def load_model(model_uri: str, *, device: str = "cpu"):
    try:
        return mlflow.pytorch.load_model(model_uri, map_location=device)
    except MlflowException as error:
        raise TrackingError(f"cannot load model {model_uri}: {error.message}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a model URI points: its training run, and the registry version when there is one."""

    run_id: str
    name: str | None = None
    version: str | None = None


def resolve_model_uri(model_uri: str) -> ModelSource:
    """Resolve `runs:/<id>/model`, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    client = MlflowClient()
    try:
        if model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/") :].split("/", 1)[0]
            client.get_run(run_id)
            return ModelSource(run_id=run_id)
        reference = model_uri[len("models:/") :].rstrip("/")
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in reference:
            name, number = reference.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise TrackingError(
                f"model_uri {model_uri!r} needs a version or an alias: "
                f"models:/{reference}/<version> or models:/{reference}@<alias>"
            )
    except MlflowException as error:
        message = error.message.splitlines()[0] if error.message else str(error)
        raise TrackingError(f"model_uri {model_uri!r} does not resolve: {message}") from None
    if not version.run_id:
        raise TrackingError(f"model_uri {model_uri!r} has no source run")
    return ModelSource(run_id=version.run_id, name=version.name, version=str(version.version))


def run_params(run_id: str) -> dict[str, str]:
    return dict(MlflowClient().get_run(run_id).data.params)


# --------------------------------------------------------------------------- registry


def register_model(model_uri: str, *, name: str, run_id: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version of `name` and return the version number.

    The version is created only after the model is fully logged, so the registry never
    holds a version without its files.
    """
    try:
        version = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as error:
        raise TrackingError(f"cannot register model {name!r}: {error.message}") from None
    client = MlflowClient()
    client.set_model_version_tag(name, version.version, "run_id", run_id)
    return str(version.version)


@contextlib.contextmanager
def _registry_lock(name: str) -> Iterator[None]:
    """Serialise champion updates of one model among processes on this machine."""
    key = hashlib.sha256(f"{tracking_uri()}|{name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"cifar10-pipeline-registry-{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version_score(version) -> float:
    try:
        return float(version.tags.get("test_acc", "nan"))
    except ValueError:
        return float("nan")


def update_champion(name: str) -> str | None:
    """Point the `champion` alias at the version with the best `test_acc` tag; return it.

    The best version is recomputed from every version under a lock, so two runs finishing at
    once cannot leave the alias on the worse one, and a stale writer is corrected by the next.
    """
    client = MlflowClient()
    with _registry_lock(name):
        versions = client.search_model_versions(f"name = '{name}'")
        scored = [(v, _version_score(v)) for v in versions]
        scored = [(v, s) for v, s in scored if s == s]
        if not scored:
            return None
        # Highest accuracy wins; on a tie the older version keeps the title.
        best, _ = max(scored, key=lambda item: (item[1], -int(item[0].version)))
        try:
            current = client.get_model_version_by_alias(name, CHAMPION).version
        except MlflowException:
            current = None
        if str(current) != str(best.version):
            client.set_registered_model_alias(name, CHAMPION, best.version)
            log.info("%s@%s -> version %s", name, CHAMPION, best.version)
        return str(best.version)


def promote(name: str, version: str, *, alias: str = CHAMPION) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise TrackingError(f"cannot promote {name} version {version}: {error.message}") from None


def registry_rows(name: str | None = None) -> list[dict[str, str]]:
    """One row per model version: name, version, aliases, tags the pipeline sets, run id."""
    client = MlflowClient()
    try:
        models = [client.get_registered_model(name)] if name else client.search_registered_models()
    except MlflowException as error:
        raise TrackingError(f"cannot read registered model {name!r}: {error.message}") from None
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            rows.append(
                {
                    "name": model.name,
                    "version": str(version.version),
                    "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                    "norm": version.tags.get("norm", ""),
                    "groups": version.tags.get("groups", ""),
                    "seed": version.tags.get("seed", ""),
                    "test_acc": version.tags.get("test_acc", ""),
                    "run_id": version.run_id or "",
                    "status": version.status,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def dumps(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
