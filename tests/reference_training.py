"""The training loop as it was before the step became sync-free and graphable: batches drawn
batch by batch from the generator, SGD with a float learning rate, torch's AveragedModel
update. The engine must match it bit for bit on the CPU (tests/test_engine.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import batches, optim


def reference_batches(
    split: batches.DeviceSplit,
    *,
    batch_size: int,
    generator: torch.Generator,
    normalize: batches.Normalizer,
    translate: int = 4,
    flip: bool = True,
    cutout: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's random numbers drawn as that batch is made."""
    count = len(split)
    order = torch.randperm(count, generator=generator)
    height, width = split.images.shape[-2:]
    rows, cols = torch.arange(height), torch.arange(width)
    for start in range(0, count - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        images = split.images[index]
        if translate:
            shifts = torch.randint(0, 2 * translate + 1, (2, batch_size), generator=generator)
            padded = nn.functional.pad(images, (translate,) * 4, mode="constant")
            row_index = (shifts[0, :, None] + rows)[:, :, None]
            col_index = (shifts[1, :, None] + cols)[:, None, :]
            batch_index = torch.arange(batch_size)[:, None, None]
            images = padded[batch_index, :, row_index, col_index].permute(0, 3, 1, 2)
        if flip:
            mirror = torch.rand(batch_size, generator=generator) < 0.5
            images = torch.where(mirror[:, None, None, None], images.flip(3), images)
        images = normalize(images)
        if cutout:
            centres = torch.rand(2, batch_size, generator=generator)
            top = (centres[0] * height).long() - cutout // 2
            left = (centres[1] * width).long() - cutout // 2
            inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + cutout)
            inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + cutout)
            inside = inside_rows[:, :, None] & inside_cols[:, None, :]
            images = images * (~inside).to(torch.float32)[:, None]
        yield images, split.labels[index]


def reference_fit(
    model: nn.Module,
    train: batches.DeviceSplit,
    *,
    normalize: batches.Normalizer,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    ema: float = 0.0,
    cutout: int = 0,
) -> tuple[list[tuple[float, float, float]], nn.Module]:
    """(train loss, train accuracy, learning rate) per epoch, and the model that is evaluated."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = optim.make_optimizer(
        model, learning_rate=learning_rate, momentum=0.9, weight_decay=5e-4
    )
    steps = len(train) // batch_size
    scheduler = optim.make_scheduler(
        optimizer, epochs=epochs, steps_per_epoch=steps, warmup_epochs=0.5
    )
    average = None
    if ema > 0:
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    records = []
    for _ in range(epochs):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        for images, labels in reference_batches(
            train, batch_size=batch_size, generator=generator, normalize=normalize, cutout=cutout
        ):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update_parameters(model)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += len(labels)
        records.append((loss_sum.item() / seen, correct.item() / seen, lr))
    return records, model if average is None else average.module
