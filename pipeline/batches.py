"""Normalised, augmented batches cut from splits already on the training device: the epoch's
random numbers are drawn ahead, and translate, flip and cutout are done batch-wise, so there is
no per-sample Python in the loop and no step waits on the host."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import DatasetStats


@dataclass(frozen=True)
class DeviceSplit:
    """One split resident on the device: uint8 images `(N, 3, H, W)` and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def to_device(images: np.ndarray, labels: np.ndarray, *, device: torch.device) -> DeviceSplit:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return DeviceSplit(
        images=tensor.to(device), labels=torch.from_numpy(labels).to(device, torch.long)
    )


class Normalizer:
    """uint8 `(B, 3, H, W)` -> float32 normalised, in the requested memory format."""

    def __init__(self, stats: DatasetStats, *, device: torch.device, memory_format) -> None:
        mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().contiguous(memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale)  # x / (255 std) - mean / std


@dataclass(frozen=True)
class EpochDraws:
    """The random numbers of one epoch's augmentation, drawn ahead and moved to the device once,
    so that no training step waits on the host or copies to the device."""

    order: torch.Tensor  # (N,) the epoch's shuffle
    shifts: torch.Tensor | None  # (steps, 2, B) row and column offsets in 0..2 x translate
    mirror: torch.Tensor | None  # (steps, B) bool: flip this image
    centres: torch.Tensor | None  # (steps, 2, B) cutout centres on the [0, 1) scale


def draw_epoch(
    count: int,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    translate: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> tuple[EpochDraws, int]:
    """One epoch's shuffle and augmentation draws from the seeded CPU `generator`, in the order
    a batch-by-batch loop draws them (so a seed gives the same batches as ever), on `device`.
    Returns the draws and the number of full batches."""
    order = torch.randperm(count, generator=generator)
    steps = count // batch_size
    shifts, mirror, centres = [], [], []
    for _ in range(steps):
        if translate:
            shifts.append(torch.randint(0, 2 * translate + 1, (2, batch_size), generator=generator))
        if flip:
            mirror.append(torch.rand(batch_size, generator=generator) < 0.5)
        if cutout:
            centres.append(torch.rand(2, batch_size, generator=generator))

    def on_device(draws: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.stack(draws).to(device) if draws else None

    draws = EpochDraws(
        order=order.to(device),
        shifts=on_device(shifts),
        mirror=on_device(mirror),
        centres=on_device(centres),
    )
    return draws, steps


def train_batches(
    split: DeviceSplit,
    *,
    batch_size: int,
    generator: torch.Generator,
    normalize: Normalizer,
    translate: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented training batches (random shift by up to `translate` pixels + flip,
    and with `cutout` > 0 a `cutout`-pixel square of each image set to the dataset mean).

    Augmentation is batch-wise tensor indexing on the device, from random numbers drawn for the
    whole epoch when the first batch is asked for (`draw_epoch`): a step reads slices of them,
    with no host synchronisation and no copy to the device. The last partial batch is dropped
    so every step sees a full batch (BatchNorm statistics stay well-defined).
    """
    device = split.images.device
    draws, steps = draw_epoch(
        len(split),
        batch_size=batch_size,
        generator=generator,
        device=device,
        translate=translate,
        flip=flip,
        cutout=cutout,
    )
    height, width = split.images.shape[-2:]
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    batch_index = torch.arange(batch_size, device=device)[:, None, None]  # (B, 1, 1)
    border = (translate,) * 4
    for step in range(steps):
        index = draws.order[step * batch_size : (step + 1) * batch_size]
        images = split.images[index]  # (B, 3, H, W) uint8
        if draws.shifts is not None:
            shifts = draws.shifts[step]
            padded = torch.nn.functional.pad(images, border, mode="constant")
            row_index = (shifts[0, :, None] + rows)[:, :, None]  # (B, H, 1)
            col_index = (shifts[1, :, None] + cols)[:, None, :]  # (B, 1, W)
            images = padded[batch_index, :, row_index, col_index].permute(0, 3, 1, 2)
        if draws.mirror is not None:
            mirror = draws.mirror[step]
            images = torch.where(mirror[:, None, None, None], images.flip(3), images)
        images = normalize(images)
        if draws.centres is not None:
            images = images * _cutout_mask(draws.centres[step], height, width, cutout)
        yield images, split.labels[index]


def _cutout_mask(centres: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """(count, 1, H, W) float mask: 0 inside one `size`-pixel square per image (its centre
    anywhere in the image, so the square may be clipped by the border), 1 elsewhere.
    `centres` is (2, count) on the [0, 1) scale."""
    device = centres.device
    top = (centres[0] * height).long() - size // 2
    left = (centres[1] * width).long() - size // 2
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (count, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (count, W)
    inside = inside_rows[:, :, None] & inside_cols[:, None, :]
    return (~inside).to(torch.float32)[:, None]


def eval_batches(
    split: DeviceSplit, *, batch_size: int, normalize: Normalizer
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield (
            normalize(split.images[start : start + batch_size]),
            split.labels[start : start + batch_size],
        )
