"""`train`'s work without MLflow: build the seeded model and device-resident data from a
`TrainConfig`, then run `engine.fit` with its recipe. The CLI adds tracking around it; the
benchmark calls it directly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import data as datasets
from pipeline import engine
from pipeline.config import VAL_SEED, ConfigError, TrainConfig
from pipeline.data import DataError, DatasetStats
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
    normalize: datasets.Normalizer
    train_split: datasets.DeviceSplit  # the training images minus the validation split
    test_split: datasets.DeviceSplit
    val_split: datasets.DeviceSplit | None = None
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


def model_for(config: TrainConfig) -> tuple[Net, int]:
    """The config's model and its parameter count; fails when it is over the budget, so every
    run of a study or sweep is checked before the first one starts."""
    model = Net(**config.model_options())
    parameters = count_parameters(model)
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"the model has {parameters:,} parameters; the limit is {MAX_PARAMETERS:,}"
            + (f" (widths {config.widths})" if config.widths else "")
        )
    return model, parameters


def prepare_training(
    config: TrainConfig, *, load_stats: StatsLoader = load_local_stats
) -> TrainingSetup:
    """Seeded model, data on the device, layout and precision: the defaults `train` runs."""
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    model, parameters = model_for(config)
    device = engine.resolve_device(config.device)
    engine.configure_backend(device)
    dataset = datasets.load_dataset(config.data)
    stats = load_stats(config.stats, dataset)
    memory_format = engine.memory_format_for(config.norm, device)
    normalize = datasets.Normalizer(stats, device=device, memory_format=memory_format)
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
        val_split = datasets.to_device(images[held], labels[held], device=device)
        images, labels = images[~held], labels[~held]
    train_split = datasets.to_device(images, labels, device=device)
    model = model.to(device=device, memory_format=memory_format)
    if config.whiten:
        model.init_whitening(normalize(train_split.images[:WHITENING_IMAGES]))
    if config.compile == "on":
        model.compile()  # in place: the same module, parameters and state-dict keys
    cuda_graphs, cuda_graphs_note = engine.resolve_cuda_graphs(
        config.cuda_graphs, device, compile=config.compile
    )
    return TrainingSetup(
        model=model,
        parameters=parameters,
        dataset=dataset,
        stats=stats,
        device=device,
        autocast_dtype=engine.resolve_precision(config.precision, device, norm=config.norm),
        normalize=normalize,
        train_split=train_split,
        test_split=datasets.to_device(dataset.test_images, dataset.test_labels, device=device),
        val_split=val_split,
        validation=validation,
        cuda_graphs=cuda_graphs,
        cuda_graphs_note=cuda_graphs_note,
    )


def fit(
    setup: TrainingSetup,
    config: TrainConfig,
    *,
    resume_from: dict | None = None,
    on_epoch_end: Callable[[engine.EpochMetrics, engine.TrainingState], None] | None = None,
) -> list[engine.EpochMetrics]:
    """`engine.fit` with the config's recipe."""
    return engine.fit(
        setup.model,
        setup.train_split,
        setup.test_split,
        val_split=setup.val_split,
        normalize=setup.normalize,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        warmup_epochs=config.warmup_epochs,
        seed=config.seed,
        ema=config.ema,
        cutout=config.cutout,
        translate=config.translate,
        tta=config.tta,
        autocast_dtype=setup.autocast_dtype,
        optimizer=config.optimizer,
        muon_lr=config.muon_lr,
        muon_momentum=config.muon_momentum,
        muon_renormalize=config.muon_renormalize,
        cuda_graphs=setup.cuda_graphs,
        resume_from=resume_from,
        on_epoch_end=on_epoch_end,
    )


def portable_model(model: torch.nn.Module, config: TrainConfig) -> Net:
    """The trained weights in a plain model on the CPU, NCHW, as they are logged: a
    channels_last model's weights are strided views, which torch.export's archive writer warns
    about ("No complete tensor found"), and a compiled one is not what a user loads."""
    plain = Net(**config.model_options())
    plain.load_state_dict(model.state_dict())
    return plain.eval()
