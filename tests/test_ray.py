"""The Ray executor: the same study through `executor=local` and `executor=ray` (a local Ray
instance with a small object store) gives the same children, params and report; executor
options a user can fix fail before any run starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO, VAL_SIZE, mlflow_run, run_in_process

BAD_EXECUTOR_OPTIONS = [
    (
        ["--executor", "ray", "--ray-address", "127.0.0.1:6379"],
        "a Ray cluster (ray_address=127.0.0.1:6379) cannot share the local store sqlite:///",
    ),
    (["--executor", "ray", "--cpus-per-trial", "0"], "cpus_per_trial must be in (0, 1024]"),
    (["--executor", "slurm"], "Invalid value for '--executor'"),
    (["--parallel", "0"], "parallel must be between 1 and 64 (got 0)"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_EXECUTOR_OPTIONS)
@pytest.mark.parametrize("command", ["main", "sweep"])
def test_bad_executor_options_fail_before_any_run(
    tracking_store, command, arguments, message, monkeypatch, capsys
):
    grid = ["--grid", "ema=0.99"] if command == "sweep" else []
    code, stderr = run_in_process(monkeypatch, capsys, command, *grid, *arguments)
    assert code in (1, 2)
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert "server.sh" in stderr or "ray_address" not in message
    assert mlflow.search_runs(search_all_experiments=True).empty


STUDY = {
    "norm": "batch,layer",
    "seeds": 2,
    "epochs": 1,
    "warmup_epochs": 0.5,
    "batch_size": 32,
    "val_size": VAL_SIZE,
    "parallel": 2,
}


def _study(executor: str, data: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """Run the study in a new experiment; its parent, its children and its report folder."""
    experiment = f"study-{executor}"
    mlflow.create_experiment(experiment)
    finished = mlflow_run(
        "main", {**STUDY, "executor": executor, "data": data}, experiment_name=experiment
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=[experiment])
    assert set(runs["status"]) == {"FINISHED"}
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    report = mlflow.artifacts.download_artifacts(
        f"runs:/{parent['run_id'].iloc[0]}/comparison", dst_path=str(data.parent / executor)
    )
    return parent, children.set_index("tags.mlflow.runName"), Path(report)


@pytest.mark.slow
def test_a_study_through_ray_matches_the_local_executor(tracking_store, image_folder):
    _, local, local_report = _study("local", image_folder)
    parent, ray, ray_report = _study("ray", image_folder)
    assert parent["params.executor"].iloc[0] == "ray"
    # the same steps; the second study's models are the registry's next versions
    versionless = lambda names: sorted(re.sub(r"-v\d+$", "", name) for name in names)  # noqa: E731
    assert versionless(local.index) == versionless(ray.index)
    assert len(ray) == 1 + 4 + 4 + 1  # prepare-stats, 2 norms x 2 seeds trained and evaluated
    trained = [name for name in ray.index if name.startswith("train-")]
    params = [c for c in ray.columns if c.startswith("params.") and c != "params.stats"]
    pd.testing.assert_frame_equal(local.loc[trained, params], ray.loc[trained, params])
    # every step ran on a Ray node, which tags it
    assert ray["tags.node"].notna().all() and "tags.node" not in local.columns
    # one thread per step either way: the same arithmetic, the same numbers and tables
    for column in ("metrics.test_acc", "metrics.train_loss"):
        assert local.loc[trained, column].tolist() == ray.loc[trained, column].tolist()
    for table in ("norms.csv", "runs.csv"):
        drop = ["run_id", "minutes", "seconds"]  # timings differ run to run
        mine = pd.read_csv(ray_report / table)
        theirs = pd.read_csv(local_report / table)
        kept = [c for c in mine.columns if not any(word in c for word in drop)]
        pd.testing.assert_frame_equal(mine[kept], theirs[kept])


@pytest.mark.slow
def test_sigterm_cancels_every_ray_task_and_leaves_no_run_running(
    tracking_store, image_folder, tmp_path
):
    sweep = subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "sweep", "--grid", "learning_rate=0.4",
            "--mode", "one-at-a-time", "--norm", "batch", "--epochs", "20", "--batch-size", "8",
            "--val-size", str(VAL_SIZE),
            "--parallel", "2", "--executor", "ray", "--data", str(image_folder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )  # fmt: skip
    lines = []
    for line in sweep.stdout:  # both trainings are under way
        lines.append(line)
        started = sum("running entry point train" in seen for seen in lines)
        if started == 2 and any("epoch  1/20" in seen for seen in lines):
            break
    sweep.send_signal(signal.SIGTERM)
    output = "".join(lines) + sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 130, output[-3000:]
    assert output.rstrip().endswith("error: interrupted; the run was ended KILLED")
    runs = mlflow.search_runs(search_all_experiments=True)
    statuses = dict(zip(runs["tags.mlflow.runName"], runs["status"], strict=True))
    assert statuses == {
        "sweep": "KILLED",
        "prepare-stats": "FINISHED",
        "train-batch-seed1": "KILLED",
        "train-batch-seed1-learning_rate=0.4": "KILLED",
    }, output[-3000:]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="core affinity is Linux's")
def test_ray_steps_claim_distinct_cores_and_run_pinned_to_them(tmp_path, monkeypatch):
    import contextlib

    from pipeline.executors import ray as ray_executor

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # lock files of this test only
    cores = sorted(os.sched_getaffinity(0))
    with contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        claimed = ray_executor._claim_cores(1, first)
        assert claimed == {cores[0]}
        if len(cores) > 1:
            assert ray_executor._claim_cores(1, second) == {cores[1]}
        # more than the free cores: none claimed, the step runs unpinned
        assert ray_executor._claim_cores(len(cores), second) is None
        show = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
        code, _ = ray_executor._run_step(
            f'python -c "{show}" > {tmp_path / "seen"}', {}, "", claimed
        )
        assert code == 0
        assert (tmp_path / "seen").read_text().strip() == f"[{cores[0]}] 1"
    with contextlib.ExitStack() as again:  # released with their step
        assert ray_executor._claim_cores(len(cores), again) == set(cores)


def test_a_cancelled_task_is_killed_whatever_ray_raises_and_a_dead_worker_is_lost():
    """Ray's forced cancel surfaces as TaskCancelledError, WorkerCrashedError, a RayTaskError
    wrapping the interrupt, or the signal's exit code the task returned: after stop() each is a
    killed step (its run ends KILLED), never a failure. Before stop() a dead worker is a lost
    step (rerun) and a task's own error is raised."""
    import threading

    import ray

    from pipeline.executors import StepCommand, StepLost
    from pipeline.executors import ray as ray_executor

    class FakeRay:
        exceptions = ray.exceptions

        def __init__(self, answer) -> None:
            self.answer = answer

        def get(self, reference):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    def executor(answer, *, stopping: bool) -> ray_executor.RayExecutor:
        made = object.__new__(ray_executor.RayExecutor)
        made._ray = FakeRay(answer)
        made._task = type(
            "Task", (), {"options": lambda self, **_: self, "remote": lambda self, *_: object()}
        )()
        made._options, made._threads, made._cores = {}, "1", 1
        made._running, made._lock, made._stopping = set(), threading.Lock(), threading.Event()
        if stopping:
            made._stopping.set()
        return made

    step = StepCommand("train-batch-seed1", "true", ".", {})
    wrapped = ray.exceptions.RayTaskError("_run_command", "Traceback ...", KeyboardInterrupt())
    crashed = ray.exceptions.WorkerCrashedError()
    for error in (wrapped, crashed, ray.exceptions.TaskCancelledError()):
        outcome = executor(error, stopping=True).run(step)
        assert (outcome.exit_code, outcome.killed) == (130, True)
    with pytest.raises(StepLost, match="its Ray node or worker died .WorkerCrashedError."):
        executor(crashed, stopping=False).run(step)
    with pytest.raises(ray.exceptions.RayTaskError):
        executor(wrapped, stopping=False).run(step)
    # The kill reached the step's process before its worker: the task returned its exit code.
    signalled = (-9, "", "node-1")
    outcome = executor(signalled, stopping=True).run(step)
    assert (outcome.exit_code, outcome.killed, outcome.node) == (-9, True, "node-1")
    outcome = executor(signalled, stopping=False).run(step)
    assert (outcome.exit_code, outcome.killed) == (-9, False)
    outcome = executor((0, "", "node-1"), stopping=True).run(step)  # it finished first
    assert (outcome.exit_code, outcome.killed) == (0, False)
