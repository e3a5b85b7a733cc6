"""Executors run the commands of a workflow's steps; the driver owns the steps' runs.

An executor gets a step's shell command with its run's `MLFLOW_*` variables and returns how it
ended; it never creates, ends or reads an MLflow run. `local` (this host) needs no extra
dependency; `ray` (a local Ray instance or a cluster) needs the `ray` extra.
"""

from __future__ import annotations

from pipeline.executors.base import (
    EXECUTORS,
    NODE_ENV,
    NODE_TAG,
    OUTPUT_LOCK,
    Executor,
    ExecutorSettings,
    StepCommand,
    StepLost,
    StepOutcome,
    error_line,
)

__all__ = [
    "EXECUTORS",
    "NODE_ENV",
    "NODE_TAG",
    "OUTPUT_LOCK",
    "Executor",
    "ExecutorSettings",
    "StepCommand",
    "StepLost",
    "StepOutcome",
    "error_line",
    "make_executor",
]


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
