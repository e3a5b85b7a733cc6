"""Fixtures: tiny synthetic datasets in every on-disk format the pipeline reads, and a
temporary MLflow store. Nothing is downloaded."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
# MLflow's usage telemetry costs every process the tests start (mlflow run, each step, the
# servers) about 3 s of CPU, with no network to send it to; set before any fixture runs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
CLASSES = CIFAR10_CLASSES
TRAIN_PER_CLASS = 24
TEST_PER_CLASS = 6
# Training images a test's run holds out for validation (train's 5,000 exceed the data).
VAL_SIZE = 4 * len(CLASSES)


def synthetic_images(count: int, label: int, *, seed: int) -> np.ndarray:
    """Learnable images: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed * 1000 + label)
    colour = np.array(
        [(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256], dtype=np.float32
    )
    rows = np.arange(32)[:, None] * np.ones((1, 32))
    stripes = np.sin((rows if label % 2 else rows.T) * (0.3 + 0.1 * label))[..., None] * 40
    base = colour * 0.7 + stripes
    noise = rng.normal(0, 25, size=(count, 32, 32, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def make_split_arrays(*, seed: int = 0) -> dict[str, np.ndarray]:
    arrays = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images = [
            synthetic_images(per_class, label, seed=seed + (split == "test"))
            for label in range(len(CLASSES))
        ]
        arrays[f"{split}_images"] = np.concatenate(images)
        arrays[f"{split}_labels"] = np.repeat(np.arange(len(CLASSES)), per_class)
    return arrays


def write_image_folder(root: Path, *, suffix: str = ".png", seed: int = 0) -> Path:
    arrays = make_split_arrays(seed=seed)
    for split in ("train", "test"):
        for index, (image, label) in enumerate(
            zip(arrays[f"{split}_images"], arrays[f"{split}_labels"], strict=True)
        ):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}{suffix}")
    return root


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test gets its own cache and tracking store; no test reads ~/.cache or ./mlflow.db."""
    base = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # System metrics arrive on a 10 s clock: off, so that the metrics a test counts are its own;
    # tests/test_cli.py turns them on to test them.
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # Commands name their experiment through it: undone after each test, like the others.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(base)
    yield base


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """`train/<class>/*.png` + `test/<class>/*.png`, 24 + 6 images per class."""
    return write_image_folder(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory) -> Path:
    """The same layout as JPEGs in a .tar.gz, wrapped in one top folder."""
    root = write_image_folder(tmp_path_factory.mktemp("archive_src") / "cifar", suffix=".jpg")
    archive = tmp_path_factory.mktemp("archive") / "cifar-small.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(root, arcname="cifar")
    return archive


@pytest.fixture(scope="session")
def cifar_pickles(tmp_path_factory) -> Path:
    """A fake torchvision CIFAR-10 directory (`cifar-10-batches-py/` pickles)."""
    root = tmp_path_factory.mktemp("pickles")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    arrays = make_split_arrays(seed=3)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        payload = {
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
            "labels": labels.tolist(),
        }
        with open(batches / name, "wb") as handle:
            pickle.dump(payload, handle)

    chunks = np.array_split(np.arange(len(arrays["train_labels"])), 5)
    for number, chunk in enumerate(chunks, start=1):
        dump(f"data_batch_{number}", arrays["train_images"][chunk], arrays["train_labels"][chunk])
    dump("test_batch", arrays["test_images"], arrays["test_labels"])
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(CLASSES)}, handle)
    return root


@pytest.fixture(scope="session")
def empty_store_file(tmp_path_factory) -> Path:
    """An SQLite store with MLflow's schema, made once: migrating a new one takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_store(isolated_environment, empty_store_file) -> str:
    """A fresh SQLite store, created before any process uses it (parallel processes would
    race on a new store's schema)."""
    shutil.copy(empty_store_file, isolated_environment / "mlflow.db")
    return os.environ["MLFLOW_TRACKING_URI"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `python -m pipeline ARGS` in a subprocess with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def run_in_process(monkeypatch, capsys, *args):
    """`python -m pipeline ARGS` in this process (no interpreter start): (exit code, stderr)."""
    from pipeline import cli

    monkeypatch.setattr("sys.argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def mlflow_run(
    entry_point: str,
    parameters: dict[str, object],
    *,
    timeout: int = 600,
    experiment_name: str | None = None,
):
    """`mlflow run <repo> --env-manager local -e ENTRY -P k=v ...`, as a user would type it."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    command += ["-e", entry_point]
    if experiment_name:
        command += ["--experiment-name", experiment_name]
    for key, value in parameters.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
