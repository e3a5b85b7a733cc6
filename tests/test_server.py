"""The team setup: `scripts/server.sh` starts PostgreSQL and an `mlflow server` in front of it;
the pipeline trains, registers and evaluates through that server, four trainings at once lose
nothing, and in basic-auth mode a stranger is refused and a reader cannot write.

The tests skip when PostgreSQL is not installed, unless PIPELINE_REQUIRE_SERVICES=1 (as in CI),
where they fail instead."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from conftest import REPO, VAL_SIZE, run_cli
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.config import DEFAULT_EXPERIMENT
from pipeline.engine import EpochMetrics

# Starts PostgreSQL and MLflow servers: part of the full suite, not the fast loop.
pytestmark = pytest.mark.slow

EPOCH_METRICS = [name for name in EpochMetrics.__dataclass_fields__ if name != "epoch"]
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
SCRIPT = REPO / "scripts" / "server.sh"
ADMIN_PASSWORD = "admin-password-for-tests"


def _unavailable(reason: str) -> None:
    if os.environ.get("PIPELINE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (PIPELINE_REQUIRE_SERVICES=1: the server tests must run)")
    pytest.skip(reason)


def _require_postgres() -> None:
    found = shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        _unavailable("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql)")
    if importlib.util.find_spec("psycopg2") is None:
        _unavailable("psycopg2 is not installed (pip install -e '.[dev]')")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running as root without runuser: PostgreSQL cannot be started")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(*arguments: str, workers: int = 2, env: dict[str, str] | None = None):
    """`bash scripts/server.sh` on a free port with its own folder (PostgreSQL cluster,
    artifacts) under the system temp dir, whose parents PostgreSQL's account may enter."""
    directory = Path(tempfile.mkdtemp(prefix="pipeline-server-"))
    port = _free_port()
    log = directory / "server.log"
    with open(log, "w") as output:  # the script writes to its own copy of the descriptor
        process = subprocess.Popen(
            ["bash", str(SCRIPT), "--port", str(port), "--dir", str(directory), *arguments]
            + ["--", "--workers", str(workers)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHON": sys.executable, **(env or {})},
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_server(process)
            output = log.read_text()
            shutil.rmtree(directory, ignore_errors=True)
            pytest.fail(f"scripts/server.sh did not come up on {uri}:\n{output[-3000:]}")
        time.sleep(0.5)
    return SimpleNamespace(uri=uri, directory=directory, log=log, process=process)


def _stop_server(process: subprocess.Popen) -> int:
    """SIGTERM the script: it stops the server, then the PostgreSQL it started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def _teardown(server) -> None:
    _stop_server(server.process)
    # The script stopped its PostgreSQL: no server process holds the data folder any more.
    assert not (server.directory / "pgdata" / "postmaster.pid").exists(), server.log.read_text()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    _require_postgres()
    started = _start_server()
    yield started
    _teardown(started)


@pytest.fixture
def on_server(server, monkeypatch):
    """This test's clients and subprocesses talk to the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    return MlflowClient()


def _metric_rows(server) -> dict[str, dict[str, int]]:
    """Rows of the `metrics` table in PostgreSQL itself: run id -> metric key -> count."""
    import psycopg2

    connection = psycopg2.connect(
        host=str(server.directory / "run"),
        port=_socket_port(server),
        user="mlflow",
        dbname="mlflow",
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid, key, COUNT(*) FROM metrics GROUP BY run_uuid, key")
            rows = cursor.fetchall()
    finally:
        connection.close()
    counts: dict[str, dict[str, int]] = {}
    for run_id, key, count in rows:
        counts.setdefault(run_id, {})[key] = count
    return counts


def _socket_port(server) -> int:
    (socket_file,) = [p for p in (server.directory / "run").glob(".s.PGSQL.*") if p.is_socket()]
    return int(socket_file.suffix[1:])


def test_script_prints_the_uri_to_export_and_listens_on_loopback_only(server):
    output = server.log.read_text()
    assert f"export MLFLOW_TRACKING_URI={server.uri}" in output
    assert "backend store postgresql+psycopg2://mlflow@/mlflow?host=" in output
    port = int(server.uri.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    if listening:  # the server's socket is bound to 127.0.0.1, PostgreSQL opens no TCP port
        bound = [line.split()[3] for line in listening.splitlines()]
        assert f"127.0.0.1:{port}" in bound
        assert not any(address.endswith(f":{_socket_port(server)}") for address in bound)


def test_four_trainings_at_once_then_evaluate_the_champion_through_the_server(
    on_server, server, image_folder
):
    client, epochs = on_server, 2
    processes = []
    for seed in range(1, 5):
        options = [
            f"--epochs={epochs}",
            "--batch-size=32",
            f"--seed={seed}",
            f"--val-size={VAL_SIZE}",
        ]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline", "train", *options, f"--data={image_folder}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": PYTHONPATH},
            )
        )
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]

    runs = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])
    trained = [r for r in runs if r.data.tags.get("step") == "train"]
    assert len(trained) == 4 and {r.info.status for r in trained} == {"FINISHED"}
    rows = _metric_rows(server)
    for run in trained:
        run_id = run.info.run_id
        # every metric row reached PostgreSQL: each epoch metric once per epoch, nothing doubled
        assert rows[run_id] == {**dict.fromkeys(EPOCH_METRICS, epochs), "train_seconds": 1}
        for name in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2]
        # artifacts go through the server into its artifacts folder
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        stored = list((server.directory / "artifacts").rglob(f"{run_id}/artifacts/checkpoint/*"))
        assert [path.name for path in stored] == ["last.pt"]

    versions = client.search_model_versions("name = 'cifar10-batch'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    best = max(versions, key=lambda v: (float(v.tags["test_acc"]), -int(v.version)))
    champion = client.get_model_version_by_alias("cifar10-batch", "champion")
    assert champion.version == best.version

    evaluated = run_cli(
        "evaluate", "--model-uri=models:/cifar10-batch@champion", f"--data={image_folder}"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (evaluation,) = client.search_runs(
        [client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id], "tags.step = 'evaluate'"
    )
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["source_run_id"] == champion.run_id
    assert evaluation.data.tags["model_version"] == str(champion.version)
    assert evaluation.data.metrics["test_acc"] == pytest.approx(
        float(champion.tags["test_acc"]), abs=1e-4
    )


# --------------------------------------------------------------------------- basic-auth


@pytest.fixture(scope="module")
def auth_server():
    _require_postgres()
    if importlib.util.find_spec("flask_wtf") is None:
        _unavailable("MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')")
    started = _start_server(
        "--app-name", "basic-auth", workers=1, env={"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    )
    yield started
    _teardown(started)


def _as(monkeypatch, server, username: str | None, password: str | None) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name, value in (("USERNAME", username), ("PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
        else:
            monkeypatch.setenv(f"MLFLOW_TRACKING_{name}", value)
    return MlflowClient()


def test_basic_auth_refuses_strangers_and_readers_cannot_write(
    auth_server, monkeypatch, capsys, image_folder
):
    from mlflow.server import get_app_client

    # a client without credentials is refused, on the REST API and by the pipeline
    search = f"{auth_server.uri}/api/2.0/mlflow/experiments/search"
    assert requests.get(search, params={"max_results": 1}, timeout=10).status_code == 401
    _as(monkeypatch, auth_server, None, None)
    # check_store's own settings, set here so that they are undone after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setattr("sys.argv", ["pipeline", "train", "--epochs=1", f"--data={image_folder}"])
    with pytest.raises(SystemExit) as refused:
        cli.main()
    assert refused.value.code == 1
    stderr = capsys.readouterr().err
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: the MLflow tracking server at {auth_server.uri} refused the request (HTTP 401)"
        )
    )
    assert "Traceback" not in stderr

    # the admin sets up a model, a reader and the reader's READ permissions
    admin = _as(monkeypatch, auth_server, "admin", ADMIN_PASSWORD)
    experiment_id = admin.get_experiment_by_name("Default").experiment_id
    admin.create_registered_model("cifar10-batch")
    source = admin.create_run(experiment_id, run_name="admin-run")
    admin.set_terminated(source.info.run_id)
    users = get_app_client("basic-auth", tracking_uri=auth_server.uri)
    users.create_user("reader", "reader-password")
    users.grant_user_permission("reader", "experiment", experiment_id, "READ")
    users.grant_user_permission("reader", "registered_model", "cifar10-batch", "READ")

    reader = _as(monkeypatch, auth_server, "reader", "reader-password")
    assert reader.get_run(source.info.run_id).info.status == "FINISHED"  # reading works
    with pytest.raises(MlflowException, match="403"):
        reader.create_model_version(
            "cifar10-batch", f"runs:/{source.info.run_id}/model", source.info.run_id
        )
    with pytest.raises(MlflowException, match="403"):
        reader.set_registered_model_alias("cifar10-batch", "champion", "1")
    with pytest.raises(MlflowException, match="403"):
        reader.create_run(experiment_id)

    admin = _as(monkeypatch, auth_server, "admin", ADMIN_PASSWORD)
    assert admin.search_model_versions("name = 'cifar10-batch'") == []
    runs = admin.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [source.info.run_id]  # the reader made no run


# --------------------------------------------------------------------------- a Ray cluster

OBJECT_STORE = 80 * 2**20  # Ray's floor is 75 MiB; the steps return a few bytes


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray cluster on this machine: a head that runs no trial and two worker nodes of one
    CPU each. Only the processes it started are stopped (never `ray stop`)."""
    cluster_utils = pytest.importorskip("ray.cluster_utils", reason="pip install -e '.[ray]'")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the sweep's driver joins without a token
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE},
    )
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in "ab"]
        cluster.wait_for_nodes()
        yield SimpleNamespace(cluster=cluster, nodes=nodes)
    finally:
        cluster.shutdown()


CLUSTER_EXPERIMENT = "cluster-sweep"  # apart from the other tests' runs on this server


def _train_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(CLUSTER_EXPERIMENT)
    return client.search_runs([experiment.experiment_id], "tags.step = 'train'")


def _step_runs(client: MlflowClient, prefix: str) -> list:
    """The sweep's step runs named `prefix`..., tagged by their training or not yet."""
    experiment = client.get_experiment_by_name(CLUSTER_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name LIKE '{prefix}%'")
    return [run for run in runs if run.info.run_name.startswith(prefix)]


def test_a_sweep_on_a_two_node_cluster_reruns_the_trial_of_a_lost_node(
    on_server, two_node_cluster, image_folder, tmp_path
):
    node_a, node_b = (node.node_id for node in two_node_cluster.nodes)
    on_server.create_experiment(CLUSTER_EXPERIMENT)
    sweep = subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "sweep",
            "--grid", "learning_rate=0.1,0.4,0.8", "--mode", "one-at-a-time",
            "--norm", "batch", "--seeds", "2", "--epochs", "3", "--batch-size", "32",
            "--warmup-epochs", "0.5", "--data", str(image_folder),
            "--val-size", str(VAL_SIZE),
            "--executor", "ray", "--ray-address", two_node_cluster.cluster.address,
            "--parallel", "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, "MLFLOW_EXPERIMENT_NAME": CLUSTER_EXPERIMENT},
        cwd=tmp_path,
    )  # fmt: skip

    # Once node b has finished a trial, it goes away in the middle of its next one: when that
    # trial (its run is tagged with its node from its start) has logged epoch 1 of its 3, its
    # final epochs, evaluation and model still ahead of it.
    def b_is_mid_trial() -> bool:
        runs = _step_runs(on_server, "train-")
        on_b = [run for run in runs if run.data.tags.get("node") == node_b]
        return any(run.info.status == "FINISHED" for run in on_b) and any(
            run.info.status == "RUNNING" and "test_acc" in run.data.metrics for run in on_b
        )

    deadline = time.monotonic() + 600
    while not b_is_mid_trial():
        if sweep.poll() is not None or time.monotonic() > deadline:
            seen = [
                (r.info.run_name, r.info.status, r.data.tags.get("node", "")[:8], r.info.start_time,
                 r.info.end_time) for r in _step_runs(on_server, "train-")
            ]  # fmt: skip
            pytest.fail(f"node b never seen mid-trial; b={node_b[:8]} runs={seen}\n"
                        f"{sweep.stdout.read()[-3000:]}")  # fmt: skip
        time.sleep(0.2)
    two_node_cluster.cluster.remove_node(two_node_cluster.nodes[1])
    output, _ = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, output[-4000:]

    runs = _train_runs(on_server)
    statuses = {run.info.run_id: run.info.status for run in runs}
    assert "RUNNING" not in statuses.values()
    retried = [run for run in runs if "retry_of" in run.data.tags]
    assert retried, output[-4000:]
    for retry in retried:
        # the lost run may have died before its training tagged it `step`: read it by id
        assert on_server.get_run(retry.data.tags["retry_of"]).info.status == "FAILED"
        assert retry.info.status == "FINISHED"
        assert "rerunning" in output or "running the step again" in output
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert len(finished) == 8  # (the defaults + 3 learning rates) x 2 seeds, each once
    assert {run.data.tags.get("node") for run in finished} == {node_a, node_b}
    # every trial's artifacts came through the server's artifact proxy
    for run in finished:
        paths = {item.path for item in on_server.list_artifacts(run.info.run_id, "plots")}
        assert "plots/curves.png" in paths
