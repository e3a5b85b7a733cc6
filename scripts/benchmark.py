"""Training throughput, side by side in one process: the reference loader, our pipeline, the model.

Run from the repository root (about 10 minutes on 2 CPU cores with the defaults):

    python scripts/benchmark.py > benchmark.md

Measured for each norm, on the same machine, model and data, after untimed warm-up steps:

* `reference`: torchvision's CIFAR-10 recipe (a PIL image per sample, per-sample RandomCrop,
  RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with worker processes, batch 64,
  NCHW fp32, SGD with momentum 0.9);
* `pipeline`: what `train` runs (uint8 splits on the device, batch-wise augmentation, the
  `engine` defaults for layout and precision, `engine.train_one_epoch`), tracking off;
* `ceiling`: the same step on one fixed, already prepared batch: what the model alone costs;
* `tracked` / `untracked`: `pipeline.cli.train_model` with MLflow on a temporary SQLite store
  vs the same work through `engine.fit` without a callback, on a subset for a few epochs.

The `--tta` section times one evaluation of the test split per test-time augmentation (what
each epoch of `train` adds after its training steps). The `--layouts` section measures the
ceiling in NCHW vs channels_last and fp32 vs bf16 autocast, the numbers behind
`engine.memory_format_for` and `engine.resolve_precision`. The report is Markdown (stdout) to
paste into the README; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import pickle
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import data as datasets
from pipeline import engine
from pipeline.config import TTA_MODES, ConfigError, TrainConfig, parse_norms
from pipeline.model import build_model
from pipeline.training import fit, prepare_training

try:  # the tracked rows need MLflow; the throughput rows run without it (e.g. on a bare GPU box)
    import mlflow

    from pipeline import tracking
    from pipeline.cli import train_model
except ImportError:
    mlflow = tracking = train_model = None

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10-dev.tar.gz"  # relative to the repository root
DEFAULTS = TrainConfig()
REFERENCE_BATCH_SIZE = 64
REFERENCE_LEARNING_RATE = 0.01  # the torchvision tutorial's value; speed does not depend on it
LAYOUT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "channels_last"}
TRACKING_ENVIRONMENT = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "PIPELINE_CACHE_DIR",
)

# Sized so that the whole benchmark takes about 10 minutes on 2 CPU cores: bf16 autocast on a CPU
# without native bf16 is several times slower than fp32, hence few layout steps. --quick is a smoke
# run (smaller batches, the tracking comparison for the first norm only, no tracking warm-up): its
# numbers show that everything runs, not how fast.
FULL_SETTINGS = {
    "batch_size": DEFAULTS.batch_size,
    "steps": 20,
    "warmup_steps": 3,
    "layout_steps": 4,
    "tracked_images": 3000,
    "tracked_test_images": 1000,
    "tracked_epochs": 2,
    "tracking_warmup": True,
}
QUICK_SETTINGS = {
    "batch_size": 64,
    "steps": 2,
    "warmup_steps": 1,
    "layout_steps": 1,
    "tracked_images": 128,
    "tracked_test_images": 64,
    "tracked_epochs": 1,
    "tracking_warmup": False,
}
EVAL_BATCH_SIZE_BEFORE = 1024  # every device's evaluation batch before eval_batch_size_for
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


@dataclass(frozen=True)
class Measurement:
    """Training images per second over the timed steps of one setup."""

    norm: str
    path: str
    batch_size: int
    layout: str
    precision: str
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class EvaluationCost:
    """Wall seconds of one evaluation of the test split with one test-time augmentation."""

    norm: str
    tta: str
    batch_size: int
    passes: int  # forward passes of the model per batch (counted)
    images: int
    seconds: float


@dataclass(frozen=True)
class TrackingCost:
    """Wall seconds of the same training with MLflow off, per-epoch logging only, and fully on."""

    norm: str
    untracked_seconds: float
    epoch_logged_seconds: float
    tracked_seconds: float
    epochs: int

    @property
    def overhead_percent(self) -> float:
        return 100 * (self.tracked_seconds - self.untracked_seconds) / self.untracked_seconds

    @property
    def logging_seconds_per_epoch(self) -> float:
        return (self.epoch_logged_seconds - self.untracked_seconds) / self.epochs

    @property
    def fixed_seconds_per_run(self) -> float:
        return self.tracked_seconds - self.epoch_logged_seconds


# --------------------------------------------------------------------------- helpers


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    train_steps: Callable[[int], None], *, warmup_steps: int, steps: int, device: torch.device
) -> float:
    """Seconds for `steps` steps after `warmup_steps` untimed ones."""
    train_steps(warmup_steps)
    synchronize(device)
    started = time.perf_counter()
    train_steps(steps)
    synchronize(device)
    return time.perf_counter() - started


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability()
    device_name = str(device)
    if device.type == "cuda":
        device_name = f"cuda ({torch.cuda.get_device_name(device)})"
    return (
        f"{cpu_model()} ({cores} usable CPUs, {torch.get_num_threads()} torch threads, "
        f"{capability}), torch {torch.__version__}, Python {platform.python_version()}, "
        f"device {device_name}"
    )


# --------------------------------------------------------------------------- reference path


class ReferenceCifar10(torch.utils.data.Dataset):
    """`torchvision.datasets.CIFAR10.__getitem__` over our uint8 arrays: one PIL image a sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images  # (N, 32, 32, 3) uint8
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def endless(batches: Callable[[], Iterator]) -> Iterator:
    """Epoch after epoch of `batches()`, so any step count can be drawn from one stream."""
    while True:
        yield from batches()


def measure_reference(
    dataset: datasets.ArrayDataset,
    stats: datasets.DatasetStats,
    *,
    norm: str,
    device: torch.device,
    workers: int,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> Measurement:
    """The torchvision tutorial's training loop over a DataLoader with per-sample transforms."""
    from torchvision import transforms  # imported late: only the reference path needs it

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(stats.mean, stats.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        ReferenceCifar10(dataset.train_images, dataset.train_labels, transform),
        batch_size=REFERENCE_BATCH_SIZE,
        shuffle=True,
        num_workers=workers,
        # Workers stay alive across epochs: the reference gets its steady state, not its start-up.
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=True,  # full batches only, so every timed step does the same work
        generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    model = build_model(norm=norm, groups=DEFAULTS.groups).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=REFERENCE_LEARNING_RATE,
        momentum=DEFAULTS.momentum,
        weight_decay=DEFAULTS.weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    batches = endless(lambda: iter(loader))

    def train_steps(count: int) -> None:
        for images, labels in itertools.islice(batches, count):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()

    # One stream for warm-up and timed steps: the timer starts with the loader in steady state.
    seconds = timed_steps(train_steps, warmup_steps=warmup_steps, steps=steps, device=device)
    return Measurement(
        norm=norm,
        path=f"reference ({workers} worker{'' if workers == 1 else 's'})",
        batch_size=REFERENCE_BATCH_SIZE,
        layout="NCHW",
        precision="fp32",
        images=steps * REFERENCE_BATCH_SIZE,
        seconds=seconds,
    )


# --------------------------------------------------------------------------- our path


def measure_training(
    train_split: datasets.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norm: str,
    path: str,
    memory_format: torch.memory_format,
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> Measurement:
    """`engine.train_one_epoch` as `train` sets it up; `path="ceiling"` repeats one fixed batch."""
    device = train_split.images.device
    torch.manual_seed(seed)
    model = build_model(norm=norm, groups=DEFAULTS.groups, dropout=DEFAULTS.dropout)
    model = model.to(device=device, memory_format=memory_format)
    normalize = datasets.Normalizer(stats, device=device, memory_format=memory_format)
    generator = torch.Generator().manual_seed(seed)
    optimizer = engine.make_optimizer(
        model,
        learning_rate=DEFAULTS.learning_rate,
        momentum=DEFAULTS.momentum,
        weight_decay=DEFAULTS.weight_decay,
    )
    scheduler = engine.make_scheduler(
        optimizer,
        epochs=DEFAULTS.epochs,
        steps_per_epoch=len(train_split) // batch_size,
        warmup_epochs=DEFAULTS.warmup_epochs,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=DEFAULTS.label_smoothing)

    def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return datasets.train_batches(
            train_split, batch_size=batch_size, generator=generator, normalize=normalize
        )

    if path == "ceiling":
        batches = itertools.repeat(next(epoch_batches()))  # prepared once, outside the clock
    else:
        batches = endless(epoch_batches)

    def train_steps(count: int) -> None:
        engine.train_one_epoch(
            model,
            itertools.islice(batches, count),
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            autocast_dtype=autocast_dtype,
            device=device,
            steps=count,
            description=f"{norm} {path}",
        )

    seconds = timed_steps(train_steps, warmup_steps=warmup_steps, steps=steps, device=device)
    return Measurement(
        norm=norm,
        path=path,
        batch_size=batch_size,
        layout=LAYOUT_NAMES[memory_format],
        precision=PRECISION_NAMES[autocast_dtype],
        images=steps * batch_size,
        seconds=seconds,
    )


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
        setup.test_split,
        normalize=setup.normalize,
        autocast_dtype=setup.autocast_dtype,
    )


def log_each_epoch(record: engine.EpochMetrics, state: engine.TrainingState) -> None:
    """The per-epoch part of `train_model`'s callback: metrics and the resumable checkpoint."""
    tracking.log_epoch(record)
    tracking.log_checkpoint(state.state_dict())


def train_tracked(config: TrainConfig) -> None:
    # train_model reports each epoch on stdout; the report must stay clean Markdown.
    with contextlib.redirect_stdout(io.StringIO()):
        train_model(config)


def timed(function: Callable[[], None]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure_evaluation(
    test_split: datasets.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norm: str,
    tta: str,
    batch_size: int,
    memory_format: torch.memory_format,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> EvaluationCost:
    """`engine.evaluate` over the whole test split as `fit` runs it after each epoch (after one
    untimed evaluation of a batch: first-call allocations)."""
    device = test_split.images.device
    torch.manual_seed(seed)
    model = build_model(norm=norm, groups=DEFAULTS.groups).to(device, memory_format=memory_format)
    normalize = datasets.Normalizer(stats, device=device, memory_format=memory_format)
    warmup = datasets.DeviceSplit(test_split.images[:batch_size], test_split.labels[:batch_size])

    def run(split: datasets.DeviceSplit) -> None:
        engine.evaluate(
            model,
            split,
            normalize=normalize,
            batch_size=batch_size,
            autocast_dtype=autocast_dtype,
            tta=tta,
        )

    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    run(warmup)  # one batch: counts the forward passes per batch
    hook.remove()
    synchronize(device)
    seconds = timed(lambda: (run(test_split), synchronize(device)))
    return EvaluationCost(
        norm=norm,
        tta=tta,
        batch_size=batch_size,
        passes=len(calls),
        images=len(test_split),
        seconds=seconds,
    )


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
    )


# --------------------------------------------------------------------------- report


def format_rate(value: float) -> str:
    return f"{value:,.0f}"


def throughput_table(measurements: list[Measurement]) -> list[str]:
    lines = [
        "| norm | path | batch | layout | precision | images/s |",
        "|---|---|---:|---|---|---:|",
    ]
    for item in measurements:
        lines.append(
            f"| {item.norm} | {item.path} | {item.batch_size} | {item.layout} | "
            f"{item.precision} | {format_rate(item.images_per_second)} |"
        )
    return lines


def ratio_table(
    norms: list[str], rates: dict[tuple[str, str], float], costs: dict[str, TrackingCost]
) -> list[str]:
    lines = [
        "| norm | pipeline / reference | pipeline / ceiling | tracking overhead |",
        "|---|---:|---:|---:|",
    ]
    for norm in norms:
        pipeline = rates[norm, "pipeline"]
        overhead = f"{costs[norm].overhead_percent:+.1f}%" if norm in costs else "not measured"
        lines.append(
            f"| {norm} | {pipeline / rates[norm, 'reference']:.2f}x | "
            f"{pipeline / rates[norm, 'ceiling']:.2f} | {overhead} |"
        )
    return lines


def tracking_table(costs: list[TrackingCost]) -> list[str]:
    lines = [
        "| norm | untracked s | per-epoch logging s | tracked s | logging s/epoch | "
        "fixed s/run | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cost in costs:
        lines.append(
            f"| {cost.norm} | {cost.untracked_seconds:.1f} | {cost.epoch_logged_seconds:.1f} | "
            f"{cost.tracked_seconds:.1f} | {cost.logging_seconds_per_epoch:.2f} | "
            f"{cost.fixed_seconds_per_run:.1f} | {cost.overhead_percent:+.1f}% |"
        )
    return lines


def evaluation_table(
    costs: list[EvaluationCost],
    rates: dict[tuple[str, str], float],
    *,
    train_images: int,
    default_batch_size: int,
) -> list[str]:
    lines = [
        "| norm | tta | batch | forward passes | evaluation s | vs default | share of an epoch "
        "| default |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for cost in costs:
        is_default = (cost.tta, cost.batch_size) == (DEFAULTS.tta, default_batch_size)
        default = next(
            c
            for c in costs
            if c.norm == cost.norm and (c.tta, c.batch_size) == (DEFAULTS.tta, default_batch_size)
        )
        # An epoch: the training images at the pipeline's rate, then this evaluation.
        training_seconds = train_images / rates[cost.norm, "pipeline"]
        share = cost.seconds / (training_seconds + cost.seconds)
        lines.append(
            f"| {cost.norm} | {cost.tta} | {cost.batch_size} | {cost.passes} | "
            f"{cost.seconds:.3f} | {cost.seconds / default.seconds:.2f} | {100 * share:.1f}% | "
            f"{'yes' if is_default else ''} |"
        )
    return lines


def layout_table(
    measurements: list[Measurement], defaults: dict[str, tuple[str, str]]
) -> list[str]:
    lines = [
        "| norm | layout | precision | ceiling images/s | vs default | default |",
        "|---|---|---|---:|---:|---|",
    ]
    for norm, chosen in defaults.items():
        rows = [item for item in measurements if item.norm == norm]
        baseline = next(item for item in rows if (item.layout, item.precision) == chosen)
        for item in rows:
            is_default = (item.layout, item.precision) == chosen
            lines.append(
                f"| {norm} | {item.layout} | {item.precision} | "
                f"{format_rate(item.images_per_second)} | "
                f"{item.images_per_second / baseline.images_per_second:.2f} | "
                f"{'yes' if is_default else ''} |"
            )
    return lines


# --------------------------------------------------------------------------- main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/benchmark.py",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"dataset for pipeline.data.load_dataset, relative to the repository root; "
        f"default {DEFAULT_DATA}",
    )
    parser.add_argument(
        "--norms", default="batch,group,layer", help="comma-separated norms; default all"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu, the default), cpu, cuda, mps"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes of the reference; default 2",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"our batch size (the reference always uses {REFERENCE_BATCH_SIZE}); default "
        f"{FULL_SETTINGS['batch_size']} (train's default), --quick {QUICK_SETTINGS['batch_size']}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"timed steps at our batch size (the reference times as many images); "
        f"default {FULL_SETTINGS['steps']}, --quick {QUICK_SETTINGS['steps']}",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"untimed steps first; default {FULL_SETTINGS['warmup_steps']}, "
        f"--quick {QUICK_SETTINGS['warmup_steps']}",
    )
    parser.add_argument(
        "--layouts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the ceiling in NCHW / channels_last x fp32 / bf16 autocast; default on",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time one test-split evaluation per test-time augmentation; default on",
    )
    parser.add_argument(
        "--layout-steps",
        type=int,
        help=f"timed steps per layout; default {FULL_SETTINGS['layout_steps']}, "
        f"--quick {QUICK_SETTINGS['layout_steps']}",
    )
    parser.add_argument(
        "--tracked-images",
        type=int,
        help=f"training images for the tracking comparison; default "
        f"{FULL_SETTINGS['tracked_images']}, --quick {QUICK_SETTINGS['tracked_images']}",
    )
    parser.add_argument(
        "--tracked-test-images",
        type=int,
        help=f"test images for the tracking comparison; default "
        f"{FULL_SETTINGS['tracked_test_images']}, --quick {QUICK_SETTINGS['tracked_test_images']}",
    )
    parser.add_argument(
        "--tracked-epochs",
        type=int,
        help=f"epochs for the tracking comparison; default {FULL_SETTINGS['tracked_epochs']}, "
        f"--quick {QUICK_SETTINGS['tracked_epochs']}",
    )
    parser.add_argument(
        "--tracked-norms",
        help="norms for the tracking comparison; default all of --norms, --quick the first",
    )
    parser.add_argument(
        "--tracking",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the MLflow tracking overhead (needs MLflow); default on",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--quick", action="store_true", help="smoke run in under a minute")
    arguments = parser.parse_args(argv)
    settings = QUICK_SETTINGS if arguments.quick else FULL_SETTINGS
    for name, value in settings.items():
        if getattr(arguments, name, None) is None:
            setattr(arguments, name, value)
    for name in ("steps", "warmup_steps", "layout_steps", "tracked_epochs", "batch_size"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if arguments.workers < 0:
        parser.error("--workers must be at least 0")
    try:
        arguments.norms = parse_norms(arguments.norms)
        if arguments.tracked_norms is None:
            arguments.tracked_norms = arguments.norms[:1] if arguments.quick else arguments.norms
        else:
            arguments.tracked_norms = parse_norms(arguments.tracked_norms)
        arguments.device = engine.resolve_device(arguments.device)
    except ValueError as error:  # ConfigError and an absent device
        parser.error(str(error))
    return arguments


def run_benchmark(arguments: argparse.Namespace, *, command: str) -> str:
    """Measure everything the options ask for and return the Markdown report."""
    device = arguments.device
    engine.configure_backend(device)
    data_path = Path(arguments.data).expanduser()
    if not data_path.is_absolute():
        data_path = REPOSITORY_ROOT / data_path

    progress(f"loading {data_path}")
    started = time.perf_counter()
    datasets.load_dataset(data_path)  # decodes on the very first use, then reads the cache
    first_load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dataset = datasets.load_dataset(data_path)
    cached_load_seconds = time.perf_counter() - started
    stats = datasets.cached_stats(dataset)
    train_count, test_count = len(dataset.train_labels), len(dataset.test_labels)
    batch_size = arguments.batch_size
    if batch_size > train_count:
        raise ConfigError(
            f"--batch-size must be at most the training split's {train_count} images "
            f"(got {batch_size})"
        )
    train_split = datasets.to_device(dataset.train_images, dataset.train_labels, device=device)
    autocast_dtype = engine.resolve_precision("auto", device)
    # The reference times as many images as our path, in batches of 64.
    reference_steps = max(1, arguments.steps * batch_size // REFERENCE_BATCH_SIZE)
    # Enough untimed batches for every worker to have started and filled its prefetch queue.
    reference_warmup = max(
        arguments.warmup_steps * batch_size // REFERENCE_BATCH_SIZE, 2 * arguments.workers + 1
    )
    if reference_warmup + reference_steps > train_count // REFERENCE_BATCH_SIZE:
        progress("note: the reference steps span more than one epoch of the data")

    measurements: list[Measurement] = []
    rates: dict[tuple[str, str], float] = {}
    for norm in arguments.norms:
        memory_format = engine.memory_format_for(norm, device)
        progress(f"{norm}: reference ({reference_steps} steps of {REFERENCE_BATCH_SIZE})")
        results = [
            measure_reference(
                dataset,
                stats,
                norm=norm,
                device=device,
                workers=arguments.workers,
                steps=reference_steps,
                warmup_steps=reference_warmup,
                seed=arguments.seed,
            )
        ]
        for path in ("pipeline", "ceiling"):
            progress(f"{norm}: {path} ({arguments.steps} steps of {batch_size})")
            results.append(
                measure_training(
                    train_split,
                    stats,
                    norm=norm,
                    path=path,
                    memory_format=memory_format,
                    autocast_dtype=autocast_dtype,
                    batch_size=batch_size,
                    steps=arguments.steps,
                    warmup_steps=arguments.warmup_steps,
                    seed=arguments.seed,
                )
            )
        for result in results:
            rates[norm, result.path.split(" ")[0]] = result.images_per_second
        measurements.extend(results)

    layout_measurements: list[Measurement] = []
    layout_defaults: dict[str, tuple[str, str]] = {}
    if arguments.layouts:
        for norm in arguments.norms:
            layout_defaults[norm] = (
                LAYOUT_NAMES[engine.memory_format_for(norm, device)],
                PRECISION_NAMES[autocast_dtype],
            )
            for memory_format in (torch.contiguous_format, torch.channels_last):
                for dtype in (None, torch.bfloat16):
                    layout = f"{LAYOUT_NAMES[memory_format]}, {PRECISION_NAMES[dtype]}"
                    progress(f"{norm}: ceiling {layout} ({arguments.layout_steps} steps)")
                    layout_measurements.append(
                        measure_training(
                            train_split,
                            stats,
                            norm=norm,
                            path="ceiling",
                            memory_format=memory_format,
                            autocast_dtype=dtype,
                            batch_size=batch_size,
                            steps=arguments.layout_steps,
                            warmup_steps=arguments.warmup_steps,
                            seed=arguments.seed,
                        )
                    )
    del train_split  # free the device copy before the tracked runs load their own

    evaluation_costs: list[EvaluationCost] = []
    eval_batch_size = engine.eval_batch_size_for(device)
    # The default evaluation batch, and the GPU's 1,024 beside it where the default differs.
    eval_batch_sizes = sorted({eval_batch_size, EVAL_BATCH_SIZE_BEFORE})
    if arguments.tta:
        test_split = datasets.to_device(dataset.test_images, dataset.test_labels, device=device)
        for norm, tta, size in itertools.product(arguments.norms, TTA_MODES, eval_batch_sizes):
            progress(f"{norm}: evaluation of {test_count:,} test images, tta={tta}, batch {size}")
            evaluation_costs.append(
                measure_evaluation(
                    test_split,
                    stats,
                    norm=norm,
                    tta=tta,
                    batch_size=size,
                    memory_format=engine.memory_format_for(norm, device),
                    autocast_dtype=autocast_dtype,
                    seed=arguments.seed,
                )
            )
        del test_split

    costs: dict[str, TrackingCost] = {}
    if mlflow is None or not arguments.tracking:
        arguments.tracked_norms = []
        progress("tracking: skipped (--no-tracking, or MLflow is not installed)")
    if arguments.tracked_norms:
        tracked_images = min(arguments.tracked_images, train_count)
        tracked_test_images = min(arguments.tracked_test_images, test_count)
        if tracked_images < batch_size:
            raise ConfigError(
                f"--tracked-images must be at least the batch size {batch_size} "
                f"(got {tracked_images})"
            )
        with tempfile.TemporaryDirectory(prefix="benchmark-") as directory:
            temporary = Path(directory)
            progress(f"tracking: temporary SQLite store and subset in {temporary}")
            subset = write_cifar_subset(
                dataset,
                temporary / "subset",
                train_images=tracked_images,
                test_images=tracked_test_images,
                seed=arguments.seed,
            )
            warmup_subset = write_cifar_subset(
                dataset,
                temporary / "warmup-subset",
                train_images=batch_size,
                test_images=min(batch_size, test_count),
                seed=arguments.seed,
            )
            with temporary_tracking_store(temporary):
                # Decode and cache the subset once, as a second `train` on the same data finds it.
                datasets.cached_stats(datasets.load_dataset(subset))
                epochs = arguments.tracked_epochs
                settings = {
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "warmup_epochs": min(DEFAULTS.warmup_epochs, float(epochs)),
                    "device": device.type,
                    "seed": arguments.seed,
                }
                cold_seconds = None
                if arguments.tracking_warmup:
                    progress("tracking: one untimed train_model run (imports, first model export)")
                    cold_seconds = timed(
                        lambda: train_tracked(
                            TrainConfig(
                                norm=arguments.tracked_norms[0],
                                data=str(warmup_subset),
                                **{**settings, "epochs": 1, "warmup_epochs": 0.0},
                            )
                        )
                    )
                for norm in arguments.tracked_norms:
                    progress(f"{norm}: untracked, per-epoch logging, tracked ({epochs} epochs)")
                    costs[norm] = measure_tracking(
                        TrainConfig(norm=norm, data=str(subset), **settings)
                    )

    timing = (
        f"{arguments.warmup_steps} untimed warm-up steps, then {arguments.steps} timed steps of "
        f"{batch_size} images; the reference times the same number of images in "
        f"{reference_steps} steps of {REFERENCE_BATCH_SIZE} after {reference_warmup} warm-up "
        f"steps. Threads from `engine.configure_backend()`; `time.perf_counter`"
        f"{', CUDA synchronized' if device.type == 'cuda' else ''}."
    )
    lines = [
        "## Training throughput",
        "",
        f"- Machine: {machine_description(device)}",
        f"- Data: `{arguments.data}` ({train_count:,} train / {test_count:,} test images); "
        f"cached dataset load {cached_load_seconds:.2f} s (target < 2 s; first load in this "
        f"process {first_load_seconds:.2f} s)",
        f"- Command: `{command}`",
        f"- Timing: {timing}",
        "",
        *throughput_table(measurements),
        "",
        *ratio_table(arguments.norms, rates, costs),
        "",
        "`reference`: PIL image per sample + RandomCrop(32, padding=4), RandomHorizontalFlip, "
        "ToTensor, Normalize in a DataLoader, NCHW fp32, SGD momentum 0.9. `pipeline`: "
        "`train_batches` on device-resident uint8 splits, `engine.train_one_epoch` with the "
        "default layout and precision. `ceiling`: the same step on one fixed prepared batch. "
        "`pipeline / ceiling` near 1 means the data path costs next to nothing.",
        "",
    ]
    if costs:
        lines += [
            "### Tracking overhead",
            "",
            f"Subset of {tracked_images:,} train / {tracked_test_images:,} test images, "
            f"{arguments.tracked_epochs} epoch(s), batch {batch_size}, temporary SQLite store. "
            "`tracked`: `pipeline.cli.train_model` (params, dataset, per-epoch metrics and "
            "checkpoint, figures, exported model, registry). `untracked`: the same loading, "
            "`engine.fit(on_epoch_end=None)` and final evaluation. `per-epoch logging`: "
            "`engine.fit` "
            "with `on_epoch_end` = `tracking.log_epoch` + `tracking.log_checkpoint` inside "
            "`tracking.run`. Overhead = (tracked - untracked) / untracked wall time; the fixed "
            "part is paid once per run, so it weighs less in a full-length run. "
            + (
                f"The first `train_model` call in the process (untimed) took {cold_seconds:.1f} s."
                if cold_seconds is not None
                else "No untimed `train_model` call first (--quick): one-time imports are included."
            ),
            "",
            *tracking_table(list(costs.values())),
        ]
    else:
        lines += ["Tracking overhead: not measured (--no-tracking, or MLflow is not installed)."]
    if evaluation_costs:
        lines += [
            "",
            "### Evaluation per test-time augmentation",
            "",
            f"One evaluation of the {test_count:,} test images (the default layout and "
            "precision) per test-time augmentation and evaluation batch, as `train` runs after "
            "every epoch; `default`: `train`'s `tta` at `engine.eval_batch_size_for` this "
            "device, and `vs default` the time relative to it; `share of an epoch`: this "
            f"evaluation over itself plus {train_count:,} training images at the `pipeline` "
            "rate above.",
            "",
            *evaluation_table(
                evaluation_costs,
                rates,
                train_images=train_count,
                default_batch_size=eval_batch_size,
            ),
        ]
    if arguments.layouts:
        lines += [
            "",
            "### Layout and precision (ceiling)",
            "",
            f"{arguments.layout_steps} timed steps of {batch_size} per row; `default` marks what "
            "`engine.memory_format_for` and `engine.resolve_precision('auto')` pick on this "
            "device; `vs default` is images/s relative to that row.",
            "",
            *layout_table(layout_measurements, layout_defaults),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark and print the Markdown report; returns the exit code."""
    arguments = parse_arguments(argv)
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/benchmark.py", *map(shlex.quote, words)])
    user_errors = (ConfigError, datasets.DataError)
    if tracking is not None:
        user_errors += (tracking.TrackingError,)
    try:
        report = run_benchmark(arguments, command=command)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
