"""What every executor shares: a step's command and outcome, the executor interface, its
settings. `local` and `ray` import this module, never the package, so that the package can
pick between them without a cycle."""

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


def error_line(lines) -> str:
    """The child's one-line `error: ...` message, else its last line of output."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return next((line for line in reversed(lines) if line.strip()), "")
