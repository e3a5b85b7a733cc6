"""Does `train --compile on` pay? The ceiling step of each norm's recipe (as `train` builds it)
eager vs torch.compile'd, at the precision `train` picks, with the compilation's cost, and what
both imply for one 20-epoch run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from benchmarks import recipe
from benchmarks.throughput import Measurement, format_rate, measure_training
from benchmarks.timing import progress
from pipeline import batches
from pipeline import data as datasets
from pipeline.config import MAX_EPOCHS, TrainConfig


@dataclass(frozen=True)
class CompileCost:
    norm: str
    eager: Measurement
    compiled: Measurement


def measure(
    train_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norms: list[str],
    device: torch.device,
    batch_size: int | None,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> list[CompileCost]:
    """Eager and compiled ceiling per norm's recipe (`batch_size` overrides its batch; eager
    steps, no CUDA graphs, as `train --compile on` runs); the compiled warm-up includes the
    compilation."""
    costs = []
    for norm in norms:
        config = TrainConfig(norm=norm, batch_size=batch_size or 0, seed=seed, cuda_graphs="off")
        options = {"path": "ceiling", "steps": steps, "warmup_steps": warmup_steps}
        progress(
            f"{norm}: ceiling eager, then torch.compile'd ({steps} steps of {config.batch_size})"
        )
        eager = measure_training(train_split, stats, config, **options)
        compiled = measure_training(
            train_split, stats, dataclasses.replace(config, compile="on"), **options
        )
        costs.append(CompileCost(norm, eager, compiled))
    return costs


def report(
    costs: list[CompileCost],
    *,
    train_count: int,
    warmup_steps: int,
    batch_size: int | None = None,
) -> list[str]:
    lines = [
        "",
        "### torch.compile (ceiling)",
        "",
        f"The same step eager and after `model.compile()` (what `train --compile on` does), at "
        f"the precision `train` picks. `warm-up` is the first {warmup_steps} steps: for the "
        f"compiled model, its compilation. `{MAX_EPOCHS} epochs` is the training steps of one "
        f"{MAX_EPOCHS}-epoch run over {train_count:,} images at the ceiling's rate, plus the "
        "warm-up; the evaluation's own compilation (eval mode, other batch sizes) comes on top. "
        + recipe.caption([cost.norm for cost in costs], batch_size=batch_size),
        "",
        "| norm | precision | eager images/s | compiled images/s | compiled / eager "
        f"| compile warm-up | {MAX_EPOCHS} epochs eager | {MAX_EPOCHS} epochs compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cost in costs:
        eager, compiled = cost.eager, cost.compiled
        run = [
            MAX_EPOCHS * train_count / item.images_per_second + item.warmup_seconds
            for item in (eager, compiled)
        ]
        lines.append(
            f"| {cost.norm} | {eager.precision} | {format_rate(eager.images_per_second)} | "
            f"{format_rate(compiled.images_per_second)} | "
            f"{compiled.images_per_second / eager.images_per_second:.2f}x | "
            f"{compiled.warmup_seconds:.0f} s | {run[0] / 60:.1f} min | {run[1] / 60:.1f} min |"
        )
    return lines
