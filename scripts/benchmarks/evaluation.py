"""What does each epoch's evaluation cost? One evaluation of the test split per test-time
augmentation and evaluation batch, as `train` runs it after every epoch: of each norm's recipe
model as `train` builds it (`benchmarks.recipe`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from benchmarks import recipe
from benchmarks.timing import progress, synchronize, timed
from pipeline import batches, engine
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import TTA_MODES, TrainConfig

DEFAULTS = TrainConfig()
EVAL_BATCH_SIZE_BEFORE = 1024  # every device's evaluation batch before eval_batch_size_for


@dataclass(frozen=True)
class EvaluationCost:
    """Wall seconds of one evaluation of the test split with one test-time augmentation."""

    norm: str
    tta: str
    batch_size: int
    passes: int  # forward passes of the model per batch (counted)
    images: int
    seconds: float


def measure_evaluation(
    test_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    config: TrainConfig,
    *,
    batch_size: int,
    train_images: int,
) -> EvaluationCost:
    """`engine.evaluate` over the whole test split as `fit` runs it after each epoch, with
    `config.tta`, of what `training.build_training` evaluates (the model, or its weight average
    with `ema` > 0) at the precision and layout `train` picks, eager (after one untimed
    evaluation of a batch: first-call allocations)."""
    device = test_split.images.device
    built = recipe.build(
        config, device=device, train_images=train_images, eval_batch_size=batch_size
    )
    model = built.training.evaluated
    normalize = batches.Normalizer(stats, device=device, memory_format=built.memory_format)
    warmup = batches.DeviceSplit(test_split.images[:batch_size], test_split.labels[:batch_size])

    def run(split: batches.DeviceSplit) -> None:
        engine.evaluate(
            model,
            split,
            normalize=normalize,
            batch_size=built.training.eval_batch_size,
            autocast_dtype=built.autocast_dtype,
            tta=config.tta,
        )

    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    run(warmup)  # one batch: counts the forward passes per batch
    hook.remove()
    synchronize(device)
    seconds = timed(lambda: (run(test_split), synchronize(device)))
    return EvaluationCost(
        norm=config.norm,
        tta=config.tta,
        batch_size=batch_size,
        passes=len(calls),
        images=len(test_split),
        seconds=seconds,
    )


def measure(
    dataset: datasets.ArrayDataset,
    stats: datasets.DatasetStats,
    *,
    norms: list[str],
    device: torch.device,
    seed: int,
    batch_size: int | None = None,
) -> list[EvaluationCost]:
    """Each norm's recipe (`batch_size` overrides its training batch, which the evaluation does
    not use) x test-time augmentation x evaluation batch (the default and 1,024)."""
    test_count = len(dataset.test_labels)
    evaluation_costs: list[EvaluationCost] = []
    eval_batch_size = devices.eval_batch_size_for(device)
    # The default evaluation batch, and the GPU's 1,024 beside it where the default differs.
    eval_batch_sizes = sorted({eval_batch_size, EVAL_BATCH_SIZE_BEFORE})
    test_split = batches.to_device(dataset.test_images, dataset.test_labels, device=device)
    for norm, tta, size in itertools.product(norms, TTA_MODES, eval_batch_sizes):
        progress(f"{norm}: evaluation of {test_count:,} test images, tta={tta}, batch {size}")
        # Eager: the CUDA-graphed evaluation is the --graphs question's.
        config = TrainConfig(
            norm=norm, batch_size=batch_size or 0, tta=tta, seed=seed, cuda_graphs="off"
        )
        evaluation_costs.append(
            measure_evaluation(
                test_split,
                stats,
                config,
                batch_size=size,
                train_images=len(dataset.train_labels),
            )
        )
    del test_split
    return evaluation_costs


def evaluation_table(
    costs: list[EvaluationCost],
    rates: dict[tuple[str, str], float],
    *,
    train_images: int,
    default_batch_size: int,
) -> list[str]:
    lines = [
        "| norm | tta | batch | forward passes | evaluation s | vs default | share of an epoch "
        "| default |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for cost in costs:
        is_default = (cost.tta, cost.batch_size) == (DEFAULTS.tta, default_batch_size)
        default = next(
            c
            for c in costs
            if c.norm == cost.norm and (c.tta, c.batch_size) == (DEFAULTS.tta, default_batch_size)
        )
        # An epoch: the training images at the pipeline's rate, then this evaluation.
        training_seconds = train_images / rates[cost.norm, "pipeline"]
        share = cost.seconds / (training_seconds + cost.seconds)
        lines.append(
            f"| {cost.norm} | {cost.tta} | {cost.batch_size} | {cost.passes} | "
            f"{cost.seconds:.3f} | {cost.seconds / default.seconds:.2f} | {100 * share:.1f}% | "
            f"{'yes' if is_default else ''} |"
        )
    return lines


def report(
    costs: list[EvaluationCost],
    rates: dict[tuple[str, str], float],
    *,
    train_count: int,
    test_count: int,
    device: torch.device,
) -> list[str]:
    """`rates`: training images/s per (norm, path), for each evaluation's share of an epoch."""
    return [
        "",
        "### Evaluation per test-time augmentation",
        "",
        f"One evaluation of the {test_count:,} test images (the default layout and "
        "precision, eager) per test-time augmentation and evaluation batch, as `train` runs after "
        "every epoch; `default`: `train`'s `tta` at `devices.eval_batch_size_for` this "
        "device, and `vs default` the time relative to it; `share of an epoch`: this "
        f"evaluation over itself plus {train_count:,} training images at the `pipeline` "
        "rate above. " + recipe.caption(list(dict.fromkeys(cost.norm for cost in costs))),
        "",
        *evaluation_table(
            costs,
            rates,
            train_images=train_count,
            default_batch_size=devices.eval_batch_size_for(device),
        ),
    ]
