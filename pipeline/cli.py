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

from pipeline import evaluation, model_registry, runs, tracking, training, workflow
from pipeline import sweep as sweeps
from pipeline.config import (
    NORMS,
    PER_NORM_VALUES,
    STUDY_NORMS,
    ConfigError,
    EvalConfig,
    TrainConfig,
    parse_norms,
)
from pipeline.data import DataError
from pipeline.executors import EXECUTORS, ExecutorSettings
from pipeline.model import summary
from pipeline.norms import REGISTRY
from pipeline.records import recipe_value

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

_TYPES = {"int": int, "float": float, "bool": click.BOOL, "str": str}
STUDY_NORM_HELP = (
    f"One norm or a comma-separated list of them: {', '.join(NORMS)} (the default study: "
    f"{', '.join(STUDY_NORMS)})."
)


def train_options(*, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()):
    """The click options of TrainConfig's fields (see `config_options`)."""
    return config_options(TrainConfig, exclude=exclude, only=only)


def config_options(config, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()):
    """The click options of a config's fields, made from their declarations (config.setting):
    `--muon-lr` and, as MLflow passes a parameter an entry point does not declare,
    `--muon_lr`; a RECIPES parameter defaults to its "per norm" value (0, -1 or auto)."""
    fields = [
        field
        for field in dataclasses.fields(config)
        if field.name not in exclude and (not only or field.name in only)
    ]

    def decorate(function):
        for field in reversed(fields):
            function = click.option(*_option_names(field.name), **_option_spec(field))(function)
        return function

    return decorate


def _option_names(name: str) -> list[str]:
    dashed = f"--{name.replace('_', '-')}"
    return [dashed, *([f"--{name}"] if "_" in name else []), name]


def _option_spec(field: dataclasses.Field) -> dict:
    spec = {"default": field.default, "help": field.metadata["help"] or None}
    spec["type"] = _TYPES[field.type]
    if field.metadata["click_choice"]:
        per_norm = (PER_NORM_VALUES[field.name],) if field.name in PER_NORM_VALUES else ()
        spec["type"] = click.Choice((*per_norm, *field.metadata["choices"]), case_sensitive=False)
    return spec


# --------------------------------------------------------------------------- prepare-stats


@cli.command("prepare-stats")
@train_options(only=("data",))
def prepare_stats(data: str) -> None:
    """Compute per-channel mean/std of the training split; log and cache them."""
    runs.prepare_stats(data, echo=click.echo)


# --------------------------------------------------------------------------- summary

_MODEL_OPTIONS = ("norm", "groups", "norm_batch", "widths", "order", "standardize", "residual")


@cli.command("summary")
@train_options(only=(*_MODEL_OPTIONS, "conv_groups", "activation", "pool"))
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
@train_options()
@click.pass_context
def train(context: click.Context, **options) -> None:
    """Train one model, log everything to MLflow and register it.

    With --resume, the run's own settings (its logged params, data included) continue it; a
    setting given as well must equal the run's."""
    if options["resume"]:
        config = runs.resumed_config(options["resume"], given=_given(context, options))
    else:
        config = TrainConfig(**options)
    runs.train_model(config, echo=click.echo)


def _given(context: click.Context, options: dict) -> dict:
    """The options typed on the command line. Under `mlflow run` (MLFLOW_RUN_ID) the entry
    point fills its declared parameters in, so a value equal to its default is not a choice."""
    filled_in = bool(os.environ.get("MLFLOW_RUN_ID"))
    given = {}
    for option in context.command.params:
        source = context.get_parameter_source(option.name)
        if option.name == "resume" or source is not click.core.ParameterSource.COMMANDLINE:
            continue
        if not (filled_in and options[option.name] == option.default):
            given[option.name] = options[option.name]
    return given


# --------------------------------------------------------------------------- evaluate


@cli.command()
@click.option(
    "--model-uri",
    "--model_uri",
    "model_uri",
    required=True,
    help="runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>.",
)
@config_options(EvalConfig, exclude=("model_uri",))
def evaluate(**options) -> None:
    """Evaluate a logged or registered model on the test split, in its own run: accuracy,
    calibration and, with --corruptions, CIFAR-10-C."""
    evaluation.evaluate_model(EvalConfig(**options), echo=click.echo)


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
            "--ray_address",
            "ray_address",
            default="",
            help="executor=ray: empty starts a local Ray instance; auto or host:port joins a "
            "cluster (the store must then be a tracking server).",
        ),
        click.option(
            "--cpus-per-trial",
            "--cpus_per_trial",
            "cpus_per_trial",
            type=float,
            default=1.0,
            help="executor=ray.",
        ),
        click.option(
            "--gpus-per-trial",
            "--gpus_per_trial",
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
# A study trains every norm and seeds 1..seeds; resuming names one run, so it stays on `train`.
_NOT_STUDY_OPTIONS = ("norm", "seed", "resume")


def _executor_settings(options: dict) -> ExecutorSettings:
    """Pop the executor options out of a command's options, checked before any run starts."""
    values = {key: options.pop(key) for key in _EXECUTOR_OPTIONS}
    settings = ExecutorSettings(name=values.pop("executor"), **values)
    workflow.check_executor(settings)
    return settings


def _command_line() -> str:
    """This command as a user would type it again."""
    return shlex.join(["python", "-m", "pipeline", *sys.argv[1:]])


@cli.command("main")
@click.option("--norm", default=",".join(STUDY_NORMS), help=STUDY_NORM_HELP)
@click.option(
    "--seeds",
    type=int,
    default=1,
    help="Train seeds 1..SEEDS of each norm (the README's study uses 3).",
)
@executor_options
@config_options(EvalConfig, only=workflow.STUDY_EVALUATION)
@train_options(exclude=_NOT_STUDY_OPTIONS)
def study(norm: str, seeds: int, **options) -> None:
    """The whole study: prepare-stats, train each norm x seed, evaluate each model, compare.

    The evaluation options reach each evaluate step (bn_stats=test-batch: a second evaluation
    of each model whose norm has batch statistics); every other option passes through to each
    train step. Each step is a child run of this one; a step that already finished with the
    same parameters and code is reused.
    """
    norms = parse_norms(norm)
    executor = _executor_settings(options)
    evaluation_options = {key: options.pop(key) for key in workflow.STUDY_EVALUATION}
    run_id, results = workflow.study(
        norms,
        seeds,
        options=options,
        evaluation=evaluation_options,
        executor=executor,
        command=_command_line(),
        echo=click.echo,
    )
    reused = sum(result.reused for result in results)
    click.echo(
        f"study {run_id}: {len(results)} steps ({reused} reused); "
        "report: artifacts comparison/report.md"
    )


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
    "--max_trials",
    "max_trials",
    type=int,
    default=sweeps.MAX_TRIALS,
    help="Refuse a sweep of more trainings than this, before any run starts.",
)
@click.option(
    "--registered-model",
    "--registered_model",
    "registered_model",
    default="",
    help="Registry name of each trial's model ({norm} is filled in); empty: none registered.",
)
@train_options(exclude=(*_NOT_STUDY_OPTIONS, "registered_model"))
def sweep(grid: str, mode: str, norm: str, seeds: int, max_trials: int, **options) -> None:
    """A sweep: a `train` child run per trial and norm and seed, then the lever table.

    Every other option is the recipe the grid's values override. A trial that already
    finished with the same parameters and code is reused, so an interrupted or extended sweep
    runs only what is new.
    """
    executor = _executor_settings(options)
    run_id, results = workflow.sweep(
        grid,
        mode=mode,
        norms=parse_norms(norm),
        seeds=seeds,
        max_trials=max_trials,
        options=options,
        executor=executor,
        command=_command_line(),
        echo=click.echo,
    )
    reused = sum(result.reused for result in results)
    diverged = sum(bool(result.diverged) for result in results)
    click.echo(
        f"sweep {run_id}: {len(results)} steps ({reused} reused"
        + (f", {diverged} diverged" if diverged else "")
        + "); lever table: artifacts comparison/report.md"
    )


# --------------------------------------------------------------------------- compare


@cli.command("compare")
@click.option(
    "--parent-run-id",
    "--parent_run_id",
    "parent_run_id",
    default="",
    help="The study's parent run; the report is logged to it.",
)
@click.option(
    "--experiment-name",
    "--experiment_name",
    "experiment_name",
    default="",
    help="Without a parent run: compare this experiment's runs (several: comma-separated).",
)
@click.option(
    "--filter-string",
    "--filter_string",
    "filter_string",
    default="",
    help="MLflow search filter, e.g. \"params.epochs = '20'\".",
)
@click.option(
    "--group-by",
    "--group_by",
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

# What a version's run trained with, "auto" and 0 resolved (older runs: the plain param).
_RESOLVED_COLUMNS = ("optimizer", "batch_size", "learning_rate", "precision", "device")


@cli.group()
def registry() -> None:
    """Registered models: versions, aliases and metrics; move an alias by hand."""


@registry.command("list")
def registry_list() -> None:
    """Every registered model version, with its aliases and test accuracy."""
    tracking.check_store()
    _echo_table(model_registry.registry_rows(), _REGISTRY_COLUMNS)


@registry.command("show")
@click.argument("name")
def registry_show(name: str) -> None:
    """One model's versions with their source runs' recipe as it ran (resolved.*) and final
    metrics."""
    tracking.check_store()
    rows = model_registry.registry_rows(name)
    for row in rows:
        params = tracking.run_params(row["run_id"]) if row["run_id"] else {}
        for key in _RESOLVED_COLUMNS:
            row[key] = recipe_value(params, key) or ""
        metrics = tracking.run_metrics(row["run_id"]) if row["run_id"] else {}
        for key in ("train_acc", "test_loss", "train_seconds"):
            row[key] = f"{metrics[key]:.4f}" if key in metrics else ""
    columns = (*_REGISTRY_COLUMNS[1:], *_RESOLVED_COLUMNS, "train_acc", "test_loss")
    _echo_table(rows, (*columns, "train_seconds"))
    champion = model_registry.CHAMPION
    versions = [row["version"] for row in rows if champion in row["aliases"].split(",")]
    click.echo(f"{name}@{champion}: version {versions[0] if versions else '(none)'}")


@registry.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default=model_registry.CHAMPION, help="The alias to move.")
def registry_promote(name: str, version: str, alias: str) -> None:
    """Point ALIAS at VERSION of NAME. The next train run recomputes `champion` from the
    versions' val_acc tags, so a manual champion lasts until a better version registers."""
    tracking.check_store()
    model_registry.promote(name, version, alias=alias)
    click.echo(f"{name}@{alias} -> version {version}")
    _echo_table(model_registry.registry_rows(name), _REGISTRY_COLUMNS)


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
