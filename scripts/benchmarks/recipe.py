"""What every timed training step and evaluation is built from: a norm's recipe
(`TrainConfig(norm=norm, ...)`, overriding only what a question varies) through
`training.build_model` and `training.build_training`, the builder `train` uses, so a benchmark
times what users train: the recipe's layers, optimizer (MuonSGD for the conv filters of the study
norms), schedule, loss, weight average and step, at the layout and precision `train` picks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import batches, engine, training
from pipeline import device as devices
from pipeline.config import TrainConfig
from pipeline.model import Net

OPTIMIZER_NAMES = {"muon": "Muon (MuonSGD) for the conv filters", "sgd": "SGD"}
ACTIVATION_NAMES = {"relu": "ReLU", "silu": "SiLU", "gelu": "GELU", "mish": "Mish"}


@dataclass(frozen=True)
class Built:
    """A recipe's model and what `engine.fit` would step it with, on the benchmark's device."""

    config: TrainConfig
    model: Net
    training: engine.Training
    memory_format: torch.memory_format

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.training.autocast_dtype


def build(
    config: TrainConfig,
    *,
    device: torch.device,
    train_images: int,
    memory_format: torch.memory_format | None = None,
    eval_batch_size: int | None = None,
    whitening_images: torch.Tensor | None = None,
) -> Built:
    """`config`'s seeded model on `device` in `memory_format` (default: the layout `train`
    picks), compiled with `compile=on`, and its `training.build_training` at the precision and
    CUDA-graph setting the config resolves to, as `training.prepare_training` + `training.fit`
    set them up. `whitening_images`, normalized training images, set the whitening filters
    when the recipe whitens."""
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone, as in train
    model = training.build_model(config)
    memory_format = memory_format or devices.memory_format_for(config.norm, device)
    model = model.to(device=device, memory_format=memory_format)
    if config.whiten:
        if whitening_images is None:
            raise ValueError("a recipe with whiten=true needs whitening_images")
        model.init_whitening(whitening_images[: training.WHITENING_IMAGES])
    if config.compile == "on":
        model.compile()
    cuda_graphs, _ = devices.resolve_cuda_graphs(config.cuda_graphs, device, compile=config.compile)
    built = training.build_training(
        model,
        config,
        train_images=train_images,
        autocast_dtype=devices.resolve_precision(config.precision, device, norm=config.norm),
        cuda_graphs=cuda_graphs,
        eval_batch_size=eval_batch_size,
    )
    return Built(config=config, model=model, training=built, memory_format=memory_format)


def epoch_batches(built: Built, split: batches.DeviceSplit, normalize: batches.Normalizer):
    """One epoch of augmented batches as `engine.fit` draws them, from the built generator."""
    config = built.config
    return batches.train_batches(
        split,
        batch_size=config.batch_size,
        generator=built.training.state.generator,
        normalize=normalize,
        translate=config.translate,
        cutout=config.cutout,
    )


def describe(config: TrainConfig) -> str:
    """`batch norm: Muon (MuonSGD) for the conv filters + SiLU + max pool, batch 128`."""
    return (
        f"{config.norm} norm: {OPTIMIZER_NAMES[config.optimizer]} + "
        f"{ACTIVATION_NAMES[config.activation]} + {config.pool} pool, batch {config.batch_size}"
    )


def caption(norms: list[str], *, batch_size: int | None = None) -> str:
    """One sentence naming the recipe each norm's rows time, for a table's caption."""
    recipes = "; ".join(
        describe(TrainConfig(norm=norm, batch_size=batch_size or 0)) for norm in norms
    )
    override = f" (batch {batch_size} by --batch-size)" if batch_size else ""
    return (
        f"Recipe: each norm's `TrainConfig(norm=...)`{override} through `training.build_model` "
        f"+ `training.build_training`, the builder `train` uses ({recipes})."
    )
