"""The runs of a workflow's steps: child runs created as `mlflow run` creates them, and the
finished runs a step can reuse instead of running again.

This is the tracking side of the workflow (it talks to MLflow, as tracking.py does): the driver
owns every run, and an executor only runs a step's command with that run's `MLFLOW_*`
variables. `StepRuns` is the whole interface: find a finished step to reuse, point at it,
create a step's run, end it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import REUSED_TAG, TrackingError

CODE_VERSION_TAG = "pipeline.code_version"
# Where a step asks for no model in the registry, a finished run that registered one trained the
# same model: a sweep's trials reuse the study's trainings as their defaults. (Not the reverse:
# a step that registers would be left with nothing in the registry.)
REGISTERED_MODEL_PARAM = "registered_model"


@dataclass(frozen=True)
class ProjectStep:
    """A child run created as `mlflow run` creates one, and the command that fills it."""

    run_id: str
    command: str  # the entry point's shell command, parameters filled in
    work_dir: str
    env: dict[str, str]  # MLFLOW_RUN_ID, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID


@dataclass(frozen=True)
class StepRuns:
    """The child runs of one parent run, for the steps of one code version.

    Safe to use from several threads at once: nothing here reads MLflow's active run after
    `of_active_run` built it.
    """

    project_dir: Path
    parent_run_id: str
    experiment_id: str
    code_version: str

    @classmethod
    def of_active_run(cls, *, project_dir: Path, code_version: str) -> StepRuns:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no active MLflow run")
        return cls(project_dir, active.info.run_id, active.info.experiment_id, code_version)

    def find_finished(self, *, entry_point: str, parameters: dict[str, str]) -> str | None:
        """The newest FINISHED run of `entry_point` in the experiment with the same parameters
        and code version (MLflow's multistep example's `_already_ran`), or None. A step that
        registers no model matches runs that registered one (REGISTERED_MODEL_PARAM)."""
        query = (
            f"tags.`mlflow.project.entryPoint` = '{entry_point}' "
            f"and tags.`{CODE_VERSION_TAG}` = '{self.code_version}' "
            "and attributes.status = 'FINISHED'"
        )
        runs = MlflowClient().search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000
        )
        for candidate in runs:
            if REUSED_TAG in candidate.data.tags:
                continue
            logged = candidate.data.params
            if all(
                _same_param(logged.get(key), value)
                for key, value in parameters.items()
                if not (key == REGISTERED_MODEL_PARAM and value == "")
            ):
                return candidate.info.run_id
        return None

    def record_reused(self, *, original_run_id: str, run_name: str) -> str:
        """A FINISHED child that points at a reused run (tag `reused_run_id`), so the study
        still shows every step as one group in the UI; returns the pointer's id."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        client = MlflowClient()
        original = client.get_run(original_run_id)
        copied = {
            k: v for k, v in original.data.tags.items() if k in ("step", "norm", "groups", "seed")
        }
        pointer = client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={
                **copied,
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                MLFLOW_RUN_NAME: run_name,
                REUSED_TAG: original_run_id,
                "mlflow.note.content": f"Reused finished run {original_run_id} (same "
                "parameters and code version); its metrics and artifacts live there.",
            },
        )
        client.set_terminated(pointer.info.run_id, "FINISHED")
        return pointer.info.run_id

    def create(
        self,
        *,
        entry_point: str,
        parameters: dict[str, str],
        run_name: str,
        tags: dict[str, str] | None = None,
    ) -> ProjectStep:
        """Create the run of one MLproject entry point as a child of the parent run.

        The run gets what `mlflow.projects.run` gives it (source, entry point and git tags, the
        parameters with their defaults); an executor runs `command` with `env`, which lets the
        workflow read each step's output and run several steps at once, then `end` ends it.
        """
        from mlflow.exceptions import ExecutionException
        from mlflow.projects import utils as projects
        from mlflow.utils.mlflow_tags import (
            MLFLOW_PARENT_RUN_ID,
            MLFLOW_PROJECT_BACKEND,
            MLFLOW_PROJECT_ENV,
            MLFLOW_RUN_NAME,
        )

        uri = str(self.project_dir)
        try:
            work_dir = projects.fetch_and_validate_project(uri, None, entry_point, parameters)
            project = projects.load_project(work_dir)
            created = projects.get_or_create_run(
                None, uri, self.experiment_id, work_dir, None, entry_point, parameters
            )
            (command,) = projects.get_entry_point_command(project, entry_point, parameters, None)
        except (ExecutionException, MlflowException) as error:
            message = str(error.message).splitlines()[0]
            raise TrackingError(f"step {run_name}: {message}") from None
        run_id = created.info.run_id
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: run_name,
            MLFLOW_PROJECT_BACKEND: "local",
            MLFLOW_PROJECT_ENV: "local",
            **(tags or {}),
        }
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return ProjectStep(
            run_id=run_id,
            command=command,
            work_dir=work_dir,
            env=projects.get_run_env_vars(run_id, self.experiment_id),
        )

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, value)

    def end(self, run_id: str, *, succeeded: bool, killed: bool = False) -> str:
        """End a step's run as `mlflow run` would and return its final status.

        A run its command already ended (FINISHED, FAILED, KILLED) keeps that status; a RUNNING
        one becomes FINISHED or FAILED by the exit code. The code version tag is set only on a
        FINISHED run, so a failed or half-finished step is never reused.
        """
        client = MlflowClient()
        status = client.get_run(run_id).info.status
        if status == "RUNNING":
            status = "KILLED" if killed else "FINISHED" if succeeded else "FAILED"
            client.set_terminated(run_id, status)
        if status == "FINISHED" and succeeded:
            client.set_tag(run_id, CODE_VERSION_TAG, self.code_version)
        return status


def _same_param(logged: str | None, value: str) -> bool:
    # `mlflow run` logs the shell-quoted value it substituted into the command.
    return logged is not None and logged in (value, shlex.quote(value))
