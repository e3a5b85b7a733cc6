"""Runs that survive: SIGTERM mid-training then `--resume`, several processes on a fresh SQLite
store, and the `parallel` option of `main`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, VAL_SIZE, run_cli
from mlflow.tracking import MlflowClient

from pipeline import cli, runs, tracking
from pipeline.config import TrainConfig
from pipeline.engine import EpochMetrics

EPOCH_METRICS = [name for name in EpochMetrics.__dataclass_fields__ if name != "epoch"]
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Deterministic per epoch; epoch_seconds is wall time.
EXACT_METRICS = [name for name in EPOCH_METRICS if name != "epoch_seconds"]


def _all_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def _steps(client: MlflowClient, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def _wait_for(condition, *, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = process.communicate()
            pytest.fail(f"process ended before {what}: {output[1][-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- kill and resume

# `python -m pipeline` with a fault injected: once epoch 1 is logged and its line printed, the
# training waits, so the test's SIGTERM lands mid-run, after epoch 1 and before epoch 2, every
# time (six tiny epochs could otherwise all finish before the signal arrives).
STOP_AFTER_FIRST_EPOCH = """
import sys, time, click
from pipeline import cli
printed = click.echo
def echo(message=None, *args, **kwargs):
    printed(message, *args, **kwargs)
    if isinstance(message, str) and message.startswith("epoch  1/"):
        time.sleep(600)  # ended by the test's SIGTERM, never by the clock
click.echo = echo
sys.argv = ["pipeline", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_resume_matches_an_uninterrupted_run(
    tracking_store, image_folder
):
    epochs = 6
    options = dict(
        norm="batch",
        epochs=epochs,
        batch_size=32,
        warmup_epochs=1.0,
        seed=3,
        registered_model="",
        val_size=VAL_SIZE,
    )
    arguments = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    arguments.append(f"--data={image_folder}")
    client = MlflowClient()

    interrupted = subprocess.Popen(
        [sys.executable, "-c", STOP_AFTER_FIRST_EPOCH, "train", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )

    def first_checkpoint():
        runs = _all_runs(client)
        if not runs:
            return None
        run_id = runs[0].info.run_id
        paths = [item.path for item in client.list_artifacts(run_id, "checkpoint")]
        return run_id if "checkpoint/last.pt" in paths else None

    run_id = _wait_for(
        first_checkpoint, timeout=240, what="the first checkpoint", process=interrupted
    )
    interrupted.send_signal(signal.SIGTERM)
    _, stderr = interrupted.communicate(timeout=120)

    assert interrupted.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "error: interrupted; the run was ended KILLED"
    assert "Traceback" not in stderr
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    done = _steps(client, run_id, "test_acc")
    assert done == [1], done  # stopped after epoch 1, as the injected wait ensures
    for name in EPOCH_METRICS:  # every metric of every finished epoch is there
        assert set(_steps(client, run_id, name)) == set(done), name
    checkpoint = tracking.load_checkpoint(run_id)
    assert checkpoint["epoch"] == done[-1]  # metrics and checkpoint are logged as one

    resumed = run_cli("train", *arguments, f"--resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert len(_all_runs(client)) == 1  # resumed in place, no second run

    # The uninterrupted run, in this process, with the same options and seed.
    reference_id = runs.train_model(TrainConfig(**options, data=str(image_folder)))
    for name in EPOCH_METRICS:
        # Appended at the right steps, each epoch once: 1..epochs.
        steps = _steps(client, run_id, name)
        assert sorted(steps) == list(range(1, epochs + 1)), (name, steps)
    for name in EXACT_METRICS:
        by_step = {}
        for metric in client.get_metric_history(run_id, name):
            by_step.setdefault(metric.step, set()).add(metric.value)
        expected = {m.step: m.value for m in client.get_metric_history(reference_id, name)}
        # The tolerance: none. On the CPU the resumed run computes the same floats.
        assert by_step == {step: {value} for step, value in expected.items()}, name
    resumed_state = tracking.load_checkpoint(run_id)
    reference_state = tracking.load_checkpoint(reference_id)
    assert resumed_state["epoch"] == reference_state["epoch"] == epochs
    for name, tensor in reference_state["model"].items():
        assert torch.equal(resumed_state["model"][name], tensor), name


# --------------------------------------------------------------------------- parallel runs


def _metric_rows(database: str) -> dict[str, dict[str, int]]:
    """Rows of the store's `metrics` table: run id -> metric key -> count."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT run_uuid, key, COUNT(*) FROM metrics GROUP BY run_uuid, key"
        ).fetchall()
    counts: dict[str, dict[str, int]] = {}
    for run_id, key, count in rows:
        counts.setdefault(run_id, {})[key] = count
    return counts


def _train_at_once(commands: list[list[str]], env: dict[str, str]) -> None:
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for command in commands
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]


@pytest.mark.slow
def test_trainings_at_once_on_a_fresh_sqlite_store_all_finish(isolated_environment, image_folder):
    """Four `python -m pipeline train` at once on a store nobody opened: check_store's lock
    lets one create the schema (no MLflow store plugin). Then two `mlflow run` at once on it,
    as `scripts/run.sh` starts them once it has opened the store the same way."""
    database = isolated_environment / "fresh.db"
    assert not database.exists()
    uri = f"sqlite:///{database}"
    epochs = 2
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "MLFLOW_TRACKING_URI": uri}
    options = {"epochs": epochs, "batch_size": 32, "data": image_folder, "val_size": VAL_SIZE}
    cli = [sys.executable, "-m", "pipeline", "train"]
    _train_at_once(
        [
            [*cli, *(f"--{k.replace('_', '-')}={v}" for k, v in options.items()), f"--seed={seed}"]
            for seed in range(1, 5)
        ],
        env,
    )
    project = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    _train_at_once(
        [
            [*project, "-e", "train", *(f"-P{k}={v}" for k, v in {**options, "seed": seed}.items())]
            for seed in range(5, 7)
        ],
        env,
    )

    client = MlflowClient(tracking_uri=uri)
    runs = _all_runs(client)
    assert len(runs) == 6
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.params["seed"] for run in runs} == {"1", "2", "3", "4", "5", "6"}
    rows = _metric_rows(str(database))
    for run in runs:
        counts = rows[run.info.run_id]
        # every epoch metric once per epoch, train_seconds once: nothing lost, nothing doubled
        assert counts == {**dict.fromkeys(EPOCH_METRICS, epochs), "train_seconds": 1}, counts
    versions = client.search_model_versions("name = 'cifar10-batch'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5, 6]
    best = max(versions, key=lambda v: (float(v.tags["val_acc"]), -int(v.version)))
    champion = client.get_model_version_by_alias("cifar10-batch", "champion")
    assert champion.version == best.version


# --------------------------------------------------------------------------- main, in parallel

# The study in tests/test_study.py runs with parallel=2 and checks the overlap and the output.


def test_parallel_must_be_a_positive_count(tracking_store, image_folder, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["pipeline", "main", "--parallel=0", f"--data={image_folder}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1] == "error: parallel must be between 1 and 64 (got 0)"
    assert _all_runs(MlflowClient()) == []
