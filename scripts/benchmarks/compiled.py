"""Does `train --compile on` pay? The ceiling step eager vs torch.compile'd, per norm, at the
precision `train` picks, with the compilation's cost, and what both imply for one 20-epoch run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.throughput import Measurement, format_rate, measure_training
from benchmarks.timing import progress
from pipeline import batches
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import MAX_EPOCHS


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
    batch_size: int,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> list[CompileCost]:
    """Eager and compiled ceiling per norm; the compiled warm-up includes the compilation."""
    costs = []
    for norm in norms:
        options = {
            "norm": norm,
            "path": "ceiling",
            "memory_format": devices.memory_format_for(norm, device),
            "autocast_dtype": devices.resolve_precision("auto", device, norm=norm),
            "batch_size": batch_size,
            "steps": steps,
            "warmup_steps": warmup_steps,
            "seed": seed,
        }
        progress(f"{norm}: ceiling eager, then torch.compile'd ({steps} steps of {batch_size})")
        eager = measure_training(train_split, stats, **options)
        compiled = measure_training(train_split, stats, **options, compile_model=True)
        costs.append(CompileCost(norm, eager, compiled))
    return costs


def report(costs: list[CompileCost], *, train_count: int, warmup_steps: int) -> list[str]:
    lines = [
        "",
        "### torch.compile (ceiling)",
        "",
        f"The same step eager and after `model.compile()` (what `train --compile on` does), at "
        f"the precision `train` picks. `warm-up` is the first {warmup_steps} steps: for the "
        f"compiled model, its compilation. `{MAX_EPOCHS} epochs` is the training steps of one "
        f"{MAX_EPOCHS}-epoch run over {train_count:,} images at the ceiling's rate, plus the "
        "warm-up; the evaluation's own compilation (eval mode, other batch sizes) comes on top.",
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
