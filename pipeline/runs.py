"""What each run does: prepare-stats, train, evaluate and compare, training wired to tracking.

The click commands in cli.py parse options into configs and call these; the benchmark calls
`train_model` too. Output for a person goes through `echo` (the CLI passes `click.echo`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import data as datasets
from pipeline import device as devices
from pipeline import engine, model_registry, plots, tracking, training
from pipeline import report as comparison
from pipeline.config import MAX_EPOCHS, ConfigError, TrainConfig, train_run_name
from pipeline.evaluation import load_stats, norm_tags
from pipeline.model import RawImageClassifier, receptive_fields, summary
from pipeline.norms import REGISTRY
from pipeline.records import RESOLVED_SETTINGS
from pipeline.step_runs import PROJECT_DIR, finish_resumed_step

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (then their handlers run as usual)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _log_training_data(dataset: datasets.ArrayDataset) -> None:
    tracking.log_dataset(
        name=dataset.name,
        source=dataset.source,
        digest=dataset.digest,
        context="train",
        images=dataset.train_images,
        labels=dataset.train_labels,
    )


def prepare_stats(data: str, *, echo: Echo = log.info) -> None:
    """Compute per-channel mean/std of the training split; log and cache them."""
    tracking.check_store()
    dataset = datasets.load_dataset(data)
    with tracking.run(run_name="prepare-stats", tags={"step": "prepare-stats"}):
        stats = datasets.cached_stats(dataset)
        tracking.log_params(
            {
                "data": data,
                "mean": ",".join(f"{v:.4f}" for v in stats.mean),
                "std": ",".join(f"{v:.4f}" for v in stats.std),
                "train_images": str(len(dataset.train_labels)),
                "test_images": str(len(dataset.test_labels)),
            }
        )
        _log_training_data(dataset)
        tracking.log_text(stats.to_json(), "stats.json")
        tracking.log_figure(
            plots.class_samples(dataset.train_images, dataset.train_labels, dataset.classes),
            "samples/train_per_class.png",
        )
    echo(f"mean {stats.mean}  std {stats.std}")


def resumed_config(run_id: str, *, given: dict[str, object]) -> TrainConfig:
    """The config `train --resume` continues `run_id` with: the run's own, read from its
    logged params (data included); a setting in `given` that resolves otherwise than the
    run's fails in one line naming each."""
    tracking.check_store()
    params = tracking.run_params(run_id)
    if "norm" not in params:
        raise ConfigError(f"resume: run {run_id} is not a train run (it has no norm param)")
    config = TrainConfig.from_params(params, resume=run_id)
    asked = TrainConfig.from_params(params, **{**given, "resume": run_id})
    differ = [
        f"{name}={given[name]} (the run's: {getattr(config, name)})"
        for name in given
        if getattr(asked, name) != getattr(config, name)
    ]
    if differ:
        raise ConfigError(
            f"resume {run_id} continues with the run's own settings; given otherwise: "
            + ", ".join(differ)
        )
    return config


def train_model(config: TrainConfig, *, echo: Echo = log.info) -> str:
    """Train, log and register one model: prepare, fit, log; returns the run id."""
    # A missing device, or cuda_graphs=on without CUDA, fails before the store is touched.
    device = devices.resolve_device(config.device)
    devices.resolve_cuda_graphs(config.cuda_graphs, device, compile=config.compile)
    tracking.check_store()
    setup = training.prepare_training(config, load_stats=load_stats)
    resume_state = tracking.load_checkpoint(config.resume) if config.resume else None
    run_name = train_run_name(config.norm, config.seed)
    tags = _train_tags(config, setup)
    if config.beyond_budget:
        echo(
            f"epochs={config.epochs} is past the study's {MAX_EPOCHS}-epoch budget: "
            "a measurement, not registered"
        )
    tracking.set_system_metrics_interval(setup.device.type)
    with tracking.run(
        run_name=run_name, tags=tags, resume_run_id=config.resume or None, system_metrics=True
    ) as run_id:
        _log_setup(config, setup)
        echo(
            f"run {run_id}: {config.norm} norm, {setup.parameters:,} parameters, on {setup.device}"
            + (", CUDA graphs" if setup.cuda_graphs else "")
        )
        if "cuda_graphs_note" in tags:
            echo(f"not graphed: {setup.cuda_graphs_note}")
        history = _fit(config, setup, resume_state=resume_state, run_id=run_id, echo=echo)
        final = engine.evaluate(
            setup.model,
            setup.splits.test,
            normalize=setup.splits.normalize,
            autocast_dtype=setup.autocast_dtype,
            tta=config.tta,
        )
        _log_results(setup, history, final, run_name=run_name)
        model_uri = _log_model(config, setup)
        if config.registered_model:
            _register(config, setup, history, final, model_uri=model_uri, run_id=run_id, echo=echo)
    val = f"validation {100 * history[-1].val_acc:.2f}%, " if _has_val(history) else ""
    echo(f"final {val}test accuracy {100 * final.accuracy:.2f}% (run {run_id})")
    if config.resume and finish_resumed_step(run_id, PROJECT_DIR):
        echo("a study's step, finished by the code that started it: the next study reuses it")
    return run_id


def _train_tags(config: TrainConfig, setup: training.TrainingSetup) -> dict[str, str]:
    tags = {"step": "train", **norm_tags(config.norm, str(config.groups))}
    if setup.cuda_graphs_note and setup.device.type == "cuda":
        tags["cuda_graphs_note"] = setup.cuda_graphs_note  # why this run on CUDA is not graphed
    if config.beyond_budget:
        tags["beyond_budget"] = "true"
    return tags


def resolved_recipe(config: TrainConfig, setup: training.TrainingSetup) -> dict[str, str]:
    """What the run trained with, "auto" and 0 resolved: `mlflow run` logs the -P values
    (`optimizer auto`) before this code starts, and a param cannot change afterwards."""
    recipe = {name: str(getattr(config, name)) for name in RESOLVED_SETTINGS}
    precision = devices.precision_name(setup.autocast_dtype)
    return {**recipe, "precision": precision, "device": str(setup.device)}


def _log_setup(config: TrainConfig, setup: training.TrainingSetup) -> None:
    """The run's params (the config's, then what the set-up resolved), data, model and stats."""
    fields = receptive_fields(setup.model)
    tracking.log_params(
        {
            **config.as_params(),
            "num_params": str(setup.parameters),
            "receptive_field": str(fields[-3].receptive_field),  # after C9, before GAP
            "device": str(setup.device),
            "autocast": devices.precision_name(setup.autocast_dtype),
            "cuda_graphs_used": str(setup.cuda_graphs).lower(),
            "cpu_capability": devices.cpu_capability(),
            # Which training images validate: runs on other splits are never paired.
            "val_seed": str(setup.validation.seed) if setup.validation else "",
            "val_digest": setup.validation.digest if setup.validation else "",
            "train_images": str(len(setup.splits.train)),
        }
    )
    tracking.log_resolved(resolved_recipe(config, setup))
    _log_training_data(setup.dataset)
    tracking.log_text(summary(setup.model), "model_summary.txt")
    tracking.log_dict(
        {row.layer: dataclasses.asdict(row) for row in fields}, "receptive_field.json"
    )
    tracking.log_text(setup.stats.to_json(), "stats.json")


def _fit(
    config: TrainConfig,
    setup: training.TrainingSetup,
    *,
    resume_state: dict | None,
    run_id: str,
    echo: Echo,
) -> list[engine.EpochMetrics]:
    """training.fit with each epoch logged as it ends; returns the run's whole history."""

    def on_epoch_end(record: engine.EpochMetrics, state: engine.TrainingState) -> None:
        # An epoch's metrics and its checkpoint are logged together or not at all: Ctrl-C
        # or SIGTERM arriving in between waits until both are written.
        with _signals_deferred():
            tracking.log_epoch(record)
            tracking.log_checkpoint(state.state_dict())
        echo(record.describe(config.epochs))

    started = time.perf_counter()
    try:
        records = training.fit(setup, config, resume_from=resume_state, on_epoch_end=on_epoch_end)
    except FloatingPointError as error:
        # compare reads FAILED runs with this tag, so the report says which diverged.
        tracking.set_tags({tracking.DIVERGED_TAG: str(error)})
        raise
    if records:
        tracking.log_metrics({"train_seconds": time.perf_counter() - started})
    return tracking.metric_history(run_id)


def _log_results(setup, history, final, *, run_name: str) -> None:
    """The curves and the misclassified test images."""
    dataset = setup.dataset
    tracking.log_figure(plots.training_curves(history, title=run_name), "plots/curves.png")
    tracking.log_figure(
        plots.misclassified_grid(
            dataset.test_images,
            final.labels.numpy(),
            final.predictions.numpy(),
            dataset.classes,
            title=f"{run_name}: misclassified test images",
        ),
        "plots/misclassified.png",
    )


def _log_model(config: TrainConfig, setup: training.TrainingSetup) -> str:
    """The served model (raw uint8 images in, logits out); returns its URI."""
    dataset = setup.dataset
    served = RawImageClassifier(
        training.portable_model(setup.model, config),
        mean=setup.stats.mean,
        std=setup.stats.std,
        classes=dataset.classes,
    )
    example = dataset.test_images[:1].transpose(0, 3, 1, 2).copy()  # one image, NCHW uint8
    return tracking.log_model(served, input_example=example, classes=dataset.classes)


def _register(config, setup, history, final, *, model_uri: str, run_id: str, echo: Echo) -> None:
    val = f"validation {history[-1].val_acc:.2%}, " if _has_val(history) else ""
    version = model_registry.register_model(
        model_uri,
        name=config.registered_model,
        run_id=run_id,
        model_description=_model_description(config, setup),
        version_description=(
            f"Accuracy after its {config.epochs} epochs: {val}test "
            f"{final.accuracy:.2%}; seed {config.seed}; trained by run {run_id}."
        ),
        tags={
            **norm_tags(config.norm, str(config.groups)),
            "seed": str(config.seed),
            # The champion is chosen on val_acc; test_acc is reported, never chosen on.
            **({"val_acc": f"{history[-1].val_acc:.4f}"} if _has_val(history) else {}),
            "test_acc": f"{final.accuracy:.4f}",
        },
    )
    champion = model_registry.update_champion(config.registered_model)
    echo(f"registered {config.registered_model} version {version} (champion: version {champion})")


def _model_description(config: TrainConfig, setup: training.TrainingSetup) -> str:
    """What every version of a registered model is: the norm, the recipe, the data, the input."""
    classes = ", ".join(setup.dataset.classes)
    return (
        f"CIFAR-10 classifier with {config.norm} normalization"
        + (f" ({config.groups} groups)" if REGISTRY[config.norm].groups else "")
        + f": the layer plan C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10, "
        f"{setup.parameters:,} parameters. Recipe: {config.epochs} epochs, batch "
        f"{config.batch_size}, one-cycle learning rate peaking at {config.learning_rate} "
        f"({config.optimizer}), label smoothing {config.label_smoothing}, test-time "
        f"augmentation {config.tta}. Data: {setup.dataset.name} ({setup.dataset.source}), "
        f"{len(setup.splits.train):,} training images, "
        f"{len(setup.splits.val) if setup.splits.val is not None else 0:,} held out for "
        "validation. Input: uint8 RGB images N x 3 x 32 x 32, values 0-255 (it normalises "
        f"inside); output: logits over {classes}. The `champion` alias is the version with "
        "the best validation accuracy."
    )


def _has_val(history: list[engine.EpochMetrics]) -> bool:
    return bool(history) and history[-1].val_acc is not None


def compare_runs(
    *,
    parent_run_id: str,
    experiment_name: str,
    filter_string: str,
    group_by: tuple[str, ...],
    echo: Echo = log.info,
) -> str:
    """Side-by-side report of the norms: tables, overlay plots, findings, report.md; returns
    the id of the run the report is logged to."""
    keys = group_by
    tracking.check_store()
    runs = tracking.study_runs(
        parent_run_id=parent_run_id,
        experiment_name=experiment_name,
        filter_string=filter_string,
    )
    source = (
        f"children of parent run `{parent_run_id}`"
        if parent_run_id
        else f"experiment `{experiment_name}`"
    )
    if filter_string:
        source += f" matching `{filter_string}`"
    with tracking.run(run_name="compare", tags={"step": "compare"}) as run_id:
        tracking.log_params(
            {
                "parent_run_id": parent_run_id,
                "experiment_name": experiment_name,
                "filter_string": filter_string,
                "group_by": ",".join(keys),
            }
        )
        study_data = _load_study(runs, source=source, group_by=keys)
        if study_data.train.empty:
            diverged = len(study_data.diverged)
            raise tracking.TrackingError(
                f"no finished train runs to compare in {source}"
                + (f" ({diverged} diverged)" if diverged else "")
            )
        target = parent_run_id or run_id
        with tempfile.TemporaryDirectory() as directory:
            comparison.write_report(study_data, Path(directory))
            tracking.log_artifacts(directory, "comparison", run_id=target)
        # The same tables as MLflow tables: the UI shows and compares them.
        tables = {
            "norms": comparison.norm_table(study_data),
            "runs": comparison.run_summary(study_data),
        }
        if keys:
            tables["levers"] = comparison.lever_table(study_data)
        robustness = comparison.robustness_table(study_data)
        if not robustness.empty:
            tables["robustness"] = robustness
        for name, frame in tables.items():
            tracking.log_table(frame, f"comparison/tables/{name}.json", run_id=target)
        tracking.set_tags({"report_run_id": target})
    _echo_comparison(study_data, keys, echo=echo)
    echo(f"report: runs:/{target}/comparison/report.md (compare run {run_id})")
    return target


def _echo_comparison(study_data: comparison.Study, keys: tuple[str, ...], *, echo: Echo) -> None:
    """The norms' accuracies, the findings and (with group_by) the lever table, for a person."""
    table = comparison.norm_table(study_data)
    for row in table.itertuples(index=False):
        val = comparison.percent(row.final_val_acc_mean, row.final_val_acc_se)
        echo(
            f"{row.label:<6} {row.runs} runs  final val acc {val or '-'}%  test acc "
            f"{comparison.percent(row.final_test_acc_mean, row.final_test_acc_se)}% "
            "(mean ± SE)"
        )
    for note in [*comparison.findings(table), *comparison.divergence_notes(study_data)]:
        echo(f"- {note}")
    robustness = comparison.robustness_table(study_data)
    if not robustness.empty:
        echo(comparison.markdown_table(comparison.readable_robustness_table(robustness)))
        for note in comparison.robustness_findings(study_data):
            echo(f"- {note}")
    if keys:
        levers = comparison.readable_lever_table(comparison.lever_table(study_data), keys)
        echo(comparison.markdown_table(levers))
        note = comparison.set_aside_note(study_data)
        if note:
            echo(f"- {note}")


def _load_study(runs, *, source: str, group_by: tuple[str, ...] = ()) -> comparison.Study:
    """Fetch what the report needs: the runs as its records (`runs`: study_runs' DataFrame),
    epoch histories, misclassified grids, evaluation.json."""
    runs = tracking.run_records(runs)
    train_ids = list(comparison.step_runs(runs, "train")["run_id"])
    histories = {run_id: tracking.metric_history(run_id) for run_id in train_ids}
    grids = {}
    for run_id in train_ids:
        try:
            grids[run_id] = tracking.download_artifact(f"runs:/{run_id}/plots/misclassified.png")
        except tracking.TrackingError as error:
            log.warning("run %s: no misclassified grid (%s)", run_id, error)
    evaluations = {}
    for run_id in comparison.step_runs(runs, "evaluate")["run_id"]:
        try:
            path = tracking.download_artifact(f"runs:/{run_id}/evaluation.json")
        except tracking.TrackingError as error:
            log.warning("run %s: no evaluation.json (%s)", run_id, error)
            continue
        evaluations[run_id] = json.loads(path.read_text())
    return comparison.build_study(
        runs,
        histories,
        evaluations=evaluations,
        misclassified=grids,
        source=source,
        group_by=group_by,
    )
