"""Command line: click commands that build configs and wire the engine to tracking.

`python -m pipeline COMMAND --help` lists each command's options; the MLproject entry points
call these commands with the same parameter names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import sys
import traceback

import click

from pipeline import runs, tracking, training, workflow
from pipeline import sweep as sweeps
from pipeline.config import (
    ACTIVATIONS,
    BATCH_STATISTICS_NORMS,
    COMPILE_MODES,
    CUDA_GRAPHS,
    MAX_EPOCHS,
    MAX_MEASUREMENT_EPOCHS,
    NORMS,
    OPTIMIZERS,
    ORDERS,
    PER_NORM,
    PER_NORM_VALUES,
    POOLS,
    PRECISIONS,
    REGISTERED_MODEL,
    STANDARDIZE,
    STUDY_NORMS,
    TTA_MODES,
    ConfigError,
    EvalConfig,
    TrainConfig,
    parse_norms,
    recipe_help,
)
from pipeline.data import DataError
from pipeline.device import BF16_NORMS
from pipeline.executors import EXECUTORS, ExecutorSettings
from pipeline.model import summary
from pipeline.norms import REGISTRY

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


def _on_sigterm(signum, frame) -> None:
    raise tracking.RunInterrupted(f"received signal {signum}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """CIFAR-10 normalization study (batch / group / layer, and more norms opt-in) tracked in
    MLflow."""
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
# Every registered norm (pipeline/norms.py) with what its statistics are taken over.
NORM_HELP = "; ".join(f"{name}: {entry.description}" for name, entry in REGISTRY.items()) + "."
STUDY_NORM_HELP = (
    f"One norm or a comma-separated list of them: {', '.join(NORMS)} (the default study: "
    f"{', '.join(STUDY_NORMS)})."
)


def norm_batch_option(function):
    return click.option(
        "--norm-batch",
        "norm_batch",
        type=int,
        default=_DEFAULTS.norm_batch,
        help="Images per batch-statistics group (ghost batches): each group of a training batch "
        "normalized by its own statistics, as per-GPU batch norm; 0: the whole batch. Must "
        "divide batch_size; only for a norm with batch statistics "
        f"({', '.join(BATCH_STATISTICS_NORMS)}).",
    )(function)


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


# --------------------------------------------------------------------------- prepare-stats


@cli.command("prepare-stats")
@data_option
def prepare_stats(data: str) -> None:
    """Compute per-channel mean/std of the training split; log and cache them."""
    runs.prepare_stats(data, echo=click.echo)


# --------------------------------------------------------------------------- summary


@cli.command("summary")
@click.option("--norm", default=_DEFAULTS.norm, help=NORM_HELP)
@click.option("--groups", type=int, default=_DEFAULTS.groups, help="Groups for norm=group.")
@norm_batch_option
@click.option("--widths", default=_DEFAULTS.widths, help="As train's, e.g. C2=32,C7=24.")
@click.option("--order", type=click.Choice(ORDERS), default=_DEFAULTS.order)
@click.option(
    "--standardize",
    type=click.Choice(STANDARDIZE, case_sensitive=False),
    default=_DEFAULTS.standardize,
)
@click.option("--residual", type=click.BOOL, default=_DEFAULTS.residual, help="As train's.")
@click.option(
    "--conv-groups", "conv_groups", type=int, default=_DEFAULTS.conv_groups, help="As train's."
)
@click.option(
    "--activation",
    type=click.Choice((PER_NORM_VALUES["activation"], *ACTIVATIONS)),
    default=PER_NORM_VALUES["activation"],
    help="As train's.",
)
@click.option(
    "--pool",
    type=click.Choice((PER_NORM_VALUES["pool"], *POOLS)),
    default=PER_NORM_VALUES["pool"],
    help="As train's.",
)
def model_summary(**options) -> None:
    """Print the model: its blocks, then output shape, parameters and receptive field of each
    layer."""
    config = TrainConfig(**options)  # the norm's recipe resolved: what `train` would build
    model = training.build_model(config)  # train's validation and budget
    groups = f" ({config.groups} groups)" if REGISTRY[config.norm].groups else ""
    activation = config.activation if REGISTRY[config.norm].activation else "its own activation"
    click.echo(f"{config.norm} norm{groups}, {activation}, {config.pool} pooling at P1 and P2")
    click.echo(summary(model))


# --------------------------------------------------------------------------- train


@cli.command()
@click.option("--norm", default=_DEFAULTS.norm, help=NORM_HELP)
@click.option("--groups", type=int, default=_DEFAULTS.groups, help="Groups for norm=group.")
@click.option(
    "--epochs",
    type=int,
    default=_DEFAULTS.epochs,
    help=f"1..{MAX_EPOCHS}; up to {MAX_MEASUREMENT_EPOCHS} to measure the model's ceiling "
    "(such runs are tagged beyond_budget and never registered).",
)
@click.option(
    "--batch-size",
    "batch_size",
    type=int,
    default=PER_NORM,  # _DEFAULTS holds batch norm's resolved value
    help=f"Images per training step; {recipe_help('batch_size')}",
    show_default=True,
)
@norm_batch_option
@click.option(
    "--learning-rate",
    "learning_rate",
    type=float,
    default=PER_NORM,  # _DEFAULTS holds batch norm's resolved value
    help=f"Peak of the one-cycle schedule; {recipe_help('learning_rate')}",
    show_default=True,
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
@click.option(
    "--widths",
    default=_DEFAULTS.widths,
    help="Output channels of some layers instead of the defaults, e.g. C2=32,C7=24 (the model "
    "stays within 50,000 parameters).",
)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default=_DEFAULTS.order,
    help="conv -> norm -> ReLU, or conv -> ReLU -> norm.",
)
@click.option(
    "--standardize",
    type=click.Choice(STANDARDIZE, case_sensitive=False),
    default=_DEFAULTS.standardize,
    help="Weight standardization of the convs; auto: the norm's default, on for "
    + ", ".join(name for name, entry in REGISTRY.items() if entry.standardize)
    + ".",
)
@click.option(
    "--residual",
    type=click.BOOL,
    default=_DEFAULTS.residual,
    help="Add each 3x3 layer's input to its output where their channels match (C4->C5, "
    "C7->C8->C9 by default): no parameter or layer added.",
)
@click.option(
    "--conv-groups",
    "conv_groups",
    type=int,
    default=_DEFAULTS.conv_groups,
    help="Grouped 3x3 convs C2..C9 (1: dense); the 1x1 layers c3 and c6 mix the groups.",
)
@click.option(
    "--activation",
    type=click.Choice((PER_NORM_VALUES["activation"], *ACTIVATIONS)),
    default=PER_NORM_VALUES["activation"],  # _DEFAULTS holds batch norm's resolved value
    help=f"The non-linearity of every conv block (no parameters); {recipe_help('activation')}",
    show_default=True,
)
@click.option(
    "--pool",
    type=click.Choice((PER_NORM_VALUES["pool"], *POOLS)),
    default=PER_NORM_VALUES["pool"],  # _DEFAULTS holds batch norm's resolved value
    help=f"P1 and P2: 2x2 max or average pooling; {recipe_help('pool')}",
    show_default=True,
)
@click.option(
    "--optimizer",
    type=click.Choice((PER_NORM_VALUES["optimizer"], *OPTIMIZERS)),
    default=PER_NORM_VALUES["optimizer"],  # _DEFAULTS holds batch norm's resolved value
    help="sgd: SGD with Nesterov momentum for everything; muon: Muon for the conv filters but "
    "the c10 head (muon_lr, muon_momentum), the same SGD for norms, biases and the head; "
    f"{recipe_help('optimizer')}",
    show_default=True,
)
@click.option(
    "--muon-lr",
    "muon_lr",
    type=float,
    default=_DEFAULTS.muon_lr,
    help="optimizer=muon: the filters' peak learning rate (the one-cycle schedule scales it).",
)
@click.option(
    "--muon-momentum",
    "muon_momentum",
    type=float,
    default=_DEFAULTS.muon_momentum,
    help="optimizer=muon: the filters' Nesterov momentum.",
)
@click.option(
    "--muon-renormalize",
    "muon_renormalize",
    type=click.BOOL,
    default=_DEFAULTS.muon_renormalize,
    help="optimizer=muon: reset each filter tensor's norm to sqrt(out channels) every step.",
)
@tta_option(_DEFAULTS.tta, "How each epoch's validation and test accuracy are computed")
@click.option(
    "--val-size",
    "val_size",
    type=int,
    default=_DEFAULTS.val_size,
    help="Training images held out for validation, drawn per class with a seed of their own "
    "(the same images in every run of a dataset); choices rank by them. 0: none.",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed)
@data_option
@stats_option
@device_option
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=_DEFAULTS.precision,
    help="auto: fp32, or bf16 autocast for the norms measured to hold their accuracy in it "
    f"({', '.join(BF16_NORMS) or 'none yet'}) on a CPU with native bf16 (AVX512-BF16, AMX); "
    "bf16: autocast always.",
)
@click.option(
    "--compile",
    type=click.Choice(COMPILE_MODES),
    default=_DEFAULTS.compile,
    help="torch.compile the model: faster steps after a warm-up of a minute or more per run.",
)
@click.option(
    "--cuda-graphs",
    "cuda_graphs",
    type=click.Choice(CUDA_GRAPHS),
    default=_DEFAULTS.cuda_graphs,
    help="Replay the training step and the evaluation's forward passes as CUDA graphs; "
    "auto: on for a CUDA device (not with compile on), off elsewhere.",
)
@click.option(
    "--registered-model",
    "registered_model",
    default=REGISTERED_MODEL,
    help="Registry name ({norm} is filled in); an empty string disables registration.",
)
@click.option("--resume", default="", help="Run id of an interrupted train run to continue.")
def train(**options) -> None:
    """Train one model, log everything to MLflow and register it."""
    runs.train_model(TrainConfig(**options), echo=click.echo)


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
    runs.evaluate_model(EvalConfig(**options), echo=click.echo)


# --------------------------------------------------------------------------- main (the study)


def executor_options(function):
    """Where a study's or sweep's steps run: this host, or Ray (local or a cluster)."""
    options = [
        click.option(
            "--parallel",
            type=int,
            default=1,
            help="Run up to N steps at once (local: each on its share of the cores).",
        ),
        click.option(
            "--executor",
            type=click.Choice(EXECUTORS),
            default="local",
            help="local: processes on this host; ray: Ray tasks (pip install -e '.[ray]').",
        ),
        click.option(
            "--ray-address",
            "ray_address",
            default="",
            help="executor=ray: empty starts a local Ray instance; auto or host:port joins a "
            "cluster (the store must then be a tracking server).",
        ),
        click.option(
            "--cpus-per-trial", "cpus_per_trial", type=float, default=1.0, help="executor=ray."
        ),
        click.option(
            "--gpus-per-trial",
            "gpus_per_trial",
            type=float,
            default=0.0,
            help="executor=ray: fractions share a GPU; asked for only where the cluster has GPUs.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_EXECUTOR_OPTIONS = ("parallel", "executor", "ray_address", "cpus_per_trial", "gpus_per_trial")


def _executor_settings(options: dict) -> ExecutorSettings:
    """Pop the executor options out of a command's options, checked before any run starts."""
    values = {key: options.pop(key) for key in _EXECUTOR_OPTIONS}
    settings = ExecutorSettings(name=values.pop("executor"), **values)
    workflow.check_executor(settings)
    return settings


def _executor_params(settings: ExecutorSettings) -> dict[str, str]:
    params = {"parallel": str(settings.parallel), "executor": settings.name}
    if settings.name == "ray":
        params.update(
            ray_address=settings.ray_address,
            cpus_per_trial=str(settings.cpus_per_trial),
            gpus_per_trial=str(settings.gpus_per_trial),
        )
    return params


# A study trains every norm and seeds 1..seeds; resuming names one run, so it stays on `train`.
_NOT_STUDY_OPTIONS = ("norm", "seed", "resume")


@cli.command("main")
@click.option("--norm", default=",".join(STUDY_NORMS), help=STUDY_NORM_HELP)
@click.option(
    "--seeds",
    type=int,
    default=1,
    help="Train seeds 1..SEEDS of each norm (the README's study uses 3).",
)
@executor_options
def study(norm: str, seeds: int, **train_options) -> None:
    """The whole study: prepare-stats, train each norm x seed, evaluate each model, compare.

    Every other option passes through to each train step. Each step is a child run of this
    one; a step that already finished with the same parameters and code is reused.
    """
    norms = parse_norms(norm)
    executor = _executor_settings(train_options)
    train_options["data"] = workflow.step_data(train_options["data"])
    configs = workflow.study_configs(norms, seeds, **train_options)
    tracking.check_store()
    tags = {"step": "main", "norms": ",".join(norms), "seeds": str(seeds)}
    with tracking.run(run_name="study", tags=tags) as run_id:
        tracking.log_params(
            {
                "norm": ",".join(norms),
                "seeds": str(seeds),
                **_executor_params(executor),
                **{key: str(value) for key, value in train_options.items()},
            }
        )
        tracking.describe_run(
            f"The study: {', '.join(norms)} norm x seeds 1..{seeds}: prepare-stats, "
            f"{len(configs)} trainings ({configs[0].epochs} epochs each, `{executor.name}` "
            f"executor, {executor.parallel} at a time), an evaluation of each registered "
            "model, then the side-by-side comparison (artifacts `comparison/report.html`).\n\n"
            f"Command: `{_command_line()}`"
        )
        results = workflow.run_study(configs, executor=executor, echo=click.echo)
        _log_steps(results)
    reused = sum(result.reused for result in results)
    click.echo(
        f"study {run_id}: {len(results)} steps ({reused} reused); "
        "report: artifacts comparison/report.md"
    )


def _command_line() -> str:
    """This command as a user would type it again."""
    return shlex.join(["python", "-m", "pipeline", *sys.argv[1:]])


def _log_steps(results: list[workflow.StepResult]) -> None:
    """steps.json on the parent run: each child's name, entry point, run and reuse."""
    steps = [
        {
            "name": result.step.name,
            "entry_point": result.step.entry_point,
            "run_id": result.run_id,
            "reused": result.reused,
            **({"diverged": result.diverged} if result.diverged else {}),
        }
        for result in results
    ]
    tracking.log_dict({"steps": steps}, "steps.json")


study.params.extend(option for option in train.params if option.name not in _NOT_STUDY_OPTIONS)


# --------------------------------------------------------------------------- sweep


@cli.command("sweep")
@click.option(
    "--grid",
    required=True,
    help="Train parameters and their values, 'learning_rate=0.1,0.4;label_smoothing=0,0.1', "
    "or a YAML file (see sweeps/levers.yaml).",
)
@click.option(
    "--mode",
    type=click.Choice(sweeps.MODES),
    default="grid",
    help="grid: every combination; one-at-a-time: the defaults and each value alone.",
)
@click.option("--norm", default=",".join(STUDY_NORMS), help=STUDY_NORM_HELP)
@click.option("--seeds", type=int, default=1, help="Train seeds 1..SEEDS of every trial.")
@executor_options
@click.option(
    "--max-trials",
    "max_trials",
    type=int,
    default=sweeps.MAX_TRIALS,
    help="Refuse a sweep of more trainings than this, before any run starts.",
)
@click.option(
    "--registered-model",
    "registered_model",
    default="",
    help="Registry name of each trial's model ({norm} is filled in); empty: none registered.",
)
def sweep(grid: str, mode: str, norm: str, seeds: int, max_trials: int, **train_options) -> None:
    """A sweep: a `train` child run per trial and norm and seed, then the lever table.

    Every other option is the recipe the grid's values override. A trial that already
    finished with the same parameters and code is reused, so an interrupted or extended sweep
    runs only what is new.
    """
    norms = parse_norms(norm)
    executor = _executor_settings(train_options)
    train_options["data"] = workflow.step_data(train_options["data"])
    trials, swept = sweeps.trials(
        grid, norms=norms, seeds=seeds, mode=mode, max_trials=max_trials, **train_options
    )
    workflow.check_models([trial.config for trial in trials])
    tracking.check_store()
    tags = {"step": "sweep", "norms": ",".join(norms), "swept": ",".join(swept)}
    with tracking.run(run_name="sweep", tags=tags) as run_id:
        tracking.log_params(
            {
                "grid": grid,
                "mode": mode,
                "norm": ",".join(norms),
                "seeds": str(seeds),
                **_executor_params(executor),
                "max_trials": str(max_trials),
                **{key: str(value) for key, value in train_options.items()},
            }
        )
        click.echo(f"sweep {run_id}: {len(trials)} trainings over {', '.join(swept)} ({mode})")
        tracking.describe_run(
            f"A sweep over {', '.join(swept)} ({mode}): {len(trials)} trainings of "
            f"{', '.join(norms)} norm x seeds 1..{seeds}, then the lever table, ranked on "
            "validation accuracy with the adoption rule (artifacts `comparison/report.html`)."
            f"\n\nCommand: `{_command_line()}`"
        )
        results = workflow.run_sweep(trials, swept=swept, executor=executor, echo=click.echo)
        _log_steps(results)
    reused = sum(result.reused for result in results)
    diverged = sum(bool(result.diverged) for result in results)
    click.echo(
        f"sweep {run_id}: {len(results)} steps ({reused} reused"
        + (f", {diverged} diverged" if diverged else "")
        + "); lever table: artifacts comparison/report.md"
    )


sweep.params.extend(
    option
    for option in train.params
    if option.name not in (*_NOT_STUDY_OPTIONS, "registered_model")
)


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
    runs.compare_runs(
        parent_run_id=parent_run_id,
        experiment_name=experiment_name,
        filter_string=filter_string,
        group_by=parse_group_by(group_by),
        echo=click.echo,
    )


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


# --------------------------------------------------------------------------- registry

_REGISTRY_COLUMNS = (
    "name",
    "version",
    "aliases",
    "norm",
    "groups",
    "seed",
    "val_acc",
    "test_acc",
    "run_id",
)


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
    versions' val_acc tags, so a manual champion lasts until a better version registers."""
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
