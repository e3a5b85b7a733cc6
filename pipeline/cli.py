"""Command line: click commands that build configs and wire the engine to tracking.

`python -m pipeline COMMAND --help` lists each command's options; the MLproject entry points
call these commands with the same parameter names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
import torch

from pipeline import compare as comparison
from pipeline import data as datasets
from pipeline import engine, plots, tracking, training, workflow
from pipeline.config import (
    MAX_EPOCHS,
    NORMS,
    REGISTERED_MODEL,
    TTA_BEFORE_PARAM,
    TTA_MODES,
    ConfigError,
    EvalConfig,
    TrainConfig,
    parse_norms,
)
from pipeline.data import DataError, DatasetStats
from pipeline.model import build_model, receptive_fields, summary

log = logging.getLogger("pipeline")

# Errors a user can act on: one line, no traceback, non-zero exit.
USER_ERRORS = (ConfigError, DataError, tracking.TrackingError, FloatingPointError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


def _on_sigterm(signum, frame) -> None:
    raise tracking.RunInterrupted(f"received signal {signum}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """CIFAR-10 normalization study (batch / group / layer) tracked in MLflow."""
    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (usage) or 1."""
    try:
        cli.main(prog_name="python -m pipeline", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as error:
        _fail(error.format_message(), code=2)
    except USER_ERRORS as error:
        _fail(str(error), code=1)
    except (KeyboardInterrupt, click.exceptions.Abort, tracking.RunInterrupted):
        _fail("interrupted; the run was ended KILLED", code=130, status="KILLED")
    except Exception as error:
        if os.environ.get("PIPELINE_TRACEBACK"):
            traceback.print_exc()
        _fail(
            f"{type(error).__name__}: {error} (set PIPELINE_TRACEBACK=1 for the traceback)", code=1
        )


def _fail(message: str, *, code: int, status: str = "FAILED") -> None:
    tracking.end_orphaned_run(status)
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first_line}", err=True)
    sys.exit(code)


# --------------------------------------------------------------------------- shared options

_DEFAULTS = TrainConfig()


def tta_option(default: str, what: str):
    return click.option(
        "--tta",
        default=default,
        help=f"Test-time augmentation: {', '.join(TTA_MODES)}. {what}.",
    )


def data_option(function):
    return click.option(
        "--data",
        default=_DEFAULTS.data,
        help="CIFAR-10 directory (downloaded there when missing), image-folder tree or .tar.gz.",
    )(function)


def stats_option(function):
    return click.option(
        "--stats",
        default="",
        help="stats.json path or runs:/<id>/stats.json; empty computes (and caches) them.",
    )(function)


def device_option(function):
    return click.option(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda or mps.",
    )(function)


def _load_stats(spec: str, dataset: datasets.ArrayDataset) -> DatasetStats:
    """Stats from a path, from a run's artifact (runs:/<id>/stats.json) or computed."""
    if spec.startswith("runs:/"):
        return training.load_local_stats(str(tracking.download_artifact(spec)), dataset)
    return training.load_local_stats(spec, dataset)


# --------------------------------------------------------------------------- prepare-stats


@cli.command("prepare-stats")
@data_option
def prepare_stats(data: str) -> None:
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
        tracking.log_dataset(
            name=dataset.name, source=dataset.source, digest=dataset.digest, context="train"
        )
        tracking.log_text(stats.to_json(), "stats.json")
        tracking.log_figure(
            plots.class_samples(dataset.train_images, dataset.train_labels, dataset.classes),
            "samples/train_per_class.png",
        )
    click.echo(f"mean {stats.mean}  std {stats.std}")


# --------------------------------------------------------------------------- summary


@cli.command("summary")
@click.option("--norm", default=_DEFAULTS.norm, help="batch, group or layer.")
@click.option("--groups", type=int, default=_DEFAULTS.groups, help="Groups for norm=group.")
def model_summary(norm: str, groups: int) -> None:
    """Print the model: output shape, parameters and receptive field of each layer."""
    TrainConfig(norm=norm, groups=groups)  # the same validation as train
    click.echo(summary(build_model(norm=norm, groups=groups)))


# --------------------------------------------------------------------------- train


@cli.command()
@click.option("--norm", default=_DEFAULTS.norm, help="batch, group or layer.")
@click.option("--groups", type=int, default=_DEFAULTS.groups, help="Groups for norm=group.")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, help=f"1..{MAX_EPOCHS}.")
@click.option("--batch-size", "batch_size", type=int, default=_DEFAULTS.batch_size)
@click.option(
    "--learning-rate",
    "learning_rate",
    type=float,
    default=_DEFAULTS.learning_rate,
    help="Peak of the one-cycle schedule.",
)
@click.option("--momentum", type=float, default=_DEFAULTS.momentum)
@click.option(
    "--weight-decay",
    "weight_decay",
    type=float,
    default=_DEFAULTS.weight_decay,
    help="On conv weights only.",
)
@click.option("--dropout", type=float, default=_DEFAULTS.dropout)
@click.option("--label-smoothing", "label_smoothing", type=float, default=_DEFAULTS.label_smoothing)
@click.option("--warmup-epochs", "warmup_epochs", type=float, default=_DEFAULTS.warmup_epochs)
@click.option(
    "--ema",
    type=float,
    default=_DEFAULTS.ema,
    help="Per-step decay of a moving average of the weights, which is what gets evaluated "
    "and logged; 0 turns it off.",
)
@click.option(
    "--cutout",
    type=int,
    default=_DEFAULTS.cutout,
    help="Side in pixels of the square blanked in each training image; 0 turns it off.",
)
@click.option(
    "--translate",
    type=int,
    default=_DEFAULTS.translate,
    help="Largest random shift in pixels of each training image; 0 turns it off.",
)
@click.option(
    "--whiten",
    type=click.BOOL,
    default=_DEFAULTS.whiten,
    help="Start C1 from PCA whitening filters of the training images' patches.",
)
@tta_option(_DEFAULTS.tta, "How each epoch's test accuracy is computed")
@click.option("--seed", type=int, default=_DEFAULTS.seed)
@data_option
@stats_option
@device_option
@click.option("--precision", default=_DEFAULTS.precision, help="auto, fp32 or bf16.")
@click.option(
    "--registered-model",
    "registered_model",
    default=REGISTERED_MODEL,
    help="Registry name ({norm} is filled in); an empty string disables registration.",
)
@click.option("--resume", default="", help="Run id of an interrupted train run to continue.")
def train(**options) -> None:
    """Train one model, log everything to MLflow and register it."""
    config = TrainConfig(**options)
    train_model(config)


def _norm_tags(norm: str, groups: str) -> dict[str, str]:
    """Run and registry tags naming the norm; `groups` only means something for group norm,
    so only there is it tagged (the param is always logged)."""
    tags = {"norm": norm}
    if norm == "group" and groups:
        tags["groups"] = groups
    return tags


def _precision_name(autocast_dtype: torch.dtype | None) -> str:
    return str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "fp32"


def train_model(config: TrainConfig) -> str:
    """Train, log and register one model; returns the run id."""
    engine.resolve_device(config.device)  # a missing device fails before the store is touched
    tracking.check_store()
    setup = training.prepare_training(config, load_stats=_load_stats)
    resume_state = tracking.load_checkpoint(config.resume) if config.resume else None
    model, dataset = setup.model, setup.dataset
    fields = receptive_fields(model)
    run_name = f"train-{config.norm}-seed{config.seed}"
    norm_tags = _norm_tags(config.norm, str(config.groups))
    tags = {"step": "train", **norm_tags}
    with tracking.run(run_name=run_name, tags=tags, resume_run_id=config.resume or None) as run_id:
        tracking.log_params(
            {
                **config.as_params(),
                "num_params": str(setup.parameters),
                "receptive_field": str(fields[-3].receptive_field),  # after C9, before GAP
                "device": str(setup.device),
                "autocast": _precision_name(setup.autocast_dtype),
            }
        )
        tracking.log_dataset(
            name=dataset.name, source=dataset.source, digest=dataset.digest, context="train"
        )
        tracking.log_text(summary(model), "model_summary.txt")
        tracking.log_dict(
            {row.layer: dataclasses.asdict(row) for row in fields}, "receptive_field.json"
        )
        tracking.log_text(setup.stats.to_json(), "stats.json")
        click.echo(
            f"run {run_id}: {config.norm} norm, {setup.parameters:,} parameters, on {setup.device}"
        )

        def on_epoch_end(record: engine.EpochMetrics, state: engine.TrainingState) -> None:
            # An epoch's metrics and its checkpoint are logged together or not at all: Ctrl-C
            # or SIGTERM arriving in between waits until both are written.
            with _signals_deferred():
                tracking.log_epoch(record)
                tracking.log_checkpoint(state.state_dict())
            click.echo(
                f"epoch {record.epoch:>2}/{config.epochs}  "
                f"train loss {record.train_loss:.4f} acc {100 * record.train_acc:5.2f}%  "
                f"test loss {record.test_loss:.4f} acc {100 * record.test_acc:5.2f}%  "
                f"lr {record.lr:.4f}  {record.epoch_seconds:5.1f}s"
            )

        started = time.perf_counter()
        records = training.fit(setup, config, resume_from=resume_state, on_epoch_end=on_epoch_end)
        if records:
            tracking.log_metrics({"train_seconds": time.perf_counter() - started})
        history = tracking.metric_history(run_id)
        final = engine.evaluate(
            model,
            setup.test_split,
            normalize=setup.normalize,
            autocast_dtype=setup.autocast_dtype,
            tta=config.tta,
        )
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
        example = setup.normalize(setup.test_split.images[:8]).cpu().contiguous()
        # Logged in the portable NCHW layout: a channels_last model's weights are strided views,
        # which torch.export's archive writer warns about ("No complete tensor found").
        portable = model.cpu().to(memory_format=torch.contiguous_format)
        model_uri = tracking.log_model(portable, input_example=example.numpy())
        if config.registered_model:
            version = tracking.register_model(
                model_uri,
                name=config.registered_model,
                run_id=run_id,
                tags={
                    **norm_tags,
                    "seed": str(config.seed),
                    "test_acc": f"{final.accuracy:.4f}",
                },
            )
            champion = tracking.update_champion(config.registered_model)
            click.echo(
                f"registered {config.registered_model} version {version} "
                f"(champion: version {champion})"
            )
    click.echo(f"final test accuracy {100 * final.accuracy:.2f}% (run {run_id})")
    return run_id


# --------------------------------------------------------------------------- evaluate


@cli.command()
@click.option(
    "--model-uri",
    "model_uri",
    required=True,
    help="runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>.",
)
@data_option
@click.option("--stats", default="", help="Default: the training run's stats.json.")
@click.option(
    "--batch-size",
    "batch_size",
    type=int,
    default=0,
    show_default=True,
    help="Images per forward pass; 0: 128 on the CPU, 1024 on a GPU.",
)
@device_option
@tta_option("", "Default: what the training run used")
def evaluate(**options) -> None:
    """Evaluate a logged or registered model on the test split, in its own run."""
    config = EvalConfig(**options)
    device = engine.resolve_device(config.device)
    tracking.check_store()
    source = tracking.resolve_model_uri(config.model_uri)
    dataset = datasets.load_dataset(config.data)
    stats = _load_stats(config.stats or f"runs:/{source.run_id}/stats.json", dataset)
    model = tracking.load_model(config.model_uri, device=str(device))
    memory_format = torch.contiguous_format
    normalize = datasets.Normalizer(stats, device=device, memory_format=memory_format)
    test_split = datasets.to_device(dataset.test_images, dataset.test_labels, device=device)
    label = f"{source.name}-v{source.version}" if source.version else source.run_id[:8]
    tags = {"step": "evaluate", "source_run_id": source.run_id, "model_uri": config.model_uri}
    if source.version:
        tags.update({"model_name": source.name or "", "model_version": source.version})
    source_params = tracking.run_params(source.run_id)
    if "norm" in source_params:
        tags.update(_norm_tags(source_params["norm"], source_params.get("groups", "")))
    if "seed" in source_params:
        tags["seed"] = source_params["seed"]
    trained_tta = source_params.get("tta", TTA_BEFORE_PARAM)
    config = dataclasses.replace(config, tta=config.tta or trained_tta)
    # A model evaluated other than as it was trained says so in its name (the UI's run list).
    run_name = f"evaluate-{label}" + ("" if config.tta == trained_tta else f"-tta-{config.tta}")
    with tracking.run(run_name=run_name, tags=tags) as run_id:
        tracking.log_params(config.as_params())
        tracking.log_dataset(
            name=dataset.name, source=dataset.source, digest=dataset.digest, context="test"
        )
        result = engine.evaluate(
            model,
            test_split,
            normalize=normalize,
            batch_size=config.batch_size or None,
            tta=config.tta,
        )
        labels, predictions = result.labels.numpy(), result.predictions.numpy()
        matrix = plots.confusion_matrix(labels, predictions, len(dataset.classes))
        per_class = plots.per_class_accuracy(matrix)
        tracking.log_metrics(
            {
                "test_acc": result.accuracy,
                "test_loss": result.loss,
                **{
                    f"class_acc/{name}": float(a)
                    for name, a in zip(dataset.classes, per_class, strict=True)
                },
            }
        )
        tracking.log_dict(
            {
                "test_acc": result.accuracy,
                "test_loss": result.loss,
                "per_class_accuracy": dict(
                    zip(dataset.classes, map(float, per_class), strict=True)
                ),
                "confusion_matrix": matrix.tolist(),
                "classes": list(dataset.classes),
            },
            "evaluation.json",
        )
        tracking.log_figure(
            plots.confusion_matrix_figure(
                matrix, dataset.classes, title=f"{label}: confusion matrix"
            ),
            "plots/confusion_matrix.png",
        )
        tracking.log_figure(
            plots.misclassified_grid(
                dataset.test_images,
                labels,
                predictions,
                dataset.classes,
                title=f"{label}: misclassified test images",
            ),
            "plots/misclassified.png",
        )
    click.echo(f"test accuracy {100 * result.accuracy:.2f}%  loss {result.loss:.4f} (run {run_id})")
    for name, accuracy in zip(dataset.classes, per_class, strict=True):
        click.echo(f"  {name:<12} {100 * accuracy:6.2f}%")


# --------------------------------------------------------------------------- main (the study)

# A study trains every norm and seeds 1..seeds; resuming names one run, so it stays on `train`.
_NOT_STUDY_OPTIONS = ("norm", "seed", "resume")


@cli.command("main")
@click.option("--norm", default=",".join(NORMS), help="One norm or a comma-separated list of them.")
@click.option(
    "--seeds",
    type=int,
    default=1,
    help="Train seeds 1..SEEDS of each norm (the README's study uses 3).",
)
@click.option(
    "--parallel",
    type=int,
    default=1,
    help="Run up to N trainings (and evaluations) at once, each on its share of the cores.",
)
def study(norm: str, seeds: int, parallel: int, **train_options) -> None:
    """The whole study: prepare-stats, train each norm x seed, evaluate each model, compare.

    Every other option passes through to each train step. Each step is a child run of this
    one; a step that already finished with the same parameters and code is reused.
    """
    norms = parse_norms(norm)
    configs = workflow.study_configs(norms, seeds, **train_options)
    workflow.check_parallel(parallel)
    tracking.check_store()
    tags = {"step": "main", "norms": ",".join(norms), "seeds": str(seeds)}
    with tracking.run(run_name="study", tags=tags) as run_id:
        tracking.log_params(
            {
                "norm": ",".join(norms),
                "seeds": str(seeds),
                "parallel": str(parallel),
                **{key: str(value) for key, value in train_options.items()},
            }
        )
        results = workflow.run_study(configs, parallel=parallel, echo=click.echo)
        tracking.log_dict(
            {
                "steps": [
                    {
                        "name": result.step.name,
                        "entry_point": result.step.entry_point,
                        "run_id": result.run_id,
                        "reused": result.reused,
                    }
                    for result in results
                ]
            },
            "steps.json",
        )
    reused = sum(result.reused for result in results)
    click.echo(
        f"study {run_id}: {len(results)} steps ({reused} reused); "
        "report: artifacts comparison/report.md"
    )


study.params.extend(option for option in train.params if option.name not in _NOT_STUDY_OPTIONS)


# --------------------------------------------------------------------------- compare


@cli.command("compare")
@click.option(
    "--parent-run-id",
    "parent_run_id",
    default="",
    help="The study's parent run; the report is logged to it.",
)
@click.option(
    "--experiment-name",
    "experiment_name",
    default="",
    help="Without a parent run: compare this experiment's runs.",
)
@click.option(
    "--filter-string",
    "filter_string",
    default="",
    help="MLflow search filter, e.g. \"params.epochs = '20'\".",
)
@click.option(
    "--group-by",
    "group_by",
    default="",
    help="Comma-separated train parameters (e.g. whiten,translate): adds a table of each "
    "norm's runs per combination of their values, with the gain over the default recipe.",
)
def compare_command(
    parent_run_id: str, experiment_name: str, filter_string: str, group_by: str
) -> None:
    """Side-by-side report of the norms: tables, overlay plots, findings, report.md."""
    keys = parse_group_by(group_by)
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
            raise tracking.TrackingError(f"no finished train runs to compare in {source}")
        target = parent_run_id or run_id
        with tempfile.TemporaryDirectory() as directory:
            comparison.write_report(study_data, Path(directory))
            tracking.log_artifacts(directory, "comparison", run_id=target)
        tracking.set_tags({"report_run_id": target})
    table = comparison.norm_table(study_data)
    for row in table.itertuples(index=False):
        click.echo(
            f"{row.norm:<6} {row.runs} runs  final test acc "
            f"{comparison._percent(row.final_test_acc_mean, row.final_test_acc_std)}%"
        )
    for note in comparison.findings(table):
        click.echo(f"- {note}")
    if keys:
        levers = comparison.readable_lever_table(comparison.lever_table(study_data), keys)
        click.echo(comparison.markdown_table(levers))
    click.echo(f"report: runs:/{target}/comparison/report.md (compare run {run_id})")


def parse_group_by(text: str) -> tuple[str, ...]:
    """`whiten,translate` -> validated train parameter names (not norm or seed: every table
    is per norm over seeds already)."""
    allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("norm", "seed")]
    keys = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for key in keys:
        if key not in allowed:
            raise ConfigError(
                f"group_by names train parameters: {', '.join(allowed)} (got {key!r})"
            )
    return keys


def _load_study(runs, *, source: str, group_by: tuple[str, ...] = ()) -> comparison.Study:
    """Fetch what compare.py needs: epoch histories, misclassified grids, evaluation.json."""
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


# --------------------------------------------------------------------------- registry

_REGISTRY_COLUMNS = ("name", "version", "aliases", "norm", "groups", "seed", "test_acc", "run_id")


@cli.group()
def registry() -> None:
    """Registered models: versions, aliases and metrics; move an alias by hand."""


@registry.command("list")
def registry_list() -> None:
    """Every registered model version, with its aliases and test accuracy."""
    tracking.check_store()
    _echo_table(tracking.registry_rows(), _REGISTRY_COLUMNS)


@registry.command("show")
@click.argument("name")
def registry_show(name: str) -> None:
    """One model's versions with their source runs' final metrics."""
    tracking.check_store()
    rows = tracking.registry_rows(name)
    for row in rows:
        metrics = tracking.run_metrics(row["run_id"]) if row["run_id"] else {}
        for key in ("train_acc", "test_loss", "train_seconds"):
            row[key] = f"{metrics[key]:.4f}" if key in metrics else ""
    _echo_table(rows, (*_REGISTRY_COLUMNS[1:], "train_acc", "test_loss", "train_seconds"))
    champion = [row["version"] for row in rows if tracking.CHAMPION in row["aliases"].split(",")]
    click.echo(f"{name}@{tracking.CHAMPION}: version {champion[0] if champion else '(none)'}")


@registry.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default=tracking.CHAMPION, help="The alias to move.")
def registry_promote(name: str, version: str, alias: str) -> None:
    """Point ALIAS at VERSION of NAME. The next train run recomputes `champion` from the
    versions' test_acc tags, so a manual champion lasts until a better version registers."""
    tracking.check_store()
    tracking.promote(name, version, alias=alias)
    click.echo(f"{name}@{alias} -> version {version}")
    _echo_table(tracking.registry_rows(name), _REGISTRY_COLUMNS)


def _echo_table(rows: list[dict[str, str]], columns) -> None:
    if not rows:
        click.echo("no registered models")
        return
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


if __name__ == "__main__":
    main()
