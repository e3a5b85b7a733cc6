"""Why is group norm slower in bf16? One GroupNorm layer alone, forward and backward, per layout
and precision: the kernel behind `model.FloatGroupNorm`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import progress, timed
from pipeline.model import FloatGroupNorm

SHAPE = (256, 32, 16, 16)  # a batch of C4's output: the most common normalized activation


@dataclass(frozen=True)
class KernelTime:
    layer: str
    layout: str
    precision: str
    milliseconds: float


def _time(layer: nn.Module, x: torch.Tensor, *, repeats: int) -> float:
    def step() -> None:
        layer(x).sum().backward()

    for _ in range(2):
        step()
    return 1000 * timed(lambda: [step() for _ in range(repeats)]) / repeats


def measure(*, groups: int, repeats: int = 20) -> list[KernelTime]:
    """GroupNorm(groups) and GroupNorm(1) in NCHW / channels_last x fp32 / bf16 input, and
    FloatGroupNorm(groups) with bf16 input in channels_last."""
    rows = []
    layouts = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
    for count in (groups, 1):
        for name, layout in layouts.items():
            for dtype in (torch.float32, torch.bfloat16):
                progress(f"GroupNorm({count}) {name} {dtype}")
                layer = nn.GroupNorm(count, SHAPE[1]).to(dtype)
                x = torch.randn(SHAPE).to(memory_format=layout, dtype=dtype).requires_grad_()
                precision = "bf16" if dtype == torch.bfloat16 else "fp32"
                milliseconds = _time(layer, x, repeats=repeats)
                rows.append(KernelTime(f"GroupNorm({count})", name, precision, milliseconds))
    x = torch.randn(SHAPE).to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = FloatGroupNorm(groups, SHAPE[1])
        milliseconds = _time(layer, x.requires_grad_(), repeats=repeats)
    label = f"FloatGroupNorm({groups})"
    rows.append(KernelTime(label, "channels_last", "bf16 in, fp32 norm", milliseconds))
    return rows


def report(rows: list[KernelTime]) -> list[str]:
    return [
        "",
        "### Group norm kernels",
        "",
        f"One normalization layer alone on a {'x'.join(map(str, SHAPE))} input, forward and "
        "backward, milliseconds per step (`model.FloatGroupNorm` normalizes bf16 input in fp32).",
        "",
        "| layer | layout | precision | ms per step |",
        "|---|---|---|---:|",
        *(f"| {r.layer} | {r.layout} | {r.precision} | {r.milliseconds:.2f} |" for r in rows),
    ]
