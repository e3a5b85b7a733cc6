"""The runs of a workflow's steps: child runs created as `mlflow run` creates them (with
MLflow's public API: MlflowClient and the MLproject file read as YAML), and the finished runs a
step can reuse instead of running again.

This is the tracking side of the workflow (it talks to MLflow, as tracking.py does): the driver
owns every run, and an executor only runs a step's command with that run's `MLFLOW_*`
variables. `StepRuns` is the whole interface: find a finished step to reuse, point at it,
create a step's run, end it.
"""

from __future__ import annotations

import ast
import hashlib
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import REUSED_TAG, TrackingError

# The project whose code version decides whether a finished step is reused.
PROJECT_DIR = Path(__file__).resolve().parent.parent
CODE_VERSION_TAG = "pipeline.code_version"
# The code version a step's run was created with. `train --resume` reads it when it finishes a
# step whose workflow was interrupted (nothing else would set CODE_VERSION_TAG on it), so the
# next study reuses the run where the resuming code is the same (`finish_resumed_step`).
STARTED_CODE_VERSION_TAG = "pipeline.code_version_at_start"
# Where a step asks for no model in the registry, a finished run that registered one trained the
# same model: a sweep's trials reuse the study's trainings as their defaults. (Not the reverse:
# a step that registers would be left with nothing in the registry.)
REGISTERED_MODEL_PARAM = "registered_model"


# The module a training starts from: it and what it imports, transitively, is the code whose
# edits make a finished training stale (`code_version`).
TRAINING_ENTRY = "pipeline/training.py"


def code_version(project_dir: Path) -> str:
    """A hash of the code a training runs: `TRAINING_ENTRY` and every `pipeline` module it
    imports, transitively (model, norms, data, engine, optim, config, ...), not the report,
    plots, tracking or CLI, so that rewording the report leaves finished trainings reusable.
    Unlike `mlflow.source.git.commit` it changes with uncommitted edits too, so a dirty tree
    never reuses a training its edits would change."""
    digest = hashlib.sha256()
    for file in training_code(project_dir):
        digest.update(file.relative_to(project_dir).as_posix().encode() + b"\0")
        digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def training_code(project_dir: Path) -> list[Path]:
    """`TRAINING_ENTRY` and the package's modules it imports, transitively, sorted."""
    seen: set[Path] = set()
    pending = [project_dir / TRAINING_ENTRY]
    while pending:
        file = pending.pop()
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        pending.extend(_imported_modules(file, project_dir))
    return sorted(seen)


def _imported_modules(file: Path, project_dir: Path) -> list[Path]:
    """The files of the `pipeline` modules `file` imports, at any depth of its code."""
    names = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    files = []
    for name in names:
        if name.split(".")[0] != "pipeline":
            continue
        path = project_dir.joinpath(*name.split("."))
        files += [path.with_suffix(".py"), path / "__init__.py"]
    return [f for f in files if f.is_file()]


def finish_resumed_step(run_id: str, project_dir: Path) -> bool:
    """Give a step's run that `train --resume` finished the code version tag the workflow would
    have set at its end, where the code that resumed it is the code that started it; True if
    it did. A run not created as a step, not FINISHED, already tagged, or resumed by other code
    is left alone (a study then trains that step again)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    started = run.data.tags.get(STARTED_CODE_VERSION_TAG, "")
    if run.info.status != "FINISHED" or not started or CODE_VERSION_TAG in run.data.tags:
        return False
    if started != code_version(project_dir):
        return False
    client.set_tag(run_id, CODE_VERSION_TAG, started)
    return True


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
        client = MlflowClient()
        original = client.get_run(original_run_id)
        shown = ("step", "norm", "groups", "seed", "bn_stats")
        copied = {k: v for k, v in original.data.tags.items() if k in shown}
        pointer = client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={
                **copied,
                "mlflow.parentRunId": self.parent_run_id,
                "mlflow.runName": run_name,
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

        With public APIs only (MlflowClient, the MLproject file read as YAML), the run gets
        what `mlflow run` gives one: the project source, entry point and git commit tags, the
        entry point's parameters with their defaults; `command` is the entry point's command
        with the values shell-quoted, as `mlflow run` fills it in. An executor runs it with
        `env`, which lets the workflow read each step's output and run several steps at once,
        then `end` ends it.
        """
        entry = project_entry_point(self.project_dir, entry_point, run_name=run_name)
        command, logged = _entry_command(entry, parameters, run_name=run_name)
        run_tags = {
            "mlflow.source.name": str(self.project_dir),
            "mlflow.source.type": "PROJECT",
            "mlflow.project.entryPoint": entry_point,
            "mlflow.project.backend": "local",
            "mlflow.project.env": "local",
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": run_name,
            STARTED_CODE_VERSION_TAG: self.code_version,
            **_git_tags(self.project_dir),
            **(tags or {}),
        }
        client = MlflowClient()
        try:
            created = client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
            run_id = created.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])
        except MlflowException as error:
            message = str(error.message).splitlines()[0]
            raise TrackingError(f"step {run_name}: {message}") from None
        return ProjectStep(
            run_id=run_id,
            command=command,
            work_dir=str(self.project_dir),
            env={
                "MLFLOW_RUN_ID": run_id,
                "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            },
        )

    def tag(self, run_id: str, key: str) -> str:
        """The run's tag `key`, empty where it has none."""
        return MlflowClient().get_run(run_id).data.tags.get(key, "")

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


def project_entry_point(project_dir: Path, entry_point: str, *, run_name: str = "") -> dict:
    """The entry point's section of the project's MLproject file: `parameters`, `command`."""
    try:
        project = yaml.safe_load((project_dir / "MLproject").read_text())
        return project["entry_points"][entry_point]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        what = f"step {run_name}: " if run_name else ""
        raise TrackingError(
            f"{what}no entry point {entry_point!r} in {project_dir / 'MLproject'} ({error})"
        ) from None


def _entry_command(
    entry: dict, parameters: dict[str, str], *, run_name: str
) -> tuple[str, dict[str, str]]:
    """The entry point's command with `parameters` filled in as `mlflow run` fills them: a
    declared one into its `{name}` (its default where not given), any other appended as
    `--name value`; and the params the run logs (every one of both)."""
    declared = entry.get("parameters") or {}
    values: dict[str, str] = {}
    for name, spec in declared.items():
        default = spec.get("default") if isinstance(spec, dict) else None
        if name in parameters:
            values[name] = str(parameters[name])
        elif default is not None:
            values[name] = str(default)
        else:
            raise TrackingError(f"step {run_name}: no value for parameter {name!r}")
    extra = {name: str(value) for name, value in parameters.items() if name not in declared}
    command = str(entry["command"]).format(
        **{name: shlex.quote(value) for name, value in values.items()}
    )
    command = " ".join(
        [command, *(f"--{shlex.quote(k)} {shlex.quote(v)}" for k, v in extra.items())]
    )
    return command, {**values, **extra}


def _git_tags(project_dir: Path) -> dict[str, str]:
    """The commit (and remote) of the project's git checkout, as `mlflow run` tags them."""
    tags = {}
    for key, command in (
        ("mlflow.source.git.commit", ["git", "rev-parse", "HEAD"]),
        ("mlflow.source.git.repoURL", ["git", "config", "--get", "remote.origin.url"]),
    ):
        try:
            found = subprocess.run(
                command, cwd=project_dir, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if found.returncode == 0 and found.stdout.strip():
            tags[key] = found.stdout.strip()
    return tags


def _same_param(logged: str | None, value: str) -> bool:
    # `mlflow run` logs the shell-quoted value it substituted into the command.
    return logged is not None and logged in (value, shlex.quote(value))
