"""Executors run the commands of a workflow's steps; the driver owns the steps' runs.

An executor gets a step's shell command with its run's `MLFLOW_*` variables and returns how it
ended; it never creates, ends or reads an MLflow run. `local` (this host) needs no extra
dependency; `ray` (a local Ray instance or a cluster) needs the `ray` extra.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

# One writer at a time on this process's stdout and stderr, for the steps' output and the
# workflow's own lines alike: lines never interleave.
OUTPUT_LOCK = threading.Lock()
# Where an executor has several machines, the step's environment names the one it runs on, and
# the step's run carries it as a tag from its start (a running trial shows its node).
NODE_ENV = "PIPELINE_NODE"
NODE_TAG = "node"


@dataclass(frozen=True)
class StepCommand:
    name: str  # the step's run name: prefixes its output lines and names it in errors
    command: str  # the entry point's shell command, parameters filled in
    work_dir: str
    env: dict[str, str]  # the step run's MLFLOW_* variables, added to the environment


@dataclass(frozen=True)
class StepOutcome:
    exit_code: int
    error_line: str  # the step's one-line `error: ...` message, else its last line of output
    node: str = ""  # the machine it ran on, where the executor has several (a Ray node id)
    killed: bool = False  # stopped by `stop` with no chance to end its run: end it KILLED


class StepLost(RuntimeError):
    """The step's machine went away mid-run (not the step's own failure): run it again, as a
    new run."""


class Executor(Protocol):
    parallel: int  # steps run at once, at most

    def run(self, step: StepCommand, *, lane: int, lanes: int) -> StepOutcome:
        """Run one step to its end. Called from up to `lanes` threads at once, each with its
        own `lane` in 0..lanes-1; with `lanes` > 1 the steps share the machine."""
        ...

    def placement(self, *, lane: int, lanes: int) -> str:
        """Where `run` puts a step of this lane, for the log (" on cores 0,1"), or ""."""
        ...

    def stop(self) -> None:
        """Stop every running step (Ctrl-C or SIGTERM): each ends its run KILLED."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a Ray connection); called once at the end."""
        ...


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSettings:
    """Which executor runs a workflow's steps, and how (the `executor` options of main and
    sweep)."""

    name: str = "local"
    parallel: int = 1  # steps at once, at most
    ray_address: str = ""  # empty: a local Ray instance; `auto` or host:port: a cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


def make_executor(settings: ExecutorSettings, *, project_dir) -> Executor:
    if settings.name == "ray":
        from pipeline.executors.ray import RayExecutor

        return RayExecutor(
            project_dir=project_dir,
            parallel=settings.parallel,
            address=settings.ray_address,
            cpus_per_trial=settings.cpus_per_trial,
            gpus_per_trial=settings.gpus_per_trial,
        )
    from pipeline.executors.local import LocalExecutor

    return LocalExecutor(parallel=settings.parallel)


def error_line(lines) -> str:
    """The child's one-line `error: ...` message, else its last line of output."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return next((line for line in reversed(lines) if line.strip()), "")
