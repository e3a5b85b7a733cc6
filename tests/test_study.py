"""The study: `mlflow run .` (the `main` workflow) end to end, compare's report, step reuse,
the champion alias and registry lookups."""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, VAL_SIZE, mlflow_run, run_cli, write_image_folder
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import cli, model_registry, tracking
from pipeline.config import ConfigError

NORMS = ("batch", "layer")
STUDY_PARAMS = {
    "norm": ",".join(NORMS),
    "epochs": 2,
    "warmup_epochs": 0.5,
    "batch_size": 32,
    "val_size": VAL_SIZE,
    "parallel": 2,  # the two trainings (and the two evaluations) at once
}
EXPECTED_STEPS = {
    "prepare-stats",
    "train-batch-seed1",
    "train-layer-seed1",
    "evaluate-cifar10-batch-v1",
    "evaluate-cifar10-layer-v1",
    "compare",
}


# --------------------------------------------------------------------------- the study, run twice


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """`mlflow run .` with no -e (so `main`) on synthetic data, then the same command again."""
    base = tmp_path_factory.mktemp("study")
    data = write_image_folder(base / "data")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    }
    env.update(
        MLFLOW_TRACKING_URI=uri,
        PIPELINE_CACHE_DIR=str(base / "cache"),
        TQDM_DISABLE="1",
        PYTHONPATH=str(REPO),
    )
    MlflowClient(tracking_uri=uri).search_experiments()  # create the schema once, up front
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    for key, value in {**STUDY_PARAMS, "data": data}.items():
        command += ["-P", f"{key}={value}"]

    def run():
        return subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=env, cwd=base
        )

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    return SimpleNamespace(
        uri=uri, cache=str(base / "cache"), data=data, first=first, second=second
    )


@pytest.fixture
def store(study, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", study.cache)
    return MlflowClient()


def _all_runs() -> pd.DataFrame:
    return mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time ASC"])


def _parents() -> pd.DataFrame:
    runs = _all_runs()
    return runs[runs["tags.mlflow.project.entryPoint"] == "main"].reset_index(drop=True)


def _children(parent_id: str) -> pd.DataFrame:
    runs = _all_runs()
    return runs[runs["tags.mlflow.parentRunId"] == parent_id].set_index("tags.mlflow.runName")


def _download_comparison(run_id: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/comparison"))


@pytest.mark.slow
def test_main_is_the_default_entry_point_and_nests_every_step(store):
    parents = _parents()
    assert len(parents) == 2
    assert set(parents["status"]) == {"FINISHED"}
    assert parents.loc[0, "params.norm"] == "batch,layer"
    description = parents.loc[0, "tags.mlflow.note.content"]  # the UI's run description
    assert description.startswith("The study: batch, layer norm x seeds 1..1")
    assert "Command: `python -m pipeline main --norm batch,layer" in description
    children = _children(parents.loc[0, "run_id"])
    assert set(children.index) == EXPECTED_STEPS
    assert set(children["status"]) == {"FINISHED"}
    prepare_id = children.loc["prepare-stats", "run_id"]
    for norm in NORMS:
        train = children.loc[f"train-{norm}-seed1"]
        assert train["tags.mlflow.project.entryPoint"] == "train"
        assert train["params.norm"] == norm
        assert train["params.seed"] == "1"
        # main's training parameters pass through to every train step
        assert train["params.epochs"] == "2"
        assert train["params.batch_size"] == "32"
        assert train["params.warmup_epochs"] == "0.5"
        assert train["params.stats"] == f"runs:/{prepare_id}/stats.json"
        evaluation = children.loc[f"evaluate-cifar10-{norm}-v1"]
        assert evaluation["params.model_uri"] == f"models:/cifar10-{norm}/1"
        assert evaluation["tags.source_run_id"] == train["run_id"]


@pytest.mark.slow
def test_compare_report_has_every_artifact_and_the_childrens_numbers(store):
    parent_id = _parents().loc[0, "run_id"]
    children = _children(parent_id)
    directory = _download_comparison(parent_id)
    for name in (
        "report.md",
        "norms.csv",
        "norms.md",
        "runs.csv",
        "per_class_accuracy.csv",
        "plots/test_curves.png",
        "plots/train_vs_test.png",
        "plots/misclassified.png",
        "plots/per_class_accuracy.png",
    ):
        assert (directory / name).is_file(), name
    # The tables as MLflow tables too, which the UI shows as tables. (`mlflow.load_table`
    # would look in the active experiment, whichever that is in this process: name the run's.)
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    norms = client.load_table(experiment_id, "comparison/tables/norms.json", run_ids=[parent_id])
    assert list(norms["norm"]) == list(NORMS) and "final_val_acc_mean" in norms
    runs = client.load_table(experiment_id, "comparison/tables/runs.json", run_ids=[parent_id])
    assert len(runs) == len(NORMS)
    report = (directory / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert "plots/misclassified.png" in links
    for link in links:
        assert not link.startswith(("/", "http")) and (directory / link).is_file(), link

    with open(directory / "norms.csv") as handle:
        table = {row["norm"]: row for row in csv.DictReader(handle)}
    assert list(table) == list(NORMS)
    per_class = pd.read_csv(directory / "per_class_accuracy.csv", index_col="class")
    for norm in NORMS:
        train = children.loc[f"train-{norm}-seed1"]
        history = store.get_metric_history(train["run_id"], "test_acc")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
        row = table[norm]
        assert row["runs"] == "1" and row["seeds"] == "1" and row["epochs"] == "2"
        assert float(row["final_test_acc_mean"]) == pytest.approx(train["metrics.test_acc"])
        validation = store.get_metric_history(train["run_id"], "val_acc")
        assert float(row["final_val_acc_mean"]) == pytest.approx(train["metrics.val_acc"])
        assert float(row["best_val_acc_mean"]) == pytest.approx(max(m.value for m in validation))
        assert float(row["final_train_acc_mean"]) == pytest.approx(train["metrics.train_acc"])
        assert float(row["train_test_gap_mean"]) == pytest.approx(
            train["metrics.train_acc"] - train["metrics.test_acc"]
        )
        seconds = [m.value for m in store.get_metric_history(train["run_id"], "epoch_seconds")]
        assert float(row["epoch_seconds_mean"]) == pytest.approx(np.mean(seconds))
        assert row["final_test_acc_std"] == ""  # one seed: no spread to report

        evaluation_id = children.loc[f"evaluate-cifar10-{norm}-v1", "run_id"]
        logged = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(f"runs:/{evaluation_id}/evaluation.json")
            ).read_text()
        )
        for name, accuracy in logged["per_class_accuracy"].items():
            assert per_class.loc[name, norm] == pytest.approx(accuracy)

    leader = max(NORMS, key=lambda n: float(table[n]["final_val_acc_mean"]))  # chosen on val
    findings = report.split("## Findings", 1)[1].split("##", 1)[0]
    assert f"**{leader}** norm leads" in findings
    assert "one seed per norm" in findings


@pytest.mark.slow
def test_main_runs_the_steps_of_a_stage_in_parallel_with_prefixed_output(study, store):
    children = _children(_parents().loc[0, "run_id"])
    assert _parents().loc[0, "params.parallel"] == "2"
    first, second = (children.loc[f"train-{norm}-seed1"] for norm in NORMS)
    # the two trainings overlapped in time
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]
    lines = study.first.stdout.splitlines()
    for norm in NORMS:  # each step's lines carry its name
        assert any(line.startswith(f"[train-{norm}-seed1] epoch  2/2") for line in lines)
    shares = [line for line in lines if "running entry point train on cores" in line]
    assert len(shares) == len(NORMS)
    if len(os.sched_getaffinity(0)) >= 2:  # each training pinned to its own cores
        first_cores, second_cores = (set(line.rsplit(" ", 1)[1].split(",")) for line in shares)
        assert not first_cores & second_cores, shares


@pytest.mark.slow
def test_rerunning_main_reuses_finished_steps(study, store):
    assert study.second.stdout.count("reusing finished run") == len(EXPECTED_STEPS) - 1
    assert "step compare: running" in study.second.stdout
    runs = _all_runs()
    real_trains = runs[runs["tags.mlflow.project.entryPoint"] == "train"]
    assert len(real_trains) == len(NORMS)  # nothing was trained twice
    first, second = _parents()["run_id"]
    before, after = _children(first), _children(second)
    assert set(after.index) == EXPECTED_STEPS
    assert set(after["status"]) == {"FINISHED"}
    for name in EXPECTED_STEPS - {"compare"}:
        assert after.loc[name, "tags.reused_run_id"] == before.loc[name, "run_id"]
    assert pd.isna(after.loc["compare", "tags.reused_run_id"])
    # the second study's report follows the pointers to the same runs and numbers
    old = pd.read_csv(_download_comparison(first) / "norms.csv")
    new = pd.read_csv(_download_comparison(second) / "norms.csv")
    pd.testing.assert_frame_equal(old, new)


@pytest.mark.slow
def test_registry_lookups_by_version_and_alias_resolve_to_the_training_run(store):
    children = _children(_parents().loc[0, "run_id"])
    for norm in NORMS:
        train_id = children.loc[f"train-{norm}-seed1", "run_id"]
        by_version = tracking.resolve_model_uri(f"models:/cifar10-{norm}/1")
        by_alias = tracking.resolve_model_uri(f"models:/cifar10-{norm}@champion")
        assert by_version.run_id == by_alias.run_id == train_id
        version = store.get_model_version(f"cifar10-{norm}", "1")
        assert version.tags["norm"] == norm and version.tags["seed"] == "1"
        assert version.tags["run_id"] == train_id
        assert float(version.tags["test_acc"]) == pytest.approx(
            children.loc[f"train-{norm}-seed1", "metrics.test_acc"], abs=1e-4
        )

    listed = run_cli("registry", "list")
    assert listed.returncode == 0, listed.stderr
    assert "cifar10-batch" in listed.stdout and "cifar10-layer" in listed.stdout
    assert "champion" in listed.stdout
    shown = run_cli("registry", "show", "cifar10-layer")
    assert shown.returncode == 0, shown.stderr
    assert "cifar10-layer@champion: version 1" in shown.stdout
    assert "train_acc" in shown.stdout
    missing = run_cli("registry", "promote", "cifar10-layer", "99")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: cannot promote cifar10-layer version 99")
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_accepts_the_champion_alias(study, store):
    children = _children(_parents().loc[0, "run_id"])
    result = mlflow_run(
        "evaluate", {"model_uri": "models:/cifar10-layer@champion", "data": study.data}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _all_runs()
    latest = runs[runs["tags.model_uri"] == "models:/cifar10-layer@champion"].iloc[-1]
    assert latest["status"] == "FINISHED"
    assert latest["tags.mlflow.runName"] == "evaluate-cifar10-layer-v1"
    assert latest["tags.source_run_id"] == children.loc["train-layer-seed1", "run_id"]
    assert latest["metrics.test_acc"] == pytest.approx(
        children.loc["train-layer-seed1", "metrics.test_acc"]
    )


# --------------------------------------------------------------------------- a failing step


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.slow
def test_a_failed_step_fails_the_study_and_keeps_finished_steps(tracking_store, image_folder):
    result = mlflow_run(
        "main",
        {
            "norm": "layer",
            "device": "cuda",
            "epochs": 1,
            "warmup_epochs": 0,
            "data": image_folder,
            "val_size": VAL_SIZE,
        },
    )
    assert result.returncode != 0
    assert "error: step train-layer-seed1 failed: " in result.stderr
    assert "device 'cuda' is not available" in result.stderr
    parent = _parents().iloc[0]
    assert parent["status"] == "FAILED"
    children = _children(parent["run_id"])
    assert children.loc["prepare-stats", "status"] == "FINISHED"
    assert children.loc["train-layer-seed1", "status"] == "FAILED"
    assert "compare" not in children.index


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_interrupt_before_a_step_ends_its_own_run_leaves_no_run_running(
    tracking_store, tmp_path, parallel
):
    """A step stopped before its command could end its run (a signal while Python starts)
    still ends KILLED: the workflow ends the runs of the steps it stopped, in sequence and in
    parallel. Here the step is `sleep`, which never touches its run."""
    from pipeline.executors.local import LocalExecutor
    from pipeline.step_runs import StepRuns
    from pipeline.workflow import Step, StepRunner

    (tmp_path / "MLproject").write_text(
        "name: nap\nentry_points:\n  nap:\n    parameters: {name: string}\n"
        "    command: touch started-{name} && sleep 60\n"
    )
    steps = [Step(f"nap-{n}", "nap", {"name": str(n)}, reuse=False) for n in range(parallel)]

    def interrupt(signum, frame):  # what the CLI's SIGTERM handler does, on SIGUSR1 here
        raise tracking.RunInterrupted

    def interrupt_once_all_started(main: int) -> None:
        while len(list(tmp_path.glob("started-*"))) < parallel:
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    with mlflow.start_run(run_name="parent") as parent:
        runner = StepRunner(
            step_runs=StepRuns.of_active_run(project_dir=tmp_path, code_version="test"),
            executor=LocalExecutor(parallel=parallel),
            echo=lambda message: None,
        )
        watcher = threading.Thread(
            target=interrupt_once_all_started, args=(threading.get_ident(),), daemon=True
        )
        watcher.start()
        try:
            with pytest.raises(tracking.RunInterrupted):
                runner.execute(steps)
        finally:
            signal.signal(signal.SIGUSR1, previous)
    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    assert sorted(run.info.run_name for run in children) == [step.name for step in steps]
    assert {run.info.status for run in children} == {"KILLED"}


def test_a_diverged_trial_is_a_result_but_a_diverged_study_step_fails(tracking_store, tmp_path):
    """A sweep's trial that diverges (its run FAILED, tagged `diverged`) is one of the sweep's
    results and the other trials go on; the same failure in a study's step stops the study."""
    from pipeline.executors.local import LocalExecutor
    from pipeline.step_runs import StepRuns
    from pipeline.workflow import Step, StepFailed, StepRunner

    (tmp_path / "step.py").write_text(
        "import os, sys\n"
        "from mlflow import MlflowClient\n"
        "if sys.argv[1] == 'nan':  # what train does on a non-finite loss\n"
        "    run = os.environ['MLFLOW_RUN_ID']\n"
        "    MlflowClient().set_tag(run, 'diverged', 'training diverged at epoch 1 (loss nan)')\n"
        "    MlflowClient().set_terminated(run, 'FAILED')\n"
        "    sys.exit('error: training diverged at epoch 1 (loss nan)')\n"
    )
    (tmp_path / "MLproject").write_text(
        "name: trial\nentry_points:\n  trial:\n    parameters: {loss: string}\n"
        f"    command: {sys.executable} step.py {{loss}}\n"
    )

    def trial(loss: str, *, divergence_is_result: bool) -> Step:
        return Step(f"trial-{loss}", "trial", {"loss": loss}, False, divergence_is_result)

    with mlflow.start_run(run_name="parent") as parent:
        runner = StepRunner(
            step_runs=StepRuns.of_active_run(project_dir=tmp_path, code_version="test"),
            executor=LocalExecutor(parallel=1),
            echo=lambda message: None,
        )
        diverged, finished = runner.execute(
            [trial("nan", divergence_is_result=True), trial("ok", divergence_is_result=True)]
        )
        with pytest.raises(StepFailed, match="step trial-nan failed: training diverged at epoch 1"):
            runner.execute([trial("nan", divergence_is_result=False)])
    assert diverged.diverged == "training diverged at epoch 1 (loss nan)"
    assert not finished.diverged
    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    statuses = sorted((run.info.run_name, run.info.status) for run in children)
    assert statuses == [("trial-nan", "FAILED"), ("trial-nan", "FAILED"), ("trial-ok", "FINISHED")]


@pytest.mark.slow
def test_main_rejects_bad_values_before_starting_a_step(tracking_store):
    result = run_cli("main", "--norm", "batch,weight")
    assert result.returncode == 1
    assert "norm must be one of batch, group, layer, instance, none, frn (got 'weight')" in (
        result.stderr
    )
    result = run_cli("main", "--seeds", "0")
    assert result.returncode == 1
    assert "seeds must be between 1 and 100 (got 0)" in result.stderr
    assert _all_runs().empty


# --------------------------------------------------------------------------- champion alias


def _register(
    client: MlflowClient, name: str, val_acc: float | None, index: int, test_acc: float = 0.5
) -> str:
    """A version tagged as train tags it: `val_acc` (None: a run without a validation split)
    and a `test_acc` that the champion must never look at while a version has `val_acc`."""
    tags = {"test_acc": f"{test_acc:.4f}"}
    if val_acc is not None:
        tags["val_acc"] = f"{val_acc:.4f}"
    version = client.create_model_version(name, source=f"/tmp/not-a-model-{index}", tags=tags)
    return str(version.version)


def _registered(name: str, accuracies: tuple[float, ...]) -> MlflowClient:
    """A registered model `name` with a version per accuracy (versions 1, 2, ...)."""
    client = MlflowClient()
    client.create_registered_model(name)
    for index, accuracy in enumerate(accuracies):
        _register(client, name, accuracy, index)
    return client


def _champion(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, model_registry.CHAMPION).version)


def test_champion_moves_only_to_a_better_version(tracking_store):
    client = MlflowClient()
    client.create_registered_model("cifar10-test")
    steps = [(0.50, "1"), (0.40, "1"), (0.70, "3"), (0.70, "3"), (0.71, "5")]
    for index, (accuracy, expected) in enumerate(steps):
        _register(client, "cifar10-test", accuracy, index)
        assert model_registry.update_champion("cifar10-test") == expected
        assert _champion(client, "cifar10-test") == expected


def test_champion_is_chosen_on_validation_never_on_test(tracking_store):
    client = MlflowClient()
    client.create_registered_model("cifar10-test")
    steps = [  # (val_acc, test_acc, the champion after it registers)
        (0.80, 0.70, "1"),
        (0.78, 0.95, "1"),  # better on test, worse on validation: no move
        (0.81, 0.60, "3"),
        (None, 0.99, "3"),  # trained without a validation split: ranks after every one with it
    ]
    for index, (val_acc, test_acc, expected) in enumerate(steps):
        _register(client, "cifar10-test", val_acc, index, test_acc=test_acc)
        assert model_registry.update_champion("cifar10-test") == expected
    legacy = MlflowClient()
    legacy.create_registered_model("cifar10-legacy")  # no version has val_acc: test decides
    for index, test_acc in enumerate((0.70, 0.75)):
        _register(legacy, "cifar10-legacy", None, index, test_acc=test_acc)
    assert model_registry.update_champion("cifar10-legacy") == "2"


def _staged_writer(name, accuracy, index, turns, all_read, reads, lock_dir) -> None:
    """A trial on its own machine (no lock shared with the others: its own TMPDIR) that
    registers its version, then updates `champion` with its first read of the registry staged
    so that the race is certain, not left to the scheduler: writer i registers after writer
    i-1 has read (so it sees versions 1..i+1 only), and no writer writes before every one has
    read. Each then writes its stale best; `update_champion` must still settle on the best of
    all. `reads` collects each writer's first read."""
    os.environ["TMPDIR"] = lock_dir
    original = model_registry._best_version
    first = [True]

    def staged(client, model_name):
        best = original(client, model_name)
        if first[0]:
            first[0] = False
            reads.put(best)
            if index + 1 < len(turns):
                turns[index + 1].set()
            all_read.wait()
        return best

    model_registry._best_version = staged
    try:
        turns[index].wait()
        _register(MlflowClient(), name, accuracy, index)
        model_registry.update_champion(name)
    finally:
        model_registry._best_version = original


@contextlib.contextmanager
def _watched_registry_lock(arrived, inside, peak) -> Iterator[None]:
    """While active: each writer counts itself in `arrived` as it reaches the registry lock;
    the first to hold it reads only once every writer has arrived (so all of them contend),
    and `peak` records how many ever read the registry at once."""
    original_lock, original_best = model_registry.stores.file_lock, model_registry._best_version

    class Announced:
        def __init__(self, lock) -> None:
            self.lock = lock

        def __enter__(self):
            with arrived.get_lock():
                arrived.value += 1
            self.lock.acquire()
            return self

        def __exit__(self, *_):
            self.lock.release()

    def counted(client, model_name):
        with inside.get_lock():
            inside.value += 1
            peak.value = max(peak.value, inside.value)
        deadline = time.monotonic() + 60
        while arrived.value < len(ACCURACIES) and time.monotonic() < deadline:
            time.sleep(0.01)  # waits for an event (every writer at the lock), not for time
        try:
            return original_best(client, model_name)
        finally:
            with inside.get_lock():
                inside.value -= 1

    model_registry.stores.file_lock = lambda *a, **k: Announced(original_lock(*a, **k))
    model_registry._best_version = counted
    try:
        yield
    finally:
        model_registry.stores.file_lock, model_registry._best_version = original_lock, original_best


def _locked_writer(name, accuracy, index, barrier, watched=None) -> None:
    """A trial on the same machine as the others: registers at the barrier, then updates
    `champion`; in a process of its own, with the registry lock watched (`watched`)."""
    with _watched_registry_lock(*watched) if watched else contextlib.nullcontext():
        barrier.wait()
        _register(MlflowClient(), name, accuracy, index)
        model_registry.update_champion(name)


ACCURACIES = (0.61, 0.74, 0.55, 0.70)  # versions 1..4: the partial bests are 1, 2, 2, 2
CONTEXT = multiprocessing.get_context("spawn")  # its primitives serve threads and processes


def _start(target, args, *, processes: bool):
    worker = (CONTEXT.Process if processes else threading.Thread)(target=target, args=args)
    worker.start()
    return worker


def _join(workers) -> None:
    for worker in workers:
        worker.join(timeout=180)
        assert getattr(worker, "exitcode", 0) == 0


def _champion_is_the_best(client, name: str) -> None:
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == len(ACCURACIES)
    best = max(versions, key=lambda v: float(v.tags["val_acc"]))
    assert best.tags["val_acc"] == "0.7400"
    assert _champion(client, name) == str(best.version)


@pytest.mark.parametrize("processes", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_writers_on_one_machine_contend_for_the_registry_lock_and_read_one_at_a_time(
    tracking_store, processes
):
    client = MlflowClient()
    name = f"cifar10-{'processes' if processes else 'threads'}"
    client.create_registered_model(name)
    watched = tuple(CONTEXT.Value("i", 0) for _ in range(3))  # arrived, inside, peak
    arrived, _, peak = watched
    barrier = CONTEXT.Barrier(len(ACCURACIES))
    # Threads share this process's patch; each process patches its own module.
    with contextlib.nullcontext() if processes else _watched_registry_lock(*watched):
        _join(
            [
                _start(
                    _locked_writer,
                    (name, accuracy, index, barrier, watched if processes else None),
                    processes=processes,
                )
                for index, accuracy in enumerate(ACCURACIES)
            ]
        )
    assert arrived.value >= len(ACCURACIES) and peak.value == 1
    _champion_is_the_best(client, name)


@pytest.mark.slow
def test_champion_is_the_best_when_writers_sharing_no_lock_race(tracking_store, tmp_path):
    client = MlflowClient()
    client.create_registered_model("cifar10-hosts")
    turns = [CONTEXT.Event() for _ in ACCURACIES]
    turns[0].set()
    all_read, reads = CONTEXT.Barrier(len(ACCURACIES)), CONTEXT.Queue()
    lock_dirs = []
    for index in range(len(ACCURACIES)):
        (tmp_path / f"host{index}").mkdir()
        lock_dirs.append(str(tmp_path / f"host{index}"))
    _join(
        [
            _start(
                _staged_writer,
                ("cifar10-hosts", accuracy, index, turns, all_read, reads, lock_dirs[index]),
                processes=True,
            )
            for index, accuracy in enumerate(ACCURACIES)
        ]
    )
    assert sorted(reads.get(timeout=10) for _ in ACCURACIES) == ["1", "2", "2", "2"]
    for directory in lock_dirs:  # each took its own lock file
        assert list(Path(directory).glob("cifar10-pipeline-registry-*.lock"))
    _champion_is_the_best(client, "cifar10-hosts")


def test_a_stale_champion_writer_corrects_itself(tracking_store, monkeypatch):
    """A writer whose first read misses a better version (registered on another host in
    between) re-reads after its write and moves the alias on."""
    client = _registered("cifar10-stale", (0.61, 0.74))
    search = MlflowClient.search_model_versions
    reads = []

    def stale_first_read(self, *args, **kwargs):
        versions = search(self, *args, **kwargs)
        reads.append(len(versions))
        return [v for v in versions if str(v.version) == "1"] if len(reads) == 1 else versions

    monkeypatch.setattr(MlflowClient, "search_model_versions", stale_first_read)
    assert model_registry.update_champion("cifar10-stale") == "2"
    assert _champion(client, "cifar10-stale") == "2"
    assert len(reads) >= 2


def test_a_writer_that_loses_the_alias_insert_race_rereads_and_settles(tracking_store, monkeypatch):
    """Two writers both read "no champion yet" and both insert the alias; the store's unique
    key refuses the second insert. The loser's next round reads what the winner wrote."""
    client = _registered("cifar10-race", (0.61, 0.74))
    set_alias = MlflowClient.set_registered_model_alias
    writes = []

    def other_writer_inserts_first(self, name, alias, version):
        writes.append(version)
        if len(writes) == 1:  # the winner's insert lands just before ours
            set_alias(self, name, alias, "1")
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed")
        return set_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", other_writer_inserts_first)
    assert model_registry.update_champion("cifar10-race") == "2"
    assert _champion(client, "cifar10-race") == "2"
    assert writes == ["2", "2"]


def test_a_champion_that_never_settles_names_the_last_store_error(tracking_store, monkeypatch):
    _registered("cifar10-refused", (0.61,))

    def refused(self, name, alias, version):
        raise MlflowException("database is locked")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refused)
    settled = "did not settle in 3 rounds.*database is locked"
    with pytest.raises(tracking.TrackingError, match=settled):
        model_registry.update_champion("cifar10-refused", max_rounds=3)


# --------------------------------------------------------------------------- MLproject


def test_mlproject_main_and_compare_match_their_commands():
    entry_points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    commands = {"main": cli.study, "compare": cli.compare_command}
    for name, command in commands.items():
        parameters = entry_points[name]["parameters"]
        options = {option.name: option for option in command.params}
        # MLproject declares the settings most changed; the others pass through undeclared.
        assert set(parameters) <= set(options), name
        for key, spec in parameters.items():
            default = options[key].default
            if spec["type"] == "float":
                assert float(spec["default"]) == pytest.approx(float(default)), key
            else:
                assert str(spec["default"]) == str(default) or key == "data", key
    train = entry_points["train"]["parameters"]
    main = entry_points["main"]["parameters"]
    assert main["norm"]["default"] == "batch,group,layer"
    assert main["seeds"]["default"] == 1
    for key, spec in train.items():
        if key in main and key not in ("norm", "seed", "resume"):
            assert main[key] == spec, key


def test_compare_rejects_group_by_names_that_are_not_train_parameters():
    assert cli.parse_group_by(" whiten, translate,whiten") == ("whiten", "translate")
    with pytest.raises(ConfigError, match=r"group_by names train parameters: .* \(got 'seed'\)"):
        cli.parse_group_by("seed")


def test_a_step_registering_no_model_reuses_a_run_that_registered_one(tracking_store, tmp_path):
    """A sweep's trials (registered_model empty) take the study's trainings as their defaults;
    a study's step, which registers its model, never takes a sweep's unregistered trial."""
    from pipeline.step_runs import CODE_VERSION_TAG, StepRuns

    def finished_train_run(registered_model: str) -> str:
        tags = {"mlflow.project.entryPoint": "train", CODE_VERSION_TAG: "test"}
        with mlflow.start_run(tags=tags) as run:
            mlflow.log_params({"learning_rate": "0.2", "registered_model": registered_model})
        return run.info.run_id

    study_run = finished_train_run("cifar10-batch")
    with mlflow.start_run(run_name="parent"):
        step_runs = StepRuns.of_active_run(project_dir=tmp_path, code_version="test")

    def found(learning_rate: str, registered_model: str = "") -> str | None:
        parameters = {"learning_rate": learning_rate, "registered_model": registered_model}
        return step_runs.find_finished(entry_point="train", parameters=parameters)

    assert found("0.2") == study_run
    assert found("0.4") is None
    sweep_run = finished_train_run("''")  # how `mlflow run` logs an empty value
    assert found("0.2") == sweep_run  # the newest match
    assert found("0.2", registered_model="cifar10-batch") == study_run
    assert found("0.2", registered_model="cifar10-layer") is None


def test_a_step_resumed_by_hand_is_reused_where_the_same_code_finished_it(tracking_store, tmp_path):
    """A study interrupted mid-step leaves its step's run KILLED; `train --resume` finishes it.
    The workflow never ends that run, so the run carries the code version it started with, and
    finishing it with the same code gives it the tag a study reuses; other code does not."""
    from pipeline.step_runs import (
        CODE_VERSION_TAG,
        STARTED_CODE_VERSION_TAG,
        StepRuns,
        code_version,
        finish_resumed_step,
    )

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "training.py").write_text("from pipeline import model\n")
    (tmp_path / "pipeline" / "model.py").write_text("widths = 1\n")
    (tmp_path / "MLproject").write_text(
        "name: p\nentry_points:\n  train:\n    parameters:\n      seed: {type: int, default: 1}\n"
        "    command: python -m pipeline train --seed {seed}\n"
    )
    with mlflow.start_run(run_name="parent"):
        step_runs = StepRuns.of_active_run(
            project_dir=tmp_path, code_version=code_version(tmp_path)
        )
    steps = [
        step_runs.create(entry_point="train", parameters={"seed": str(seed)}, run_name=f"s{seed}")
        for seed in (1, 2)
    ]
    client = mlflow.MlflowClient()
    for step in steps:
        assert client.get_run(step.run_id).data.tags[STARTED_CODE_VERSION_TAG] == (
            step_runs.code_version
        )
        client.set_terminated(step.run_id, "KILLED")  # the study interrupted
    assert not finish_resumed_step(steps[0].run_id, tmp_path)  # not finished yet
    for step in steps:
        client.set_terminated(step.run_id, "FINISHED")  # `train --resume` finished it

    assert finish_resumed_step(steps[0].run_id, tmp_path)
    assert client.get_run(steps[0].run_id).data.tags[CODE_VERSION_TAG] == step_runs.code_version
    found = step_runs.find_finished(entry_point="train", parameters={"seed": "1"})
    assert found == steps[0].run_id
    assert not finish_resumed_step(steps[0].run_id, tmp_path)  # tagged once

    (tmp_path / "pipeline" / "model.py").write_text("widths = 2\n")  # other code resumed it
    assert not finish_resumed_step(steps[1].run_id, tmp_path)
    assert CODE_VERSION_TAG not in client.get_run(steps[1].run_id).data.tags
    assert step_runs.find_finished(entry_point="train", parameters={"seed": "2"}) is None
    with mlflow.start_run(run_name="a run of its own") as own:
        pass
    assert not finish_resumed_step(own.info.run_id, tmp_path)  # not a step's run


def test_a_finished_training_stays_reusable_when_the_report_changes_but_not_the_model(
    tracking_store, tmp_path
):
    """A training's code version hashes the code its training runs (pipeline/training.py and
    what it imports), not the report: rewording the report keeps hours of trainings."""
    from pipeline.step_runs import CODE_VERSION_TAG, StepRuns, code_version, training_code

    package = tmp_path / "pipeline"
    (package / "report").mkdir(parents=True)
    (package / "training.py").write_text("from pipeline import engine\n")
    (package / "engine.py").write_text("from pipeline.model import Net\n")
    (package / "model.py").write_text("class Net: ...\n")
    (package / "report" / "render.py").write_text("TITLE = 'Results'\n")
    (package / "cli.py").write_text("from pipeline import report, training\n")
    (tmp_path / "MLproject").write_text(
        "name: p\nentry_points:\n  train:\n    parameters:\n      seed: {type: int, default: 1}\n"
        "    command: python -m pipeline train --seed {seed}\n"
    )
    assert [p.name for p in training_code(tmp_path)] == ["engine.py", "model.py", "training.py"]

    def finished_training_found() -> bool:
        with mlflow.start_run(run_name="parent"):
            runs = StepRuns.of_active_run(project_dir=tmp_path, code_version=code_version(tmp_path))
        return runs.find_finished(entry_point="train", parameters={"seed": "1"}) is not None

    with mlflow.start_run(run_name="parent"):
        runs = StepRuns.of_active_run(project_dir=tmp_path, code_version=code_version(tmp_path))
    step = runs.create(entry_point="train", parameters={"seed": "1"}, run_name="train")
    mlflow.MlflowClient().set_terminated(step.run_id, "FINISHED")
    runs.set_tags(step.run_id, {CODE_VERSION_TAG: runs.code_version})
    assert finished_training_found()

    (package / "report" / "render.py").write_text("TITLE = 'Results, reworded'\n")
    (package / "cli.py").write_text("from pipeline import report, training  # reworded\n")
    assert finished_training_found()  # the report and the CLI are not the training's code

    (package / "model.py").write_text("class Net: widths = 2\n")
    assert not finished_training_found()  # the model is
