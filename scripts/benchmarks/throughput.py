"""How fast does `train` feed the model? Training images/s of the torchvision reference, of our
pipeline and of the model alone (`ceiling`), per norm, on the same machine and data; our paths
time each norm's recipe as `train` builds it (`benchmarks.recipe`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks import recipe
from benchmarks.timing import progress, timed_steps
from pipeline import batches as batching
from pipeline import data as datasets
from pipeline import device as devices
from pipeline import engine, graphs, training
from pipeline.config import TrainConfig
from pipeline.model import Net

if TYPE_CHECKING:
    from benchmarks.tracking_overhead import TrackingCost

DEFAULTS = TrainConfig()
REFERENCE_BATCH_SIZE = 64
REFERENCE_LEARNING_RATE = 0.01  # the torchvision tutorial's value; speed does not depend on it
LAYOUT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "channels_last"}
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
    warmup_seconds: float = 0.0  # the untimed steps (with torch.compile: its compilation)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class Throughput:
    """Every throughput row, images/s per (norm, path) and the steps the reference timed."""

    measurements: list[Measurement]
    rates: dict[tuple[str, str], float]
    reference_steps: dict[str, int]  # per norm
    reference_warmup: dict[str, int]
    batch_size: int | None = None  # --batch-size, over every recipe's own; None: the recipes'


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
    model = Net(norm=norm, groups=DEFAULTS.groups).to(device)
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
    _, seconds = timed_steps(train_steps, warmup_steps=warmup_steps, steps=steps, device=device)
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
    train_split: batching.DeviceSplit,
    stats: datasets.DatasetStats,
    config: TrainConfig,
    *,
    path: str,
    steps: int,
    warmup_steps: int,
    memory_format: torch.memory_format | None = None,
) -> Measurement:
    """`engine.train_one_epoch` of `config`'s recipe, built as `train` builds it
    (`recipe.build`: `training.build_model` + `training.build_training`); `path="ceiling"`
    repeats one fixed batch. `config` carries what a question varies (batch size, precision,
    `compile=on`, `cuda_graphs=on`: a graph's eager warm-up and capture are among the untimed
    steps); `memory_format` overrides the layout `train` picks."""
    device = train_split.images.device
    memory_format = memory_format or devices.memory_format_for(config.norm, device)
    normalize = batching.Normalizer(stats, device=device, memory_format=memory_format)
    built = recipe.build(
        config,
        device=device,
        train_images=len(train_split),
        memory_format=memory_format,
        whitening_images=normalize(train_split.images[: training.WHITENING_IMAGES])
        if config.whiten
        else None,
    )
    step = built.training.step
    if step.cuda_graph:
        warmup_steps = max(warmup_steps, graphs.GRAPH_WARMUP_STEPS + 1)
    if path == "ceiling":  # prepared once, outside the clock
        batches = itertools.repeat(next(iter(recipe.epoch_batches(built, train_split, normalize))))
    else:
        batches = endless(lambda: recipe.epoch_batches(built, train_split, normalize))

    def train_steps(count: int) -> None:
        engine.train_one_epoch(
            step,
            itertools.islice(batches, count),
            scheduler=built.training.scheduler,
            steps=count,
            description=f"{config.norm} {path}",
        )

    warmup_seconds, seconds = timed_steps(
        train_steps, warmup_steps=warmup_steps, steps=steps, device=device
    )
    return Measurement(
        norm=config.norm,
        path=path,
        batch_size=config.batch_size,
        layout=LAYOUT_NAMES[memory_format],
        precision=PRECISION_NAMES[built.autocast_dtype],
        images=steps * config.batch_size,
        seconds=seconds,
        warmup_seconds=warmup_seconds,
    )


def measure(
    dataset: datasets.ArrayDataset,
    stats: datasets.DatasetStats,
    train_split: batching.DeviceSplit,
    *,
    norms: list[str],
    device: torch.device,
    workers: int,
    batch_size: int | None,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> Throughput:
    """The reference, the pipeline and the ceiling for each norm, each at its recipe
    (`batch_size` overrides the recipe's batch), at the layout and precision `train` picks on
    this device, eager, and the pipeline in the other precision side by side where the device
    has native bf16 (`pipeline fp32` or `pipeline bf16`)."""
    train_count = len(dataset.train_labels)
    measurements: list[Measurement] = []
    rates: dict[tuple[str, str], float] = {}
    reference_steps: dict[str, int] = {}
    reference_warmup: dict[str, int] = {}
    for norm in norms:
        # The main table times the eager step on every device; --graphs times the graphed one.
        config = TrainConfig(norm=norm, batch_size=batch_size or 0, seed=seed, cuda_graphs="off")
        # The reference times as many images as our path, in batches of 64.
        reference_steps[norm] = max(1, steps * config.batch_size // REFERENCE_BATCH_SIZE)
        # Enough untimed batches for every worker to have started and filled its prefetch queue.
        reference_warmup[norm] = max(
            warmup_steps * config.batch_size // REFERENCE_BATCH_SIZE, 2 * workers + 1
        )
        if reference_warmup[norm] + reference_steps[norm] > train_count // REFERENCE_BATCH_SIZE:
            progress("note: the reference steps span more than one epoch of the data")
        progress(f"{norm}: reference ({reference_steps[norm]} steps of {REFERENCE_BATCH_SIZE})")
        results = [
            measure_reference(
                dataset,
                stats,
                norm=norm,
                device=device,
                workers=workers,
                steps=reference_steps[norm],
                warmup_steps=reference_warmup[norm],
                seed=seed,
            )
        ]
        autocast_dtype = devices.resolve_precision(config.precision, device, norm=norm)
        paths = [("pipeline", config), ("ceiling", config)]
        if autocast_dtype is not None:
            paths.insert(1, ("pipeline fp32", dataclasses.replace(config, precision="fp32")))
        elif device.type == "cuda" or devices.cpu_has_native_bf16():
            paths.insert(1, ("pipeline bf16", dataclasses.replace(config, precision="bf16")))
        for path, path_config in paths:
            progress(f"{norm}: {path} ({steps} steps of {config.batch_size})")
            results.append(
                measure_training(
                    train_split,
                    stats,
                    path_config,
                    path=path.split(" ")[0],
                    steps=steps,
                    warmup_steps=warmup_steps,
                )
            )
        for (path, _), result in zip(paths, results[1:], strict=True):
            rates[norm, path] = result.images_per_second
        rates[norm, "reference"] = results[0].images_per_second
        measurements.extend(results)
    return Throughput(measurements, rates, reference_steps, reference_warmup, batch_size)


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
        "| norm | pipeline / reference | pipeline bf16 / fp32 | pipeline / ceiling "
        "| tracking overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    for norm in norms:
        pipeline = rates[norm, "pipeline"]
        overhead = f"{costs[norm].overhead_percent:+.1f}%" if norm in costs else "not measured"
        if (norm, "pipeline fp32") in rates:  # the default is bf16
            bf16_per_fp32 = f"{pipeline / rates[norm, 'pipeline fp32']:.2f}x"
        elif (norm, "pipeline bf16") in rates:
            bf16_per_fp32 = f"{rates[norm, 'pipeline bf16'] / pipeline:.2f}x"
        else:
            bf16_per_fp32 = "(no native bf16)"
        lines.append(
            f"| {norm} | {pipeline / rates[norm, 'reference']:.2f}x | {bf16_per_fp32} | "
            f"{pipeline / rates[norm, 'ceiling']:.2f} | {overhead} |"
        )
    return lines


def report(
    result: Throughput,
    *,
    norms: list[str],
    costs: dict[str, TrackingCost],
    device: torch.device,
    steps: int,
    warmup_steps: int,
) -> list[str]:
    """The timing line, both tables and what each path is."""
    reference = ", ".join(
        f"{norm} {result.reference_steps[norm]} after {result.reference_warmup[norm]}"
        for norm in norms
    )
    timing = (
        f"{warmup_steps} untimed warm-up steps, then {steps} timed steps of each norm's batch "
        f"(`batch` below); the reference times the same number of images in steps of "
        f"{REFERENCE_BATCH_SIZE} ({reference} warm-up steps). Threads from "
        f"`devices.configure_backend()`; `time.perf_counter`"
        f"{', CUDA synchronized' if device.type == 'cuda' else ''}."
    )
    return [
        f"- Timing: {timing}",
        f"- {recipe.caption(norms, batch_size=result.batch_size)}",
        "",
        *throughput_table(result.measurements),
        "",
        *ratio_table(norms, result.rates, costs),
        "",
        "`reference`: PIL image per sample + RandomCrop(32, padding=4), RandomHorizontalFlip, "
        "ToTensor, Normalize in a DataLoader, NCHW fp32, the norm's `Net` with the shared "
        "layers (ReLU, max pool) and plain SGD momentum 0.9, as before the per-norm recipes: "
        "the comparison baseline, so `pipeline / reference` includes the recipe's own step "
        "cost. `pipeline`: the recipe's step as `train` builds it, eager, on `train_batches` "
        "of device-resident uint8 splits through `engine.train_one_epoch`, at the default "
        "layout and precision. `ceiling`: the same step on one fixed prepared batch. "
        "`pipeline / ceiling` near 1 means the data path costs next to nothing.",
        "",
    ]
