"""Why is group norm slower in bf16? One GroupNorm layer alone, forward and backward, per layout
and precision: the kernel behind `norms.FloatGroupNorm`. And what do ghost batches cost? Batch
norm over the whole batch vs `norms.GhostBatchNorm2d` (torch's fused kernel on each group in
turn) vs the groups side by side as channels vs the same statistics in separate tensor ops, as
one layer and its activation and as a whole training step. And filter response norm: its TLU as
`norms.FilterResponseNorm2d` writes it vs `torch.maximum`, the paper's form."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks import recipe
from benchmarks.throughput import PRECISION_NAMES
from benchmarks.timing import progress, timed
from pipeline import engine
from pipeline.config import TrainConfig
from pipeline.norms import FilterResponseNorm2d, FloatGroupNorm, GhostBatchNorm2d

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


class _GhostSideBySide(GhostBatchNorm2d):
    """The groups side by side as channels, (G, g, C, H, W) -> (g, G*C, H, W), through torch's
    fused batch norm once, and copied back (a reference, running statistics left out): the
    output is NCHW whatever the input's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, channels = x.shape[0] // self.norm_batch, x.shape[1]
        stacked = (
            x.reshape(groups, self.norm_batch, *x.shape[1:])
            .transpose(0, 1)
            .reshape(self.norm_batch, groups * channels, *x.shape[2:])
        )
        out = nn.functional.batch_norm(
            stacked,
            None,
            None,
            self.weight.repeat(groups),
            self.bias.repeat(groups),
            training=True,
            eps=self.eps,
        )
        return out.reshape(self.norm_batch, groups, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


GHOST_KERNELS = (
    ("GhostBatchNorm2d", GhostBatchNorm2d),
    ("side by side", _GhostSideBySide),
    ("separate ops", _GhostBySeparateOps),
)


def measure_ghost(*, repeats: int = 20) -> list[KernelTime]:
    """Batch norm and its in-place SiLU (the block's activation) over the whole batch, then per
    norm_batch each ghost kernel and the same SiLU, fp32 channels_last (batch norm's precision
    and layout on CPU: an in-place activation after a kernel that answers in another layout,
    or in a view, pays for it here)."""
    x = torch.randn(GHOST_SHAPE).to(memory_format=torch.channels_last).requires_grad_()

    def block(norm: nn.Module) -> nn.Module:
        return nn.Sequential(norm, nn.SiLU(inplace=True))

    progress("BatchNorm2d")
    rows = [
        KernelTime(
            "BatchNorm2d",
            "whole batch",
            "fp32",
            _time(block(nn.BatchNorm2d(GHOST_SHAPE[1])), x, repeats=repeats),
        )
    ]
    for norm_batch in NORM_BATCHES:
        for label, kind in GHOST_KERNELS:
            progress(f"{label} norm_batch={norm_batch}")
            layer = block(kind(GHOST_SHAPE[1], norm_batch=norm_batch))
            milliseconds = _time(layer, x, repeats=repeats)
            rows.append(KernelTime(label, f"norm_batch {norm_batch}", "fp32", milliseconds))
    return rows


def ghost_steps(
    *, batch_size: int | None, train_images: int
) -> dict[tuple[str, str], recipe.Built]:
    """Batch norm's recipe (`TrainConfig(norm="batch", norm_batch=...)`, `batch_size`
    overriding its batch) built as `train` builds it on the CPU, over the whole batch, then per
    norm_batch that divides the batch with GhostBatchNorm2d and with the side-by-side kernel
    swapped into every batch norm layer, keyed by (kernel, statistics over)."""
    device = torch.device("cpu")
    batch = TrainConfig(norm="batch", batch_size=batch_size or 0).batch_size
    built: dict[tuple[str, str], recipe.Built] = {}
    for norm_batch in (0, *(n for n in NORM_BATCHES if batch % n == 0 and n < batch)):
        kernels = GHOST_KERNELS[:2] if norm_batch else (("BatchNorm2d", None),)
        for label, kind in kernels:
            config = TrainConfig(norm="batch", norm_batch=norm_batch, batch_size=batch, seed=0)
            one = recipe.build(config, device=device, train_images=train_images)
            if kind is not None:
                for layer in one.model.modules():
                    if isinstance(layer, GhostBatchNorm2d):
                        layer.__class__ = kind  # the same parameters, the optimizer's own
            built[label, f"norm_batch {norm_batch}" if norm_batch else "whole batch"] = one
    return built


def measure_ghost_steps(
    *, batch_size: int | None, train_images: int, repeats: int, rounds: int = 3
) -> list[KernelTime]:
    """A whole training step of batch norm's recipe (`ghost_steps`: its layers, optimizer,
    layout and precision, as `train` builds them) on the CPU, random images, through
    `engine.train_one_epoch`. Rounds interleave the models; each row is its fastest round."""
    steps = ghost_steps(batch_size=batch_size, train_images=train_images)
    batch = next(iter(steps.values())).config.batch_size
    images = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    best = dict.fromkeys(steps, float("inf"))

    def train(built: recipe.Built, count: int) -> None:
        engine.train_one_epoch(
            built.training.step,
            itertools.repeat((images, labels), count),
            scheduler=built.training.scheduler,
            steps=count,
            description="ghost batch norm step",
        )

    for round_ in range(rounds):
        for (label, over), built in steps.items():
            progress(f"training step, {label} {over}, round {round_ + 1}/{rounds}")
            if round_ == 0:
                train(built, 1)  # warm-up
            seconds = timed(lambda built=built: train(built, repeats))
            best[label, over] = min(best[label, over], 1000 * seconds / repeats)
    return [
        KernelTime(label, over, PRECISION_NAMES[steps[label, over].autocast_dtype], milliseconds)
        for (label, over), milliseconds in best.items()
    ]


def report_ghost(
    rows: list[KernelTime], step_rows: list[KernelTime], *, batch_size: int | None = None
) -> list[str]:
    """The layer table, then the training-step table where it was measured (on the CPU)."""
    lines = [
        "",
        "### Ghost batch norm kernels",
        "",
        f"One batch norm layer and its in-place SiLU alone on a {'x'.join(map(str, GHOST_SHAPE))} "
        "channels_last input, forward and backward, milliseconds per step, and the ratio to "
        "batch norm over the whole batch.",
        "",
        *_ghost_table(rows, "layer"),
    ]
    if step_rows:
        lines += [
            "",
            "A whole training step of batch norm's recipe as `train` builds it (`training."
            "build_model` + `training.build_training`: "
            f"{recipe.describe(TrainConfig(norm='batch', batch_size=batch_size or 0))}, "
            f"{step_rows[0].precision}, channels_last) on the CPU, each kernel in every batch "
            "norm layer, random images, the fastest of three interleaved rounds:",
            "",
            *_ghost_table(step_rows, "kernel"),
        ]
    return lines


def _ghost_table(rows: list[KernelTime], what: str) -> list[str]:
    whole = rows[0].milliseconds
    return [
        f"| {what} | statistics over | ms per step | x whole batch |",
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
        "backward, milliseconds per step (`norms.FloatGroupNorm` normalizes bf16 input in fp32).",
        "",
        "| layer | layout | precision | ms per step |",
        "|---|---|---|---:|",
        *(f"| {r.layer} | {r.layout} | {r.precision} | {r.milliseconds:.2f} |" for r in rows),
    ]
