"""Training throughput, side by side in one process: the reference loader, our pipeline, the model.

Run from the repository root (about 10 minutes on 2 CPU cores with the defaults):

    python scripts/benchmark.py > benchmark.md

Measured for each norm, on the same machine, model and data, after untimed warm-up steps:

* `reference`: torchvision's CIFAR-10 recipe (a PIL image per sample, per-sample RandomCrop,
  RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with worker processes, batch 64,
  NCHW fp32, SGD with momentum 0.9);
* `pipeline`: what `train` runs (uint8 splits on the device, batch-wise augmentation, the
  `engine` defaults for layout and precision, `engine.train_one_epoch`), tracking off, each norm
  at its recipe: `TrainConfig(norm=norm)` through `training.build_model` +
  `training.build_training`, the builder `train` uses (`benchmarks.recipe`), so its model,
  optimizer (Muon for the conv filters of the study norms), schedule and step are `train`'s;
* `ceiling`: the same step on one fixed, already prepared batch: what the model alone costs;
* `tracked` / `untracked`: `pipeline.runs.train_model` with MLflow on a temporary SQLite store
  vs the same work through `engine.fit` without a callback, on a subset for a few epochs.

The `--tta` section times one evaluation of the test split per test-time augmentation (what
each epoch of `train` adds after its training steps). The `--layouts` section measures the
ceiling in NCHW vs channels_last and fp32 vs bf16 autocast, the numbers behind
`devices.memory_format_for` and `devices.resolve_precision`, and one GroupNorm layer alone per
layout and precision (why `norms.FloatGroupNorm` exists) and one batch norm layer over ghost
batches (`norms.GhostBatchNorm2d` against the groups side by side as channels and the same
statistics in separate ops, as a layer and, on a CPU, as a whole training step) and filter
response norm (`norms.FilterResponseNorm2d` against the paper's `torch.maximum` TLU); `--compile`
times the ceiling eager vs torch.compile'd, with its compilation. The report is Markdown
(stdout) to paste into docs/speed.md; progress goes to stderr.

Every question that times a training step, an epoch or an evaluation builds it from the norm's
recipe through `benchmarks.recipe`, overriding only what it varies (batch size, precision,
`compile`, `cuda_graphs`, `norm_batch`, the layout); the kernel tables time one layer alone.

This file parses the options, describes the machine and assembles the report; each question is
a module of scripts/benchmarks/ (throughput, layouts, evaluation, tracking_overhead, ...) on the
one clock of benchmarks.timing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from pipeline import batches
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import ConfigError, TrainConfig, parse_norms

# scripts/ is not a package: the questions' package sits beside this file, also when imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks import (  # noqa: E402
    compiled,
    evaluation,
    graphs,
    layouts,
    norm_kernels,
    throughput,
    tracking_overhead,
)
from benchmarks.throughput import REFERENCE_BATCH_SIZE  # noqa: E402
from benchmarks.timing import progress  # noqa: E402

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10-dev.tar.gz"  # relative to the repository root
DEFAULTS = TrainConfig()

# Sized so that the whole benchmark takes about 10 minutes on 2 CPU cores: bf16 autocast on a CPU
# without native bf16 is several times slower than fp32, hence few layout steps. --quick is a smoke
# run (smaller batches, the tracking comparison for the first norm only, no tracking warm-up): its
# numbers show that everything runs, not how fast.
FULL_SETTINGS = {
    "batch_size": None,  # each norm's recipe
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


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    """CPU model, usable CPUs and torch threads, vector ISA and native bf16, GPU, versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = "native bf16" if devices.cpu_has_native_bf16() else "no native bf16"
    device_name = str(device)
    if device.type == "cuda":
        device_name = f"cuda ({torch.cuda.get_device_name(device)})"
    return (
        f"{cpu_model()} ({cores} usable CPUs, {torch.get_num_threads()} torch threads, "
        f"{devices.cpu_capability()}, {bf16}), torch {torch.__version__}, "
        f"Python {platform.python_version()}, device {device_name}"
    )


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
        help=f"our batch size, over every norm's recipe (the reference always uses "
        f"{REFERENCE_BATCH_SIZE}); default each norm's recipe (train's default), --quick "
        f"{QUICK_SETTINGS['batch_size']}",
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
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="time the ceiling eager vs torch.compile'd, with the compilation (a minute or more "
        "per norm on a CPU); default off",
    )
    parser.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the training step and the evaluation eager vs as CUDA graphs, each norm at "
        "its recipe batch (CUDA only); default on for a CUDA device",
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
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if arguments.workers < 0:
        parser.error("--workers must be at least 0")
    try:
        arguments.norms = parse_norms(arguments.norms)
        if arguments.tracked_norms is None:
            arguments.tracked_norms = arguments.norms[:1] if arguments.quick else arguments.norms
        else:
            arguments.tracked_norms = parse_norms(arguments.tracked_norms)
        arguments.device = devices.resolve_device(arguments.device)
    except ValueError as error:  # ConfigError and an absent device
        parser.error(str(error))
    if arguments.graphs is None:
        arguments.graphs = arguments.device.type == "cuda"
    elif arguments.graphs and arguments.device.type != "cuda":
        parser.error(f"--graphs needs a CUDA device (got {arguments.device.type})")
    return arguments


def run_benchmark(arguments: argparse.Namespace, *, command: str) -> str:
    """Measure everything the options ask for and return the Markdown report."""
    device = arguments.device
    devices.configure_backend(device)
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
    batch_size = arguments.batch_size  # None: each norm's recipe
    largest = max(
        TrainConfig(norm=n, batch_size=batch_size or 0).batch_size for n in arguments.norms
    )
    if largest > train_count:
        raise ConfigError(
            f"the batch size must be at most the training split's {train_count} images "
            f"(got {largest}; lower it with --batch-size)"
        )
    train_split = batches.to_device(dataset.train_images, dataset.train_labels, device=device)

    speed = throughput.measure(
        dataset,
        stats,
        train_split,
        norms=arguments.norms,
        device=device,
        workers=arguments.workers,
        batch_size=batch_size,
        steps=arguments.steps,
        warmup_steps=arguments.warmup_steps,
        seed=arguments.seed,
    )
    layout_measurements: list[throughput.Measurement] = []
    layout_defaults: dict[str, tuple[str, str]] = {}
    if arguments.layouts:
        layout_measurements, layout_defaults = layouts.measure(
            train_split,
            stats,
            norms=arguments.norms,
            device=device,
            batch_size=batch_size,
            layout_steps=arguments.layout_steps,
            warmup_steps=arguments.warmup_steps,
            seed=arguments.seed,
        )
    kernel_times, ghost_times, ghost_step_times, frn_times = [], [], [], []
    if arguments.layouts:
        repeats = 5 * arguments.layout_steps
        kernel_times = norm_kernels.measure(groups=DEFAULTS.groups, repeats=repeats)
        ghost_times = norm_kernels.measure_ghost(repeats=repeats)
        if device.type == "cpu":
            ghost_step_times = norm_kernels.measure_ghost_steps(
                batch_size=batch_size, train_images=train_count, repeats=arguments.layout_steps
            )
        frn_times = norm_kernels.measure_frn(repeats=repeats)
    compile_costs: list[compiled.CompileCost] = []
    if arguments.compile:
        compile_costs = compiled.measure(
            train_split,
            stats,
            norms=arguments.norms,
            device=device,
            batch_size=batch_size,
            steps=arguments.steps,
            warmup_steps=arguments.warmup_steps,
            seed=arguments.seed,
        )
    graph_speeds: list[graphs.GraphSpeed] = []
    if arguments.graphs:
        test_split = batches.to_device(dataset.test_images, dataset.test_labels, device=device)
        graph_speeds = graphs.measure(
            train_split,
            test_split,
            stats,
            norms=arguments.norms,
            device=device,
            steps=arguments.steps,
            warmup_steps=arguments.warmup_steps,
            seed=arguments.seed,
        )
        del test_split
    del train_split  # free the device copy before the tracked runs load their own
    evaluation_costs: list[evaluation.EvaluationCost] = []
    if arguments.tta:
        evaluation_costs = evaluation.measure(
            dataset,
            stats,
            norms=arguments.norms,
            device=device,
            seed=arguments.seed,
            batch_size=batch_size,
        )
    overhead = tracking_overhead.measure(
        dataset,
        norms=arguments.tracked_norms,
        enabled=arguments.tracking,
        device=device,
        batch_size=batch_size,
        tracked_images=arguments.tracked_images,
        tracked_test_images=arguments.tracked_test_images,
        tracked_epochs=arguments.tracked_epochs,
        tracking_warmup=arguments.tracking_warmup,
        seed=arguments.seed,
    )

    lines = [
        "## Training throughput",
        "",
        f"- Machine: {machine_description(device)}",
        f"- Data: `{arguments.data}` ({train_count:,} train / {test_count:,} test images); "
        f"cached dataset load {cached_load_seconds:.2f} s (target < 2 s; first load in this "
        f"process {first_load_seconds:.2f} s)",
        f"- Command: `{command}`",
        *throughput.report(
            speed,
            norms=arguments.norms,
            costs=overhead.costs if overhead is not None else {},
            device=device,
            steps=arguments.steps,
            warmup_steps=arguments.warmup_steps,
        ),
        *tracking_overhead.report(overhead),
    ]
    if graph_speeds:
        lines += graphs.report(
            graph_speeds, steps=arguments.steps, warmup_steps=arguments.warmup_steps
        )
    if evaluation_costs:
        lines += evaluation.report(
            evaluation_costs,
            speed.rates,
            train_count=train_count,
            test_count=test_count,
            device=device,
        )
    if arguments.layouts:
        lines += layouts.report(
            layout_measurements,
            layout_defaults,
            batch_size=batch_size,
            layout_steps=arguments.layout_steps,
        )
    if kernel_times:
        lines += norm_kernels.report(kernel_times)
    if ghost_times:
        lines += norm_kernels.report_ghost(ghost_times, ghost_step_times, batch_size=batch_size)
    if frn_times:
        lines += norm_kernels.report_frn(frn_times)
    if compile_costs:
        lines += compiled.report(
            compile_costs,
            train_count=train_count,
            warmup_steps=arguments.warmup_steps,
            batch_size=batch_size,
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the benchmark and print the Markdown report; returns the exit code."""
    arguments = parse_arguments(argv)
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/benchmark.py", *map(shlex.quote, words)])
    user_errors = (ConfigError, datasets.DataError)
    if tracking_overhead.tracking is not None:
        user_errors += (tracking_overhead.tracking.TrackingError,)
    try:
        report = run_benchmark(arguments, command=command)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
