"""Why is group norm slower in bf16? One GroupNorm layer alone, forward and backward, per layout
and precision: the kernel behind `model.FloatGroupNorm`. And what do ghost batches cost? Batch
norm over the whole batch vs `model.GhostBatchNorm2d` (torch's fused kernel on the groups side by
side) vs the same statistics in separate tensor ops. And filter response norm: its TLU as
`model.FilterResponseNorm2d` writes it vs `torch.maximum`, the paper's form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import progress, timed
from pipeline.model import FilterResponseNorm2d, FloatGroupNorm, GhostBatchNorm2d

SHAPE = (256, 32, 16, 16)  # a batch of C4's output: the most common normalized activation
GHOST_SHAPE = (128, 24, 32, 32)  # C2's output at batch norm's recipe batch: the largest one
NORM_BATCHES = (2, 8, 32)


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


class _GhostBySeparateOps(GhostBatchNorm2d):
    """The ghost statistics written as separate tensor ops (a reference; running statistics
    left out): mean and variance per group, normalize, scale and shift."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(x.shape[0] // self.norm_batch, self.norm_batch, *x.shape[1:])
        var, mean = torch.var_mean(groups, dim=(1, 3, 4), unbiased=False)
        out = (groups - mean[:, None, :, None, None]) * torch.rsqrt(var + self.eps)[
            :, None, :, None, None
        ]
        return out.reshape(x.shape) * self.weight[:, None, None] + self.bias[:, None, None]


def measure_ghost(*, repeats: int = 20) -> list[KernelTime]:
    """BatchNorm2d over the whole batch, then per norm_batch GhostBatchNorm2d and the same
    statistics by separate ops, fp32 NCHW (batch norm's precision and layout on CPU)."""
    x = torch.randn(GHOST_SHAPE).requires_grad_()
    progress("BatchNorm2d")
    rows = [
        KernelTime(
            "BatchNorm2d",
            "whole batch",
            "fp32",
            _time(nn.BatchNorm2d(GHOST_SHAPE[1]), x, repeats=repeats),
        )
    ]
    for norm_batch in NORM_BATCHES:
        for label, kind in (
            ("GhostBatchNorm2d", GhostBatchNorm2d),
            ("separate ops", _GhostBySeparateOps),
        ):
            progress(f"{label} norm_batch={norm_batch}")
            layer = kind(GHOST_SHAPE[1], norm_batch=norm_batch)
            milliseconds = _time(layer, x, repeats=repeats)
            rows.append(KernelTime(label, f"norm_batch {norm_batch}", "fp32", milliseconds))
    return rows


def report_ghost(rows: list[KernelTime]) -> list[str]:
    whole = rows[0].milliseconds
    return [
        "",
        "### Ghost batch norm kernels",
        "",
        f"One batch norm layer alone on a {'x'.join(map(str, GHOST_SHAPE))} input, forward and "
        "backward, milliseconds per step, and the ratio to batch norm over the whole batch.",
        "",
        "| layer | statistics over | ms per step | x whole batch |",
        "|---|---|---:|---:|",
        *(
            f"| {r.layer} | {r.layout} | {r.milliseconds:.2f} | {r.milliseconds / whole:.2f} |"
            for r in rows
        ),
    ]


class _FrnByMaximum(FilterResponseNorm2d):
    """The paper's form: y = gamma x / sqrt(nu2 + eps) + beta, then torch.maximum(y, tau)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.square().mean(dim=(2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]
        return torch.maximum(y, self.tau[:, None, None])


def measure_frn(*, repeats: int = 20) -> list[KernelTime]:
    """BatchNorm2d + ReLU (batch norm's block) for scale, then FilterResponseNorm2d and the
    paper's torch.maximum form of the same layer, fp32 NCHW, on GHOST_SHAPE."""
    x = torch.randn(GHOST_SHAPE).requires_grad_()
    rows = []
    for label, layer in (
        ("BatchNorm2d + ReLU", nn.Sequential(nn.BatchNorm2d(GHOST_SHAPE[1]), nn.ReLU())),
        ("FilterResponseNorm2d", FilterResponseNorm2d(GHOST_SHAPE[1])),
        ("torch.maximum TLU", _FrnByMaximum(GHOST_SHAPE[1])),
    ):
        progress(label)
        rows.append(KernelTime(label, "NCHW", "fp32", _time(layer, x, repeats=repeats)))
    return rows


def report_frn(rows: list[KernelTime]) -> list[str]:
    reference = rows[0].milliseconds
    return [
        "",
        "### Filter response norm kernels",
        "",
        f"One normalization and its activation alone on a {'x'.join(map(str, GHOST_SHAPE))} "
        "input, forward and backward, milliseconds per step, and the ratio to batch norm + ReLU.",
        "",
        "| layer | ms per step | x BatchNorm2d + ReLU |",
        "|---|---:|---:|",
        *(f"| {r.layer} | {r.milliseconds:.2f} | {r.milliseconds / reference:.2f} |" for r in rows),
    ]


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
