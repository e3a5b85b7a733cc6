"""The workflows: `main` (prepare-stats once, train each norm x seed, evaluate each model,
compare) and `sweep` (prepare-stats, a training per trial, compare with the lever table).

This module decides which steps run, in what order and with which parameters: step_runs.py
creates each step's run as `mlflow run` would (a child of the parent run), and an
executor runs the entry point's command in it, up to `parallel` steps at once. A step that
already FINISHED with the same parameters and code version is reused instead of rerun.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import corruptions, model_registry, tracking
from pipeline import sweep as sweeps
from pipeline.config import (
    BATCH_STATISTICS_NORMS,
    GENERATED_CORRUPTIONS,
    NO_CORRUPTIONS,
    ConfigError,
    EvalConfig,
    TrainConfig,
    check_choice,
    check_float_range,
    check_int_range,
    model_label,
    train_run_name,
)
from pipeline.evaluation import evaluate_run_name
from pipeline.executors import (
    EXECUTORS,
    NODE_TAG,
    OUTPUT_LOCK,
    Executor,
    ExecutorSettings,
    StepCommand,
    StepLost,
    make_executor,
)
from pipeline.step_runs import PROJECT_DIR, StepRuns, code_version
from pipeline.sweep import Trial
from pipeline.training import build_model

log = logging.getLogger(__name__)

MAX_SEEDS = 100
# The evaluate settings `main` passes to its evaluate steps (EvalConfig's fields).
STUDY_EVALUATION = ("corruptions", "corruption_tta", "bn_stats", "bn_stats_batch", "eval_seed")
# A stand-in model URI while a study's evaluation settings are checked, before any model exists.
_NO_MODEL_YET = "runs:/-/model"
MAX_PARALLEL = 64
LOCAL = ExecutorSettings()  # one step at a time on this host
MAX_ATTEMPTS = 3  # runs of one step whose machine went away, before the workflow gives up
RETRY_TAG = "retry_of"  # on a rerun step: the id of the run its lost attempt left FAILED


class StepFailed(tracking.TrackingError):
    """A workflow step failed; the message names the step and its error."""


@dataclass(frozen=True)
class Step:
    """One child run: `name` is its run name, a human can tell the steps apart by it."""

    name: str
    entry_point: str
    parameters: dict[str, str]
    reuse: bool = True
    # A sweep's trial: a training that diverged (its run FAILED, tagged `diverged`) is one of
    # the sweep's results, which the report names; the other steps go on.
    divergence_is_result: bool = False


@dataclass(frozen=True)
class StepResult:
    step: Step
    run_id: str  # the run holding the results: the reused run when `reused`
    reused: bool
    diverged: str = ""  # the run's `diverged` tag, where a trial diverged


def study_configs(norms: Sequence[str], seeds: int, **train_options) -> list[TrainConfig]:
    """One validated TrainConfig per norm and seed (seeds 1..seeds), before any run starts."""
    check_int_range("seeds", seeds, low=1, high=MAX_SEEDS)
    configs = [
        TrainConfig(norm=norm, seed=seed, **train_options)
        for norm in norms
        for seed in range(1, seeds + 1)
    ]
    check_models(configs)
    return configs


def check_models(configs: Sequence[TrainConfig]) -> None:
    """Build each distinct model once: a width or group count the model refuses, or one over
    the parameter budget, fails before any run starts."""
    shapes = {}
    for config in configs:
        shapes.setdefault(tuple(sorted(map(str, config.model_options().items()))), config)
    for config in shapes.values():
        build_model(config)


def study_evaluation(evaluation: dict, *, data: str, device: str) -> EvalConfig:
    """The evaluate settings of a study's steps, checked before any run starts: a corruption
    directory becomes absolute (the steps run in the project directory) and must hold the
    published files."""
    spec = evaluation.get("corruptions", NO_CORRUPTIONS)
    if spec not in (NO_CORRUPTIONS, GENERATED_CORRUPTIONS):
        spec = step_data(spec)
        corruptions.load_published(spec)  # memory-mapped: a check, not a read
    return EvalConfig(
        model_uri=_NO_MODEL_YET, data=data, device=device, **{**evaluation, "corruptions": spec}
    )


def step_data(data: str) -> str:
    """`data` as the steps must see it: they run in the project directory, so a relative path
    that exists here becomes absolute (a download directory or URL passes unchanged)."""
    path = Path(data).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else data


def check_executor(settings: ExecutorSettings) -> None:
    """Executor options a user can fix, before any run starts."""
    check_choice("executor", settings.name, EXECUTORS)
    check_int_range("parallel", settings.parallel, low=1, high=MAX_PARALLEL)
    check_float_range(
        "cpus_per_trial", settings.cpus_per_trial, low=0.0, high=1024.0, open_low=True
    )
    check_float_range("gpus_per_trial", settings.gpus_per_trial, low=0.0, high=64.0)
    if settings.name != "ray":
        return
    if importlib.util.find_spec("ray") is None:  # looked up, not imported: that is the executor's
        raise ConfigError('executor=ray needs Ray: pip install -e ".[ray]"')
    if settings.ray_address and tracking.store_is_local():
        raise ConfigError(
            f"a Ray cluster (ray_address={settings.ray_address}) cannot share the local store "
            f"{tracking.tracking_uri()}: each node would write its own; start the team server "
            "(scripts/server.sh) and set MLFLOW_TRACKING_URI to it"
        )


# --------------------------------------------------------------------------- parent runs


def study(
    norms: Sequence[str],
    seeds: int,
    *,
    options: dict,
    executor: ExecutorSettings,
    command: str,
    evaluation: dict | None = None,
    echo: Callable[[str], None] = log.info,
) -> tuple[str, list[StepResult]]:
    """The whole study under a parent run: its configs and evaluation settings (`evaluation`:
    STUDY_EVALUATION's values) checked before the run starts, its steps the run's children;
    returns the parent's id and the steps' results."""
    options = {**options, "data": step_data(options["data"])}
    configs = study_configs(norms, seeds, **options)
    evaluated = study_evaluation(evaluation or {}, data=options["data"], device=options["device"])
    evaluations = {key: getattr(evaluated, key) for key in STUDY_EVALUATION}
    description = (
        f"The study: {', '.join(norms)} norm x seeds 1..{seeds}: prepare-stats, "
        f"{len(configs)} trainings ({configs[0].epochs} epochs each, `{executor.name}` "
        f"executor, {executor.parallel} at a time), an evaluation of each registered "
        "model, then the side-by-side comparison (artifacts `comparison/report.html`)."
    )
    return _in_parent_run(
        "study",
        tags={"step": "main", "norms": ",".join(norms), "seeds": str(seeds)},
        params={
            "norm": ",".join(norms),
            "seeds": str(seeds),
            **_strings(executor, {**options, **evaluations}),
        },
        description=f"{description}\n\nCommand: `{command}`",
        steps=lambda: run_study(configs, evaluation=evaluated, executor=executor, echo=echo),
    )


def sweep(
    grid: str,
    *,
    mode: str,
    norms: Sequence[str],
    seeds: int,
    max_trials: int,
    options: dict,
    executor: ExecutorSettings,
    command: str,
    echo: Callable[[str], None] = log.info,
) -> tuple[str, list[StepResult]]:
    """A sweep under a parent run: every trial checked before the run starts, a `train` child
    per trial, then the lever table; returns the parent's id and the steps' results."""
    options = {**options, "data": step_data(options["data"])}
    trials, swept = sweeps.trials(
        grid, norms=norms, seeds=seeds, mode=mode, max_trials=max_trials, **options
    )
    check_models([trial.config for trial in trials])
    what = f"{len(trials)} trainings over {', '.join(swept)} ({mode})"
    description = (
        f"A sweep over {', '.join(swept)} ({mode}): {len(trials)} trainings of "
        f"{', '.join(norms)} norm x seeds 1..{seeds}, then the lever table, ranked on "
        "validation accuracy with the adoption rule (artifacts `comparison/report.html`)."
    )
    params = {"grid": grid, "mode": mode, "norm": ",".join(norms), "seeds": str(seeds)}
    params.update(_strings(executor, {"max_trials": max_trials, **options}))
    return _in_parent_run(
        "sweep",
        tags={"step": "sweep", "norms": ",".join(norms), "swept": ",".join(swept)},
        params=params,
        description=f"{description}\n\nCommand: `{command}`",
        steps=lambda: run_sweep(trials, swept=swept, executor=executor, echo=echo),
        started=lambda run_id: echo(f"sweep {run_id}: {what}"),
    )


def _in_parent_run(
    name: str,
    *,
    tags: dict[str, str],
    params: dict[str, str],
    description: str,
    steps: Callable[[], list[StepResult]],
    started: Callable[[str], None] = lambda run_id: None,
) -> tuple[str, list[StepResult]]:
    """The parent run of a study or a sweep: its params and description, its steps run as
    its children, and steps.json (each child's name, entry point, run and reuse)."""
    tracking.check_store()
    with tracking.run(run_name=name, tags=tags) as run_id:
        tracking.log_params(params)
        started(run_id)
        tracking.describe_run(description)
        results = steps()
        rows = [
            {
                "name": result.step.name,
                "entry_point": result.step.entry_point,
                "run_id": result.run_id,
                "reused": result.reused,
                **({"diverged": result.diverged} if result.diverged else {}),
            }
            for result in results
        ]
        tracking.log_dict({"steps": rows}, "steps.json")
    return run_id, results


def _strings(executor: ExecutorSettings, options: dict) -> dict[str, str]:
    """A parent run's params: where its steps run (every executor setting, so that a local and
    a Ray study have the same columns), then the options its trainings share."""
    params = {
        "parallel": str(executor.parallel),
        "executor": executor.name,
        "ray_address": executor.ray_address,
        "cpus_per_trial": str(executor.cpus_per_trial),
        "gpus_per_trial": str(executor.gpus_per_trial),
    }
    return {**params, **{key: str(value) for key, value in options.items()}}


def run_study(
    configs: Sequence[TrainConfig],
    *,
    evaluation: EvalConfig | None = None,
    project_dir: Path = PROJECT_DIR,
    executor: ExecutorSettings = LOCAL,
    echo: Callable[[str], None] = log.info,
) -> list[StepResult]:
    """Run the study's steps as children of the active run and return them in order.

    The steps of one stage (the trainings, the evaluations) are independent: up to the
    executor's `parallel` of them run at once. `evaluation` holds the evaluate steps'
    settings (its model_uri is each model's).
    """
    with _runner(project_dir=project_dir, executor=executor, echo=echo) as runner:
        return _study_steps(runner, configs, evaluation=evaluation)


def _study_steps(
    runner: StepRunner, configs: Sequence[TrainConfig], *, evaluation: EvalConfig | None
) -> list[StepResult]:
    prepared, stats = _prepare_stats(runner, configs[0])
    trained = runner.execute(
        [
            Step(
                train_run_name(config.norm, config.seed),
                "train",
                dataclasses.replace(config, stats=stats).as_params(),
            )
            for config in configs
        ]
    )

    evaluations = []
    for config, result in zip(configs, trained, strict=True):
        model_uri = model_registry.registered_model_uri(result.run_id, config.registered_model)
        evaluations += _evaluate_steps(
            config, evaluation, model_uri=model_uri, run_id=result.run_id
        )
    evaluated = runner.execute(evaluations)
    return [prepared, *trained, *evaluated, _compare(runner)]


def _evaluate_steps(
    config: TrainConfig, evaluation: EvalConfig | None, *, model_uri: str, run_id: str
) -> list[Step]:
    """A model's evaluate steps: with running statistics, as every model gets; with
    bn_stats=test-batch, a second one where its norm has batch statistics (the other norms
    are per image: they have nothing to switch)."""
    template = evaluation or EvalConfig(model_uri=model_uri, data=config.data, device=config.device)
    modes = ["running"]
    if template.bn_stats == "test-batch" and config.norm in BATCH_STATISTICS_NORMS:
        modes.append("test-batch")
    label = _model_label(model_uri, run_id)
    return [
        Step(
            evaluate_run_name(label, bn_stats=mode),
            "evaluate",
            dataclasses.replace(template, model_uri=model_uri, bn_stats=mode).as_params(),
        )
        for mode in modes
    ]


def run_sweep(
    trials: Sequence[Trial],
    *,
    swept: Sequence[str],
    project_dir: Path = PROJECT_DIR,
    executor: ExecutorSettings = LOCAL,
    echo: Callable[[str], None] = log.info,
) -> list[StepResult]:
    """Run a sweep's steps as children of the active run: prepare-stats, a `train` step per
    trial, then `compare --group-by` the swept parameters (the lever table is the report).
    Finished trials with the same parameters and code are reused, as a study's steps are. A
    trial that diverges is a result (the report names it), not the sweep's end."""
    with _runner(project_dir=project_dir, executor=executor, echo=echo) as runner:
        prepared, stats = _prepare_stats(runner, trials[0].config)
        steps = [
            Step(
                trial.name,
                "train",
                dataclasses.replace(trial.config, stats=stats).as_params(),
                divergence_is_result=True,
            )
            for trial in trials
        ]
        return [prepared, *runner.execute(steps), _compare(runner, group_by=swept)]


@contextlib.contextmanager
def _runner(
    *, project_dir: Path, executor: ExecutorSettings, echo: Callable[[str], None]
) -> Iterator[StepRunner]:
    check_executor(executor)
    step_runs = StepRuns.of_active_run(
        project_dir=project_dir, code_version=code_version(project_dir)
    )
    running = make_executor(executor, project_dir=project_dir)
    try:
        yield StepRunner(step_runs=step_runs, executor=running, echo=echo)
    finally:
        running.close()


def _prepare_stats(runner: StepRunner, first: TrainConfig) -> tuple[StepResult, str]:
    """The prepare-stats step and the stats every training then reads (unless given)."""
    (prepared,) = runner.execute([Step("prepare-stats", "prepare-stats", {"data": first.data})])
    return prepared, first.stats or f"runs:/{prepared.run_id}/stats.json"


def _compare(runner: StepRunner, *, group_by: Sequence[str] = ()) -> StepResult:
    parameters = {"parent_run_id": runner.parent_run_id, "experiment_name": "", "filter_string": ""}
    if group_by:
        parameters["group_by"] = ",".join(group_by)
    (compared,) = runner.execute([Step("compare", "compare", parameters, reuse=False)])
    return compared


def _model_label(model_uri: str, run_id: str) -> str:
    """`cifar10-layer-v3` for models:/cifar10-layer/3, as the evaluate run names itself."""
    if model_uri.startswith("models:/"):
        name, version = model_uri[len("models:/") :].split("/", 1)
        return model_label(run_id=run_id, name=name, version=version)
    return model_label(run_id=run_id)


class StepRunner:
    """Runs steps as child runs of the active run, through an executor, up to its `parallel`
    at once: the runs are created and ended here; the executor only runs their commands."""

    def __init__(self, *, step_runs: StepRuns, executor: Executor, echo: Callable[[str], None]):
        self.step_runs = step_runs
        self.executor = executor
        self._echo = echo

    @property
    def parent_run_id(self) -> str:
        return self.step_runs.parent_run_id

    def echo(self, message: str) -> None:
        with OUTPUT_LOCK:
            self._echo(message)

    def execute(self, steps: Sequence[Step]) -> list[StepResult]:
        """Run (or reuse) `steps`; return their results in order. A failed step fails the
        stage: steps not yet started are skipped, steps already running finish (so their runs
        are complete, and reused by the next study)."""
        results: list[StepResult | None] = [self._reuse(step) for step in steps]
        pending = [index for index, result in enumerate(results) if result is None]
        lanes = min(self.executor.parallel, len(pending))
        failures: list[StepFailed] = []
        if lanes <= 1:
            for index in pending:
                results[index] = self._run(steps[index], lane=0, lanes=1)
        else:
            free: queue.SimpleQueue = queue.SimpleQueue()
            for lane in range(lanes):
                free.put(lane)

            def job(step: Step) -> StepResult:
                lane = free.get()
                try:
                    return self._run(step, lane=lane, lanes=lanes)
                finally:
                    free.put(lane)

            with concurrent.futures.ThreadPoolExecutor(lanes, "step") as pool:
                futures = {index: pool.submit(job, steps[index]) for index in pending}
                try:
                    for index, future in futures.items():
                        if future.cancelled():
                            continue
                        try:
                            results[index] = future.result()
                        except StepFailed as error:
                            failures.append(error)
                            for waiting in futures.values():
                                waiting.cancel()  # only those not yet started
                except BaseException:  # Ctrl-C or SIGTERM lands in this (the main) thread
                    for future in futures.values():
                        future.cancel()
                    self.executor.stop()
                    raise
        if failures:
            raise failures[0]
        return results

    def _reuse(self, step: Step) -> StepResult | None:
        if not step.reuse:
            return None
        found = self.step_runs.find_finished(
            entry_point=step.entry_point, parameters=step.parameters
        )
        if not found:
            return None
        self.step_runs.record_reused(original_run_id=found, run_name=step.name)
        self.echo(f"step {step.name}: reusing finished run {found} (same parameters and code)")
        return StepResult(step, found, reused=True)

    def _run(self, step: Step, *, lane: int, lanes: int) -> StepResult:
        """Run `step` in a new child run. A step whose machine went away is rerun as a new
        run tagged `retry_of` the lost one (ended FAILED): never two attempts in one run."""
        retry_of = ""
        for attempt in range(MAX_ATTEMPTS):
            created = self.step_runs.create(
                entry_point=step.entry_point,
                parameters=step.parameters,
                run_name=step.name,
                tags={RETRY_TAG: retry_of} if retry_of else {},
            )
            command = StepCommand(step.name, created.command, created.work_dir, created.env)
            try:
                where = self.executor.placement(lane=lane, lanes=lanes)
                self.echo(f"step {step.name}: running entry point {step.entry_point}{where}")
                outcome = self.executor.run(command, lane=lane, lanes=lanes)
                break
            except StepLost as lost:
                self.step_runs.end(created.run_id, succeeded=False)
                if attempt + 1 == MAX_ATTEMPTS:
                    raise StepFailed(f"{lost}, {MAX_ATTEMPTS} times") from None
                self.echo(f"{lost}: run {created.run_id} FAILED; running the step again")
                retry_of = created.run_id
            except BaseException as error:
                # Interrupted (Ctrl-C, SIGTERM: KILLED) or an executor error (FAILED): the step
                # may have stopped before its command could end its own run (a signal during
                # Python's start-up), or before it started.
                interrupted = not isinstance(error, Exception)
                self.step_runs.end(created.run_id, succeeded=False, killed=interrupted)
                raise
        if outcome.node:
            self.step_runs.set_tags(created.run_id, {NODE_TAG: outcome.node})
        status = self.step_runs.end(
            created.run_id, succeeded=outcome.exit_code == 0, killed=outcome.killed
        )
        if outcome.exit_code != 0 or status != "FINISHED":
            if step.divergence_is_result and status == "FAILED":
                diverged = self.step_runs.tag(created.run_id, tracking.DIVERGED_TAG)
                if diverged:
                    self.echo(f"step {step.name}: run {created.run_id} diverged ({diverged})")
                    return StepResult(step, created.run_id, reused=False, diverged=diverged)
            reason = outcome.error_line or f"exit code {outcome.exit_code}, run {status}"
            raise StepFailed(f"step {step.name} failed: {reason}")
        self.echo(f"step {step.name}: finished run {created.run_id}")
        return StepResult(step, created.run_id, reused=False)
