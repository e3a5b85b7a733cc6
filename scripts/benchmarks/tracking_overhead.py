"""What does MLflow cost a run? `pipeline.runs.train_model` on a temporary SQLite store vs the
same training through `engine.fit` without tracking, on a subset for a few epochs, each norm at
its recipe: both build through `training.prepare_training` + `training.fit`, as `train` does."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import recipe
from benchmarks.timing import progress, timed
from pipeline import data as datasets
from pipeline import engine
from pipeline.config import ConfigError, TrainConfig
from pipeline.training import fit, prepare_training

try:  # only this question needs MLflow; the others run without it (e.g. on a bare GPU box)
    import mlflow

    from pipeline import tracking
    from pipeline.runs import train_model
except ImportError:
    mlflow = tracking = train_model = None

DEFAULTS = TrainConfig()
TRACKING_ENVIRONMENT = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "PIPELINE_CACHE_DIR",
)


@dataclass(frozen=True)
class TrackingCost:
    """Wall seconds of the same training with MLflow off, per-epoch logging only, and fully on."""

    norm: str
    untracked_seconds: float
    epoch_logged_seconds: float
    tracked_seconds: float
    epochs: int
    tracked_without_system_metrics_seconds: float = float("nan")

    @property
    def overhead_percent(self) -> float:
        return 100 * (self.tracked_seconds - self.untracked_seconds) / self.untracked_seconds

    @property
    def system_metrics_percent(self) -> float:
        """What sampling system metrics adds, as a share of the untracked time."""
        extra = self.tracked_seconds - self.tracked_without_system_metrics_seconds
        return 100 * extra / self.untracked_seconds

    @property
    def logging_seconds_per_epoch(self) -> float:
        return (self.epoch_logged_seconds - self.untracked_seconds) / self.epochs

    @property
    def fixed_seconds_per_run(self) -> float:
        return self.tracked_seconds - self.epoch_logged_seconds


@dataclass(frozen=True)
class TrackingOverhead:
    """The tracking costs per norm and the subset and run they were measured on."""

    costs: dict[str, TrackingCost]
    tracked_images: int
    tracked_test_images: int
    tracked_epochs: int
    batch_size: int | None  # --batch-size over every recipe's own; None: the recipes'
    cold_seconds: float | None  # the untimed first `train_model` call; None when skipped


# --------------------------------------------------------------------------- tracking overhead


def write_cifar_subset(
    dataset: datasets.ArrayDataset,
    directory: Path,
    *,
    train_images: int,
    test_images: int,
    seed: int,
) -> Path:
    """Write a random subset as a `cifar-10-batches-py` folder, a source `train --data` reads."""
    generator = np.random.default_rng(seed)
    root = directory / datasets.CIFAR_BATCHES
    root.mkdir(parents=True)

    def pick(count: int, total: int) -> np.ndarray:
        return np.sort(generator.choice(total, size=min(count, total), replace=False))

    def write(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR stores CHW rows
        with open(root / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": labels.tolist()}, handle)

    train_index = pick(train_images, len(dataset.train_labels))
    for number, chunk in enumerate(np.array_split(train_index, 5), start=1):
        write(f"data_batch_{number}", dataset.train_images[chunk], dataset.train_labels[chunk])
    test_index = pick(test_images, len(dataset.test_labels))
    write("test_batch", dataset.test_images[test_index], dataset.test_labels[test_index])
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(dataset.classes)}, handle)
    return directory


@contextlib.contextmanager
def temporary_tracking_store(directory: Path) -> Iterator[None]:
    """Point MLflow (SQLite store, artifacts) and the dataset cache into `directory`, then restore.

    The store is created here, outside any clock: a user's store already exists.
    """
    saved = {name: os.environ.get(name) for name in TRACKING_ENVIRONMENT}
    try:
        for name in TRACKING_ENVIRONMENT:
            os.environ.pop(name, None)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{directory / 'mlflow.db'}"
        os.environ["PIPELINE_CACHE_DIR"] = str(directory / "cache")
        # An explicit artifact location keeps artifacts out of ./mlruns of the working directory.
        experiment_id = mlflow.create_experiment(
            "benchmark", artifact_location=(directory / "artifacts").as_uri()
        )
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train_untracked(
    config: TrainConfig,
    *,
    on_epoch_end: Callable[[engine.EpochMetrics, engine.TrainingState], None] | None = None,
) -> None:
    """The work of `train_model` without MLflow: the same setup, `fit` and final evaluation."""
    setup = prepare_training(config)
    fit(setup, config, on_epoch_end=on_epoch_end)
    engine.evaluate(
        setup.model,
        setup.splits.test,
        normalize=setup.splits.normalize,
        autocast_dtype=setup.autocast_dtype,
    )


def log_each_epoch(record: engine.EpochMetrics, state: engine.TrainingState) -> None:
    """The per-epoch part of `train_model`'s callback: metrics and the resumable checkpoint."""
    tracking.log_epoch(record)
    tracking.log_checkpoint(state.state_dict())


def train_tracked(config: TrainConfig, *, system_metrics: bool = True) -> None:
    # train_model reports each epoch on stdout; the report must stay clean Markdown.
    switch = tracking.SYSTEM_METRICS_SWITCH
    saved = os.environ.get(switch)
    os.environ[switch] = "true" if system_metrics else "false"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train_model(config)
    finally:
        if saved is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = saved


def measure_tracking(config: TrainConfig) -> TrackingCost:
    """Time the same training untracked, with per-epoch logging, and as the full `train_model`."""

    def epoch_logged() -> None:
        with tracking.run(run_name=f"benchmark-{config.norm}-epoch-logging"):
            train_untracked(config, on_epoch_end=log_each_epoch)

    return TrackingCost(
        norm=config.norm,
        untracked_seconds=timed(lambda: train_untracked(config)),
        epoch_logged_seconds=timed(epoch_logged),
        tracked_seconds=timed(lambda: train_tracked(config)),
        epochs=config.epochs,
        tracked_without_system_metrics_seconds=timed(
            lambda: train_tracked(config, system_metrics=False)
        ),
    )


def measure(
    dataset: datasets.ArrayDataset,
    *,
    norms: list[str],
    enabled: bool,
    device: torch.device,
    batch_size: int | None,
    tracked_images: int,
    tracked_test_images: int,
    tracked_epochs: int,
    tracking_warmup: bool,
    seed: int,
) -> TrackingOverhead | None:
    """The tracking cost of each norm's recipe in `norms` (`batch_size` overrides its batch);
    None when disabled or MLflow is not installed."""
    train_count, test_count = len(dataset.train_labels), len(dataset.test_labels)
    if mlflow is None or not enabled or not norms:
        progress("tracking: skipped (--no-tracking, or MLflow is not installed)")
        return None
    costs: dict[str, TrackingCost] = {}
    tracked_images = min(tracked_images, train_count)
    tracked_test_images = min(tracked_test_images, test_count)
    batches = {
        norm: TrainConfig(norm=norm, batch_size=batch_size or 0).batch_size for norm in norms
    }
    # train holds a tenth out for validation (below): the rest must fill a batch.
    if tracked_images - tracked_images // 10 < max(batches.values()):
        raise ConfigError(
            f"--tracked-images must leave, after a tenth held out for validation, at least "
            f"the batch size {max(batches.values())} (got {tracked_images})"
        )
    with tempfile.TemporaryDirectory(prefix="benchmark-") as directory:
        temporary = Path(directory)
        progress(f"tracking: temporary SQLite store and subset in {temporary}")
        subset = write_cifar_subset(
            dataset,
            temporary / "subset",
            train_images=tracked_images,
            test_images=tracked_test_images,
            seed=seed,
        )
        warmup_subset = write_cifar_subset(
            dataset,
            temporary / "warmup-subset",
            train_images=batches[norms[0]],
            test_images=min(batches[norms[0]], test_count),
            seed=seed,
        )
        with temporary_tracking_store(temporary):
            # Decode and cache the subset once, as a second `train` on the same data finds it.
            datasets.cached_stats(datasets.load_dataset(subset))
            epochs = tracked_epochs
            settings = {
                "epochs": epochs,
                "batch_size": batch_size or 0,  # 0: the norm's recipe
                "warmup_epochs": min(DEFAULTS.warmup_epochs, float(epochs)),
                "device": device.type,
                "seed": seed,
                # A tenth held out, as train's default holds out 5,000 of CIFAR-10's 50,000.
                "val_size": tracked_images // 10,
            }
            cold_seconds = None
            if tracking_warmup:
                progress("tracking: one untimed train_model run (imports, first model export)")
                cold_seconds = timed(
                    lambda: train_tracked(
                        TrainConfig(
                            norm=norms[0],
                            data=str(warmup_subset),
                            # a batch of images, none to spare for validation
                            **{**settings, "epochs": 1, "warmup_epochs": 0.0, "val_size": 0},
                        )
                    )
                )
            for norm in norms:
                progress(f"{norm}: untracked, per-epoch logging, tracked ({epochs} epochs)")
                costs[norm] = measure_tracking(TrainConfig(norm=norm, data=str(subset), **settings))
    return TrackingOverhead(
        costs,
        tracked_images=tracked_images,
        tracked_test_images=tracked_test_images,
        tracked_epochs=tracked_epochs,
        batch_size=batch_size,
        cold_seconds=cold_seconds,
    )


# --------------------------------------------------------------------------- report


def tracking_table(costs: list[TrackingCost]) -> list[str]:
    lines = [
        "| norm | untracked s | per-epoch logging s | tracked s | logging s/epoch | "
        "fixed s/run | overhead | of which system metrics |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cost in costs:
        lines.append(
            f"| {cost.norm} | {cost.untracked_seconds:.1f} | {cost.epoch_logged_seconds:.1f} | "
            f"{cost.tracked_seconds:.1f} | {cost.logging_seconds_per_epoch:.2f} | "
            f"{cost.fixed_seconds_per_run:.1f} | {cost.overhead_percent:+.1f}% | "
            f"{cost.system_metrics_percent:+.1f}% |"
        )
    return lines


def report(result: TrackingOverhead | None) -> list[str]:
    """The tracking section, or one line saying it was not measured."""
    if result is None:
        return ["Tracking overhead: not measured (--no-tracking, or MLflow is not installed)."]
    return [
        "### Tracking overhead",
        "",
        f"Subset of {result.tracked_images:,} train / {result.tracked_test_images:,} test images, "
        f"{result.tracked_epochs} epoch(s), temporary SQLite store. "
        + recipe.caption(list(result.costs), batch_size=result.batch_size)
        + " "
        "`tracked`: `pipeline.runs.train_model` (params, dataset, per-epoch metrics and "
        "checkpoint, figures, exported model, registry). `untracked`: the same loading, "
        "`engine.fit(on_epoch_end=None)` and final evaluation. `per-epoch logging`: "
        "`engine.fit` "
        "with `on_epoch_end` = `tracking.log_epoch` + `tracking.log_checkpoint` inside "
        "`tracking.run`. Overhead = (tracked - untracked) / untracked wall time; the fixed "
        "part is paid once per run, so it weighs less in a full-length run. *Of which system "
        "metrics*: (tracked - the same with MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false) / "
        "untracked, the sampling thread's share. "
        + (
            "The first `train_model` call in the process (untimed) took "
            f"{result.cold_seconds:.1f} s."
            if result.cold_seconds is not None
            else "No untimed `train_model` call first (--quick): one-time imports are included."
        ),
        "",
        *tracking_table(list(result.costs.values())),
    ]
