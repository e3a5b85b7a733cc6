"""Which layout and precision should `train` pick? The ceiling (the model alone on one prepared
batch) in NCHW / channels_last x fp32 / bf16 autocast, the numbers behind
`devices.memory_format_for` and `devices.resolve_precision`."""

from __future__ import annotations

import torch

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


def measure(
    train_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norms: list[str],
    device: torch.device,
    batch_size: int,
    layout_steps: int,
    warmup_steps: int,
    seed: int,
) -> tuple[list[Measurement], dict[str, tuple[str, str]]]:
    """The ceiling per norm, layout and precision, and each norm's default (layout, precision)."""
    layout_measurements: list[Measurement] = []
    layout_defaults: dict[str, tuple[str, str]] = {}
    for norm in norms:
        layout_defaults[norm] = (
            LAYOUT_NAMES[devices.memory_format_for(norm, device)],
            PRECISION_NAMES[devices.resolve_precision("auto", device, norm=norm)],
        )
        for memory_format in (torch.contiguous_format, torch.channels_last):
            for dtype in (None, torch.bfloat16):
                layout = f"{LAYOUT_NAMES[memory_format]}, {PRECISION_NAMES[dtype]}"
                progress(f"{norm}: ceiling {layout} ({layout_steps} steps)")
                layout_measurements.append(
                    measure_training(
                        train_split,
                        stats,
                        norm=norm,
                        path="ceiling",
                        memory_format=memory_format,
                        autocast_dtype=dtype,
                        batch_size=batch_size,
                        steps=layout_steps,
                        warmup_steps=warmup_steps,
                        seed=seed,
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
    batch_size: int,
    layout_steps: int,
) -> list[str]:
    return [
        "",
        "### Layout and precision (ceiling)",
        "",
        f"{layout_steps} timed steps of {batch_size} per row; `default` marks what "
        "`devices.memory_format_for` and `devices.resolve_precision('auto')` pick on this "
        "device; `vs default` is images/s relative to that row.",
        "",
        *layout_table(measurements, defaults),
    ]
