"""Which layout and precision should `train` pick? The ceiling (each norm's recipe step, as
`train` builds it, on one prepared batch) in NCHW / channels_last x fp32 / bf16 autocast, the
numbers behind `devices.memory_format_for` and `devices.resolve_precision`."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks import recipe
from benchmarks.throughput import (
    LAYOUT_NAMES,
    PRECISION_NAMES,
    Measurement,
    format_rate,
    measure_training,
)
from benchmarks.timing import progress
from pipeline import batches
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import TrainConfig

PRECISION_SETTINGS = {None: "fp32", torch.bfloat16: "bf16"}  # autocast dtype -> `precision`


def measure(
    train_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norms: list[str],
    device: torch.device,
    batch_size: int | None,
    layout_steps: int,
    warmup_steps: int,
    seed: int,
) -> tuple[list[Measurement], dict[str, tuple[str, str]]]:
    """The ceiling of each norm's recipe (eager; `batch_size` overrides its batch) per layout
    and precision, and each norm's default (layout, precision)."""
    layout_measurements: list[Measurement] = []
    layout_defaults: dict[str, tuple[str, str]] = {}
    for norm in norms:
        config = TrainConfig(norm=norm, batch_size=batch_size or 0, seed=seed, cuda_graphs="off")
        layout_defaults[norm] = (
            LAYOUT_NAMES[devices.memory_format_for(norm, device)],
            PRECISION_NAMES[devices.resolve_precision(config.precision, device, norm=norm)],
        )
        for memory_format in (torch.contiguous_format, torch.channels_last):
            for dtype in (None, torch.bfloat16):
                layout = f"{LAYOUT_NAMES[memory_format]}, {PRECISION_NAMES[dtype]}"
                progress(f"{norm}: ceiling {layout} ({layout_steps} steps)")
                layout_measurements.append(
                    measure_training(
                        train_split,
                        stats,
                        dataclasses.replace(config, precision=PRECISION_SETTINGS[dtype]),
                        path="ceiling",
                        memory_format=memory_format,
                        steps=layout_steps,
                        warmup_steps=warmup_steps,
                    )
                )
    return layout_measurements, layout_defaults


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


def report(
    measurements: list[Measurement],
    defaults: dict[str, tuple[str, str]],
    *,
    batch_size: int | None,
    layout_steps: int,
) -> list[str]:
    return [
        "",
        "### Layout and precision (ceiling)",
        "",
        f"{layout_steps} timed steps of each norm's batch per row; `default` marks what "
        "`devices.memory_format_for` and `devices.resolve_precision('auto')` pick on this "
        "device; `vs default` is images/s relative to that row. "
        + recipe.caption(list(defaults), batch_size=batch_size),
        "",
        *layout_table(measurements, defaults),
    ]
