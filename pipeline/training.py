"""`train`'s work without MLflow, from one `TrainConfig`: the one model factory (`build_model`),
the seeded model and device-resident data (`prepare_training`), the one builder of optimizer,
schedule and step (`build_training`) and the run of `engine.fit` (`fit`). `train` adds tracking
around it; the benchmarks, the GPU check and the tests call the same functions, so they time and
test what users train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import batches, engine, optim
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import VAL_SEED, ConfigError, TrainConfig
from pipeline.data import DataError, DatasetStats
from pipeline.graphs import GraphedForward
from pipeline.model import MAX_PARAMETERS, Net, count_parameters

WHITENING_IMAGES = 5000  # training images whose patches set the whitening filters (whiten=true)

StatsLoader = Callable[[str, datasets.ArrayDataset], DatasetStats]


@dataclass(frozen=True)
class TrainingSetup:
    """What `train` builds from its config before the first step."""

    model: torch.nn.Module
    parameters: int
    dataset: datasets.ArrayDataset
    stats: DatasetStats
    device: torch.device
    autocast_dtype: torch.dtype | None
    splits: engine.Splits  # training images minus the validation split, test, validation
    validation: datasets.ValidationSplit | None = None  # which training images it holds
    cuda_graphs: bool = False  # the steps replay as CUDA graphs
    cuda_graphs_note: str = ""  # why they do not, when they do not


def load_local_stats(spec: str, dataset: datasets.ArrayDataset) -> DatasetStats:
    """Stats from a stats.json path, or computed (and cached) when `spec` is empty."""
    if not spec:
        return datasets.cached_stats(dataset)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"stats file {spec!r} does not exist")
    return DatasetStats.from_json(path.read_text(), origin=spec)


def build_model(config: TrainConfig) -> Net:
    """The config's model (the one model factory); fails when it is over the parameter budget,
    so every run of a study or sweep is checked before the first one starts."""
    model = Net(**config.model_options())
    parameters = count_parameters(model)
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"the model has {parameters:,} parameters; the limit is {MAX_PARAMETERS:,}"
            + (f" (widths {config.widths})" if config.widths else "")
        )
    return model


def prepare_training(
    config: TrainConfig, *, load_stats: StatsLoader = load_local_stats
) -> TrainingSetup:
    """Seeded model, data on the device, layout and precision: the defaults `train` runs."""
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    model = build_model(config)
    device = devices.resolve_device(config.device)
    devices.configure_backend(device)
    dataset = datasets.load_dataset(config.data)
    stats = load_stats(config.stats, dataset)
    memory_format = devices.memory_format_for(config.norm, device)
    normalize = batches.Normalizer(stats, device=device, memory_format=memory_format)
    images, labels = dataset.train_images, dataset.train_labels
    validation, val_split = None, None
    if config.val_size:
        validation = datasets.validation_split(
            labels,
            config.val_size,
            seed=VAL_SEED,
            dataset_digest=dataset.digest,
            class_names=dataset.classes,
        )
        held = np.zeros(len(labels), dtype=bool)
        held[validation.indices] = True
        val_split = batches.to_device(images[held], labels[held], device=device)
        images, labels = images[~held], labels[~held]
    train_split = batches.to_device(images, labels, device=device)
    model = model.to(device=device, memory_format=memory_format)
    if config.whiten:
        model.init_whitening(normalize(train_split.images[:WHITENING_IMAGES]))
    if config.compile == "on":
        model.compile()  # in place: the same module, parameters and state-dict keys
    cuda_graphs, cuda_graphs_note = devices.resolve_cuda_graphs(
        config.cuda_graphs, device, compile=config.compile
    )
    test_split = batches.to_device(dataset.test_images, dataset.test_labels, device=device)
    return TrainingSetup(
        model=model,
        parameters=count_parameters(model),
        dataset=dataset,
        stats=stats,
        device=device,
        autocast_dtype=devices.resolve_precision(config.precision, device, norm=config.norm),
        splits=engine.Splits(train_split, test_split, normalize, val=val_split),
        validation=validation,
        cuda_graphs=cuda_graphs,
        cuda_graphs_note=cuda_graphs_note,
    )


def build_training(
    model: nn.Module,
    recipe: TrainConfig,
    *,
    train_images: int,
    autocast_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    eval_batch_size: int | None = None,
    resume_from: dict | None = None,
) -> engine.Training:
    """The one builder of what a training steps with: the seeded batch order, the optimizer
    (`recipe.optimizer`: SGD, or Muon for the conv filters), the one-cycle schedule, the weight
    average (`recipe.ema` > 0), the step (a CUDA graph with `cuda_graphs`) and, with
    `cuda_graphs`, the evaluation's forward graph. `resume_from`, a `TrainingState.state_dict()`,
    continues a training after its last epoch, bit for bit on the CPU."""
    steps = train_images // recipe.batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size must be at most the training split's {train_images} images "
            f"(got {recipe.batch_size})"
        )
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer, scheduler = _optimizer_and_schedule(model, recipe, steps_per_epoch=steps)
    average = None
    if recipe.ema > 0:
        decay = get_ema_multi_avg_fn(recipe.ema)
        average = AveragedModel(model, multi_avg_fn=decay, use_buffers=True)
    state = engine.TrainingState(model, optimizer, scheduler, generator, ema=average)
    if resume_from is not None:
        state.load_state_dict(resume_from)
    optim.learning_rate_on_device(optimizer)
    step = engine.TrainStep(
        model,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        autocast_dtype=autocast_dtype,
        average=average,
        cuda_graph=cuda_graphs,
    )
    evaluated = model if average is None else average.module
    graphed = None
    if cuda_graphs:
        device = next(model.parameters()).device
        graphed = GraphedForward(
            evaluated,
            forward=engine.tta_logits,
            batch_size=eval_batch_size or devices.eval_batch_size_for(device),
            tta=recipe.tta,
            autocast_dtype=autocast_dtype,
        )
    return engine.Training(
        step=step,
        scheduler=scheduler,
        state=state,
        evaluated=evaluated,
        steps_per_epoch=steps,
        autocast_dtype=autocast_dtype,
        eval_batch_size=eval_batch_size,
        graphed=graphed,
    )


def _optimizer_and_schedule(
    model: nn.Module, recipe: TrainConfig, *, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimizer (SGD, or Muon for the conv filters) and its one-cycle schedule."""
    optimizer = optim.make_optimizer(
        model,
        learning_rate=recipe.learning_rate,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        optimizer=recipe.optimizer,
        muon_lr=recipe.muon_lr,
        muon_momentum=recipe.muon_momentum,
        muon_renormalize=recipe.muon_renormalize,
        muon_ns_steps=recipe.muon_ns_steps,
        muon_pointwise=recipe.muon_pointwise,
    )
    scheduler = optim.make_scheduler(
        optimizer,
        epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=recipe.warmup_epochs,
    )
    return optimizer, scheduler


def fit(
    setup: TrainingSetup,
    config: TrainConfig,
    *,
    resume_from: dict | None = None,
    on_epoch_end: Callable[[engine.EpochMetrics, engine.TrainingState], None] | None = None,
) -> list[engine.EpochMetrics]:
    """`engine.fit` of the set-up's model with the config's recipe."""
    built = build_training(
        setup.model,
        config,
        train_images=len(setup.splits.train),
        autocast_dtype=setup.autocast_dtype,
        cuda_graphs=setup.cuda_graphs,
        resume_from=resume_from,
    )
    return engine.fit(built, setup.splits, config, on_epoch_end=on_epoch_end)


def portable_model(model: torch.nn.Module, config: TrainConfig) -> Net:
    """The trained weights in a plain model on the CPU, NCHW, as they are logged: a
    channels_last model's weights are strided views, which torch.export's archive writer warns
    about ("No complete tensor found"), and a compiled one is not what a user loads."""
    plain = build_model(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()
