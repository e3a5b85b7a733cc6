"""The `main` workflow: prepare-stats once, train each norm x seed, evaluate each model, compare.

This module decides which steps run, in what order and with which parameters; tracking.py runs
each step as an `mlflow run` child of the study's parent run. A step that already FINISHED with
the same parameters and code version is reused instead of rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.config import EvalConfig, TrainConfig, check_int_range

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
MAX_SEEDS = 100


class StepFailed(tracking.TrackingError):
    """A workflow step failed; the message names the step and its error."""


@dataclass(frozen=True)
class Step:
    """One child run: `name` is its run name, a human can tell the steps apart by it."""

    name: str
    entry_point: str
    parameters: dict[str, str]
    reuse: bool = True


@dataclass(frozen=True)
class StepResult:
    step: Step
    run_id: str  # the run holding the results: the reused run when `reused`
    reused: bool


def study_configs(norms: Sequence[str], seeds: int, **train_options) -> list[TrainConfig]:
    """One validated TrainConfig per norm and seed (seeds 1..seeds), before any run starts."""
    check_int_range("seeds", seeds, low=1, high=MAX_SEEDS)
    return [
        TrainConfig(norm=norm, seed=seed, **train_options)
        for norm in norms
        for seed in range(1, seeds + 1)
    ]


def code_version(project_dir: Path = PROJECT_DIR) -> str:
    """A hash of pipeline/*.py and MLproject: what `mlflow.source.git.commit` would be, except
    that it also changes with uncommitted edits, so a dirty tree never reuses stale results."""
    digest = hashlib.sha256()
    for file in [*sorted((project_dir / "pipeline").rglob("*.py")), project_dir / "MLproject"]:
        if file.is_file():
            digest.update(file.relative_to(project_dir).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_study(
    configs: Sequence[TrainConfig],
    *,
    project_dir: Path = PROJECT_DIR,
    echo: Callable[[str], None] = log.info,
) -> list[StepResult]:
    """Run the study's steps as children of the active run and return them in order."""
    version = code_version(project_dir)
    first = configs[0]

    def execute(steps: Sequence[Step]) -> list[StepResult]:
        # The steps of one stage are independent: a `parallel` option would run them at once.
        return [
            _execute(step, project_dir=project_dir, version=version, echo=echo) for step in steps
        ]

    (prepared,) = execute([Step("prepare-stats", "prepare-stats", {"data": first.data})])
    stats = first.stats or f"runs:/{prepared.run_id}/stats.json"

    trained = execute(
        [
            Step(
                f"train-{config.norm}-seed{config.seed}",
                "train",
                dataclasses.replace(config, stats=stats).as_params(),
            )
            for config in configs
        ]
    )

    evaluations = []
    for config, result in zip(configs, trained, strict=True):
        model_uri = tracking.registered_model_uri(result.run_id, config.registered_model)
        evaluation = EvalConfig(model_uri=model_uri, data=config.data, device=config.device)
        evaluations.append(
            Step(
                f"evaluate-{_model_label(model_uri, result.run_id)}",
                "evaluate",
                evaluation.as_params(),
            )
        )
    evaluated = execute(evaluations)

    parent = tracking.active_run_id()
    (compared,) = execute(
        [
            Step(
                "compare",
                "compare",
                {"parent_run_id": parent, "experiment_name": "", "filter_string": ""},
                reuse=False,
            )
        ]
    )
    return [prepared, *trained, *evaluated, compared]


def _model_label(model_uri: str, run_id: str) -> str:
    """`cifar10-layer-v3` for models:/cifar10-layer/3, as the evaluate run names itself."""
    if model_uri.startswith("models:/"):
        name, version = model_uri[len("models:/") :].split("/", 1)
        return f"{name}-v{version}"
    return run_id[:8]


def _execute(step: Step, *, project_dir: Path, version: str, echo) -> StepResult:
    if step.reuse:
        found = tracking.find_finished_step(
            entry_point=step.entry_point, parameters=step.parameters, code_version=version
        )
        if found:
            tracking.record_reused_step(original_run_id=found, run_name=step.name)
            echo(f"step {step.name}: reusing finished run {found} (same parameters and code)")
            return StepResult(step, found, reused=True)
    echo(f"step {step.name}: running entry point {step.entry_point}")
    with _stderr_tail() as tail:
        try:
            run_id = tracking.run_project_step(
                project_dir=project_dir,
                entry_point=step.entry_point,
                parameters=step.parameters,
                run_name=step.name,
                code_version=version,
            )
        except tracking.TrackingError as error:
            failure = error
        else:
            failure = None
    if failure is not None:
        raise StepFailed(f"step {step.name} failed: {_error_line(tail) or failure}")
    echo(f"step {step.name}: finished run {run_id}")
    return StepResult(step, run_id, reused=False)


def _error_line(lines: Sequence[str]) -> str:
    """The child's one-line `error: ...` message, else its last line of output."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return next((line for line in reversed(lines) if line.strip()), "")


@contextlib.contextmanager
def _stderr_tail(keep: int = 50) -> Iterator[deque[str]]:
    """Pass file descriptor 2 through unchanged while keeping its last lines, so a failed
    child step's own error message can be repeated in the workflow's error."""
    lines: deque[str] = deque(maxlen=keep)
    sys.stderr.flush()
    saved = os.dup(2)
    reader, writer = os.pipe()
    os.dup2(writer, 2)
    os.close(writer)

    def pump() -> None:
        pending = b""
        while chunk := os.read(reader, 65536):
            os.write(saved, chunk)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            lines.extend(line.decode(errors="replace").rstrip("\r") for line in complete)
        if pending:
            lines.append(pending.decode(errors="replace"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last writer here: the pump reads to EOF
        thread.join(timeout=10)
        os.close(reader)
        os.close(saved)
