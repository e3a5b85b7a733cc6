"""The only module that talks to MLflow: runs, params, metrics, models and the registry."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.data
import mlflow.pytorch
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import stores
from pipeline.config import DEFAULT_EXPERIMENT
from pipeline.engine import EpochMetrics
from pipeline.executors import NODE_ENV, NODE_TAG
from pipeline.records import RESOLVED_PREFIX, RunRecord

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


class TrackingError(RuntimeError):
    """The tracking store or registry refused an operation; the message says which."""


class RunInterrupted(BaseException):
    """Raised by the SIGTERM handler so a terminated run ends KILLED, like Ctrl-C."""


# --------------------------------------------------------------------------- runs


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def store_is_local() -> bool:
    """Whether the store is a file on this machine (SQLite or a directory), not a server."""
    scheme = urllib.parse.urlparse(tracking_uri()).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # C:\\mlruns on Windows


def check_store() -> None:
    """Fail fast, naming the URI, when the tracking store cannot be reached."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # A dead server would otherwise cost minutes of retries on the first call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        # The first process to open a new SQLite store creates its schema; MLflow does not
        # lock that, so processes starting at once on a fresh store would crash.
        with stores.schema_lock(uri):
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:
        status = error.get_http_status_code() if isinstance(error, MlflowException) else None
        if status in (401, 403):  # a server in basic-auth mode (`--app-name basic-auth`)
            raise TrackingError(
                f"the MLflow tracking server at {uri} refused the request (HTTP {status}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with access"
            ) from None
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {uri} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''})"
        ) from None
    use_default_experiment()


def use_default_experiment() -> None:
    """Runs go to the experiment `DEFAULT_EXPERIMENT`, created if missing, unless the
    environment names one (MLFLOW_EXPERIMENT_NAME or _ID) or `mlflow run` created the run
    (MLFLOW_RUN_ID: its experiment is the one `--experiment-name` chose).

    The choice is made the way a user makes it, through MLFLOW_EXPERIMENT_NAME (which the
    steps a study starts inherit), not through `mlflow.set_experiment`, whose choice would
    outlive this command in a process that runs several (the tests)."""
    if any(os.environ.get(key) for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")):
        return
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name)
        except MlflowException:
            # Another process created it between our lookup and our create.
            if client.get_experiment_by_name(name) is None:
                raise
    os.environ["MLFLOW_EXPERIMENT_NAME"] = name


# MLflow's own switch for system metrics (CPU, memory, disk, network; the GPU with nvidia-ml-py):
# a training run logs them unless it is "false". Their sampling interval, unless set: 10 s on
# the CPU (about 150 samples over a 20-epoch run there), 2 s on a GPU, where a run is shorter.
SYSTEM_METRICS_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
SYSTEM_METRICS_INTERVAL = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"


def system_metrics_wanted() -> bool:
    """Whether a training run logs system metrics: yes unless the switch says false, or
    psutil, which MLflow samples them with, is missing (then a warning says so)."""
    value = os.environ.get(SYSTEM_METRICS_SWITCH, "true").strip().lower()
    if value in ("false", "0", "no", "off"):
        return False
    try:
        import psutil  # noqa: F401
    except ImportError:
        log.warning("no system metrics: psutil is not installed (pip install psutil)")
        return False
    return True


def set_system_metrics_interval(device_type: str) -> None:
    """The sampling interval for `device_type`, unless the environment sets one."""
    if not os.environ.get(SYSTEM_METRICS_INTERVAL):
        mlflow.set_system_metrics_sampling_interval(2 if device_type == "cuda" else 10)


@contextlib.contextmanager
def run(
    *,
    run_name: str,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[str]:
    """Start (or, under `mlflow run`, attach to) a run and always end it with the right status:
    FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM. Yields the run id.

    With `resume_run_id` the given run is reopened; a fresh run that `mlflow run` created for
    this invocation is tagged as a pointer to it and left empty. With `system_metrics`, MLflow
    samples the machine's load into the run while it is open (unless `system_metrics_wanted`
    says no).
    """
    log_system_metrics = system_metrics and system_metrics_wanted()
    if parent_run_id:
        tags = {**(tags or {}), "mlflow.parentRunId": parent_run_id}
    if os.environ.get(NODE_ENV):  # a workflow's step on one machine of several (Ray)
        tags = {**(tags or {}), NODE_TAG: os.environ[NODE_ENV]}
    attached = os.environ.get("MLFLOW_RUN_ID")
    try:
        if resume_run_id:
            if attached and attached != resume_run_id:
                MlflowClient().set_tag(attached, "resumed_run_id", resume_run_id)
            active = mlflow.start_run(run_id=resume_run_id, log_system_metrics=log_system_metrics)
        else:
            active = mlflow.start_run(
                run_name=None if attached else run_name,
                nested=nested,
                tags=tags or None,
                log_system_metrics=log_system_metrics,
            )
    except BaseException:
        # A run created before start_run failed (its monitor, say) must not stay RUNNING.
        if mlflow.active_run() is not None:
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    if attached and not resume_run_id:
        attached_tags = dict(tags or {})
        # A workflow's step keeps the name its parent gave it (a sweep's trial names its
        # overrides); a run that `mlflow run` created alone gets this command's name.
        if run_name and "mlflow.parentRunId" not in active.data.tags:
            attached_tags["mlflow.runName"] = run_name
        mlflow.set_tags(attached_tags)
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


def log_resolved(values: dict[str, str]) -> None:
    """`resolved.<name>` params: what a setting logged as given (`optimizer auto`, which
    `mlflow run` logs before our code starts and which cannot change) resolved to."""
    log_params({f"{RESOLVED_PREFIX}{name}": value for name, value in values.items()})


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_epoch(record: EpochMetrics) -> None:
    """All of one epoch's metrics in one request, at `step=epoch`."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, _metric_value(v), now, record.epoch) for k, v in record.metrics().items()]
    MlflowClient().log_batch(_active_run_id(), metrics=metrics, synchronous=True)


def metric_history(run_id: str) -> list[EpochMetrics]:
    """The run's per-epoch records, rebuilt from its logged metrics (complete after a resume);
    the validation metrics where the run logged them."""
    client = MlflowClient()
    fields = [f for f in dataclasses.fields(EpochMetrics) if f.name != "epoch"]
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    by_step: dict[int, dict[str, float]] = {}
    for field in fields:
        for metric in client.get_metric_history(run_id, field.name):
            by_step.setdefault(metric.step, {})[field.name] = metric.value
    return [
        EpochMetrics(epoch=step, **values)
        for step, values in sorted(by_step.items())
        if required <= set(values)
    ]


def log_metrics(metrics: dict[str, float], *, step: int | None = None) -> None:
    mlflow.log_metrics({k: _metric_value(v) for k, v in metrics.items()}, step=step)


def _metric_value(value: float) -> float:
    """`value` to float32's 7 significant digits: the digits past them are float32 rounding
    error, which the UI would print (an accuracy of 0.3 shows as 0.30000001192092896)."""
    return float(f"{float(value):.7g}")


def log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)


def log_text(text: str, path: str) -> None:
    mlflow.log_text(text, path)


def log_dict(payload: dict, path: str) -> None:
    mlflow.log_dict(payload, path)


def log_dataset(
    *, name: str, source: str, digest: str, context: str, images=None, labels=None
) -> None:
    """Record which data the run used (the MLflow UI's Datasets column): `mlflow.data.from_numpy`
    over the split's `images` and `labels` (their shape and type become the dataset's schema
    and profile), named and digested by the source's content, which `source` points at."""
    import numpy as np

    if images is None:
        images = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_numpy(
            images,
            targets=labels,
            source=str(Path(source).expanduser().resolve()),
            name=name,
            digest=digest[:8],
        )
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        # A tracking server inserts a new dataset without a lock: runs logging the same one at
        # once can lose that race (a unique-key violation). The dataset exists now: log again.
        if "duplicate key" not in error.message and "UNIQUE constraint" not in error.message:
            raise
        mlflow.log_input(dataset, context=context)


def download_artifact(uri: str) -> Path:
    """Download an artifact (`runs:/<id>/stats.json`, ...) to a temporary directory.

    These are small files fetched one after another (compare fetches two per run): MLflow's
    per-download progress bars are turned off unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is set.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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


def log_model(model, *, input_example, classes: tuple[str, ...] = ()) -> str:
    """Log `model` (a `model.RawImageClassifier`, in eval mode) and return its model URI.

    Pickled with its classes by value (pipeline.model, .config and .norms go into the pickle),
    so loading it needs torch and MLflow, not this package. An explicit signature: uint8
    `(-1, 3, 32, 32)` in, float32 logits `(-1, classes)` out, any batch size; the class names
    in the model's metadata.
    """
    import cloudpickle
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline import config as config_module
    from pipeline import model as model_module
    from pipeline import norms as norms_module

    model.eval()  # BatchNorm must use its running stats
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, 32, 32))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes) or 10))]),
    )
    metadata = {
        "input": "uint8 RGB images, N x 3 x 32 x 32 (NCHW), values 0-255",
        "output": "class logits, N x classes; argmax is the predicted class",
        "classes": list(classes),
    }
    # Naming the requirements skips MLflow's inference, which spends ~10 s in a subprocess.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    modules = (model_module, config_module, norms_module)
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            input_example=input_example,
            signature=signature,
            metadata=metadata,
            serialization_format="pickle",
            pip_requirements=requirements,
        )
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)
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
    try:
        return dict(MlflowClient().get_run(run_id).data.params)
    except MlflowException as error:
        raise TrackingError(f"cannot read run {run_id!r}: {error.message}") from None


def describe_run(description: str) -> None:
    """The active run's description (the MLflow UI's *Description*, tag mlflow.note.content)."""
    mlflow.set_tag("mlflow.note.content", description)


def run_metrics(run_id: str) -> dict[str, float]:
    """The run's latest value of each metric (`test_acc`, `train_acc`, ...)."""
    try:
        return dict(MlflowClient().get_run(run_id).data.metrics)
    except MlflowException as error:
        raise TrackingError(f"cannot read run {run_id!r}: {error.message}") from None


# --------------------------------------------------------------------------- comparisons


def study_runs(*, parent_run_id: str = "", experiment_name: str = "", filter_string: str = ""):
    """FINISHED runs of a study as a pandas DataFrame (`mlflow.search_runs` columns), and the
    FAILED train runs that diverged (tagged `diverged`), which the report names.

    Either the children of `parent_run_id` (reused-step pointers replaced by the runs they
    point at) or the runs of `experiment_name` (one, or several separated by commas: a screen
    whose lever runs live apart from the study they pair with) matching `filter_string`.
    """
    client = MlflowClient()
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException:
            raise TrackingError(f"parent_run_id {parent_run_id!r} is not a run") from None
        experiment_ids = [parent.info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        if filter_string:
            query = f"{query} and {filter_string}"
    elif experiment_name:
        experiment_ids, query = [], filter_string
        for name in (part.strip() for part in experiment_name.split(",")):
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise TrackingError(f"experiment_name {name!r} does not exist")
            experiment_ids.append(experiment.experiment_id)
    else:
        raise TrackingError("compare needs a parent_run_id, or an experiment_name (and filter)")
    runs = _search(experiment_ids, query)
    if REUSED_TAG_COLUMN in runs.columns:
        pointed = runs[REUSED_TAG_COLUMN].dropna()
        pointed = [run_id for run_id in pointed if run_id]
        if pointed:
            listed = ", ".join(f"'{run_id}'" for run_id in sorted(set(pointed)))
            originals = _search(experiment_ids, f"attributes.run_id IN ({listed})")
            runs = runs[runs[REUSED_TAG_COLUMN].fillna("") == ""]
            runs = runs.drop(columns=[REUSED_TAG_COLUMN])
            runs = _concat(runs, originals)
    finished = runs["status"] == "FINISHED"
    if DIVERGED_COLUMN in runs.columns:  # a diverged training is reported, never averaged
        finished |= (runs["status"] == "FAILED") & runs[DIVERGED_COLUMN].fillna("").ne("")
    runs = runs[finished].drop_duplicates("run_id")
    return runs.reset_index(drop=True)


DIVERGED_TAG = "diverged"  # on a train run that stopped on a non-finite loss: the error
DIVERGED_COLUMN = f"tags.{DIVERGED_TAG}"


REUSED_TAG = "reused_run_id"  # set on a study's pointer to a finished run it reused
REUSED_TAG_COLUMN = f"tags.{REUSED_TAG}"


def _search(experiment_ids: list[str], query: str):
    try:
        return mlflow.search_runs(
            experiment_ids=experiment_ids, filter_string=query, output_format="pandas"
        )
    except MlflowException as error:
        message = error.message.splitlines()[0] if error.message else str(error)
        raise TrackingError(f"cannot search runs with {query!r}: {message}") from None


def _concat(first, second):
    import pandas as pd

    frames = [frame for frame in (first, second) if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else first


def run_records(runs) -> list[RunRecord]:
    """`mlflow.search_runs`' rows (study_runs' DataFrame) as the report's plain records
    (records.RunRecord): params, metrics and tags without their column prefixes, values that
    a run did not log (NaN, None) left out, its name, status and start and end times."""
    import pandas as pd

    def logged(row, prefix: str) -> dict:
        return {
            name.removeprefix(prefix): value
            for name, value in row.items()
            if name.startswith(prefix) and value is not None and not pd.isna(value)
        }

    def moment(value):
        return None if value is None or pd.isna(value) else pd.Timestamp(value).to_pydatetime()

    records = []
    for row in runs.to_dict("records"):
        tags = logged(row, "tags.")
        records.append(
            RunRecord(
                run_id=row["run_id"],
                run_name=tags.get("mlflow.runName", ""),
                status=row.get("status") or "",
                params=logged(row, "params."),
                metrics={name: float(value) for name, value in logged(row, "metrics.").items()},
                tags=tags,
                start_time=moment(row.get("start_time")),
                end_time=moment(row.get("end_time")),
            )
        )
    return records


def log_table(frame, artifact_file: str, *, run_id: str) -> None:
    """A DataFrame as an MLflow table (`mlflow.log_table`): the run's artifact `artifact_file`
    (.json), shown as a table in the UI's artifact view and comparable across runs."""
    mlflow.log_table(data=frame, artifact_file=artifact_file, run_id=run_id)


def log_artifacts(local_dir: str | Path, artifact_path: str, *, run_id: str) -> None:
    """Log a directory into `run_id` (which may be another run than the active one)."""
    MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)
