"""Frozen run configurations and their validation: the one source of parameter names.

Every knob has one spelling everywhere: the MLproject parameter, the click option, the field here
and the MLflow param (`learning_rate`, `batch_size`, `norm`, `groups`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.norms import REGISTRY, SHARED_RECIPE

# Every registered norm (pipeline/norms.py), and those the default study trains.
NORMS = tuple(REGISTRY)
STUDY_NORMS = tuple(name for name, entry in REGISTRY.items() if entry.in_default_study)
# The norms with batch statistics, whose statistics `norm_batch` can take over groups.
BATCH_STATISTICS_NORMS = tuple(n for n, entry in REGISTRY.items() if entry.batch_statistics)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("off", "on")  # torch.compile of the model: its warm-up must pay (docs/speed.md)
# The training step and the evaluation's forward passes as CUDA graphs; auto: on for CUDA.
CUDA_GRAPHS = ("auto", "on", "off")
ORDERS = ("norm-act", "act-norm")  # conv -> norm -> ReLU, or conv -> ReLU -> norm
ACTIVATIONS = ("relu", "silu", "gelu", "mish")  # the non-linearity of every conv block
POOLS = ("max", "avg")  # P1 and P2
# sgd: SGD with Nesterov momentum for every parameter; muon: Muon for the conv filters but the
# c10 head (optim.MuonSGD), the recipe's SGD for norms, biases and the head.
OPTIMIZERS = ("sgd", "muon")
# Weight standardization of the convs: auto = the norm's default (pipeline/norms.py): on for
# group and layer norm, off for batch norm.
STANDARDIZE = ("auto", "true", "false")
# Test-time augmentation: the image alone, with its mirror, or mirror x two 1-pixel translations.
TTA_MODES = ("none", "flip", "flip-translate")
DEFAULT_TTA = "flip-translate"  # how `train` evaluates each epoch unless told otherwise
TTA_BEFORE_PARAM = "flip"  # what runs logged before `tta` existed evaluated with
MAX_EPOCHS = 20  # the study's budget: every reported result trains at most this long
# Longer trainings measure where the model's accuracy levels off (docs/results.md): never a
# result, so never registered, and tagged `beyond_budget`.
MAX_MEASUREMENT_EPOCHS = 200
REGISTERED_MODEL = "cifar10-{norm}"  # "{norm}" is filled in; an empty name skips registration
# Where runs go unless MLFLOW_EXPERIMENT_NAME (or _ID) or `mlflow run --experiment-name` says.
DEFAULT_EXPERIMENT = "cifar10-normalization"
DEFAULT_DATA = "~/.cache/cifar10"  # where torchvision downloads CIFAR-10 when it is missing
# Per-norm defaults: what a parameter left at its "per norm" value (0, or "auto" for the
# optimizer, the activation and the pooling) becomes for each norm, so a norm can take a recipe
# of its own (each norm's entry in pipeline/norms.py holds it, the rest is norms.SHARED_RECIPE).
# Each value was chosen on the validation split by `sweep` + `compare`'s lever table over 3
# seeds, adopted only where its paired gain exceeded twice its standard error: batch 128 for
# batch and layer norm, 256 for group norm (docs/results.md#the-recipe-re-decided-on-validation);
# Muon for batch, group and layer norm, SiLU for batch and group norm and average pooling for
# layer norm (docs/results.md#third-round-muon-the-activation-and-the-pooling). The resolved
# value is what a run logs as its param.
RECIPES: dict[str, dict[str, int | float | str]] = {
    name: {**SHARED_RECIPE, **entry.recipe} for name, entry in REGISTRY.items()
}
# The validation split: images held out of the training split, per class, with a seed of its
# own (not the training seed), so every run of a dataset holds out the same ones. Choices (a
# recipe, a lever, the champion) are made on it; the test split is only reported.
DEFAULT_VAL_SIZE = 5000
VAL_SEED = 0
PER_NORM = 0  # the value of a numeric RECIPES parameter that asks for the norm's recipe
PER_NORM_CHOICE = f"{PER_NORM} (the norm's recipe)"  # how errors name it
# Each RECIPES parameter's "per norm" value (the parameter's default): 0 or "auto".
PER_NORM_VALUES: dict[str, int | float | str] = {
    "activation": "auto",
    "batch_size": PER_NORM,
    "learning_rate": float(PER_NORM),
    "optimizer": "auto",
    "pool": "auto",
}
NORM_BATCH_CHOICE = "0 (the whole batch)"


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train` needs; defaults are the recipe the results (docs/results.md) come from."""

    norm: str = "batch"
    groups: int = 4
    epochs: int = MAX_EPOCHS
    batch_size: int = PER_NORM  # 0: the norm's recipe (RECIPES)
    # Images per batch-statistics group ("ghost" batches); 0: the whole batch.
    norm_batch: int = 0
    learning_rate: float = float(PER_NORM)  # the one-cycle peak; 0: the norm's recipe (RECIPES)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.0
    label_smoothing: float = 0.1
    warmup_epochs: float = 2.0
    ema: float = 0.0
    cutout: int = 0
    translate: int = 4
    whiten: bool = False
    widths: str = ""  # overrides of the layers' output channels, e.g. "C2=32,C7=24"
    order: str = "norm-act"
    standardize: str = "auto"
    residual: bool = False
    conv_groups: int = 1
    activation: str = "auto"  # auto: the norm's recipe (RECIPES)
    pool: str = "auto"  # auto: the norm's recipe (RECIPES)
    optimizer: str = "auto"  # auto: the norm's recipe (RECIPES)
    muon_lr: float = 0.03  # optimizer=muon: the filters' peak learning rate (one-cycle too)
    muon_momentum: float = 0.9
    muon_renormalize: bool = True  # reset each filter tensor's norm to sqrt(out) every step
    tta: str = DEFAULT_TTA
    val_size: int = DEFAULT_VAL_SIZE  # training images held out for validation; 0: none
    seed: int = 1
    data: str = DEFAULT_DATA
    stats: str = ""
    device: str = "auto"
    precision: str = "auto"
    compile: str = "off"
    cuda_graphs: str = "auto"
    registered_model: str = REGISTERED_MODEL
    resume: str = ""

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        check_int_range("groups", self.groups, low=1)
        check_int_range("epochs", self.epochs, low=1, high=MAX_MEASUREMENT_EPOCHS)
        for name, value in RECIPES[self.norm].items():
            if _asks_for_recipe(getattr(self, name), PER_NORM_VALUES[name]):
                object.__setattr__(self, name, value)
        check_int_range("batch_size", self.batch_size, low=2, high=8192, also=PER_NORM_CHOICE)
        check_norm_batch(self.norm_batch, norm=self.norm, batch_size=self.batch_size)
        check_float_range(
            "learning_rate",
            self.learning_rate,
            low=0.0,
            high=10.0,
            open_low=True,
            also=PER_NORM_CHOICE,
        )
        check_float_range("momentum", self.momentum, low=0.0, high=1.0, open_high=True)
        check_float_range("weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_float_range("dropout", self.dropout, low=0.0, high=1.0, open_high=True)
        check_float_range(
            "label_smoothing", self.label_smoothing, low=0.0, high=1.0, open_high=True
        )
        check_float_range("warmup_epochs", self.warmup_epochs, low=0.0, high=float(MAX_EPOCHS))
        check_float_range("ema", self.ema, low=0.0, high=1.0, open_high=True)
        check_int_range("cutout", self.cutout, low=0, high=32)
        check_int_range("translate", self.translate, low=0, high=16)
        check_bool("whiten", self.whiten)
        object.__setattr__(self, "widths", _widths_string(parse_widths(self.widths)))
        check_choice("order", self.order, ORDERS)
        object.__setattr__(self, "standardize", str(self.standardize).lower())
        check_choice("standardize", self.standardize, STANDARDIZE)
        check_bool("residual", self.residual)
        check_int_range("conv_groups", self.conv_groups, low=1, high=64)
        check_choice("activation", self.activation, ACTIVATIONS)
        if not REGISTRY[self.norm].activation and self.activation != "relu":
            raise ConfigError(
                f"activation does not apply to norm={self.norm}, which brings its own "
                f"(got activation={self.activation}; leave it at auto or relu)"
            )
        check_choice("pool", self.pool, POOLS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float_range("muon_lr", self.muon_lr, low=0.0, high=10.0, open_low=True)
        check_float_range("muon_momentum", self.muon_momentum, low=0.0, high=1.0, open_high=True)
        check_bool("muon_renormalize", self.muon_renormalize)
        check_choice("tta", self.tta, TTA_MODES)
        check_int_range("val_size", self.val_size, low=0, high=1_000_000)
        check_int_range("seed", self.seed, low=0, high=2**31 - 1)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("compile", self.compile, COMPILE_MODES)
        check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        if not str(self.data).strip():
            raise ConfigError(
                "data must be a CIFAR-10 directory, an image-folder tree or a .tar.gz"
            )
        if self.beyond_budget:
            object.__setattr__(self, "registered_model", "")
        if "{norm}" in self.registered_model:
            name = self.registered_model.replace("{norm}", self.norm)
            object.__setattr__(self, "registered_model", name)

    @property
    def beyond_budget(self) -> bool:
        """Trains past the study's 20 epochs: a measurement, never registered."""
        return self.epochs > MAX_EPOCHS

    def model_options(self) -> dict:
        """What `model.Net` takes from this config."""
        return {
            "norm": self.norm,
            "groups": self.groups,
            "norm_batch": self.norm_batch,
            "dropout": self.dropout,
            "whiten": self.whiten,
            "widths": parse_widths(self.widths),
            "order": self.order,
            "standardize": None if self.standardize == "auto" else self.standardize == "true",
            "residual": self.residual,
            "conv_groups": self.conv_groups,
            "activation": self.activation,
            "pool": self.pool,
        }

    def as_params(self) -> dict[str, str]:
        """The run parameters as MLflow records them (strings, one name per knob)."""
        return {f.name: _param_string(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class EvalConfig:
    model_uri: str
    data: str = DEFAULT_DATA
    stats: str = ""
    batch_size: int = 0  # 0: device.eval_batch_size_for the device
    device: str = "auto"
    tta: str = ""  # empty: what the training run evaluated with

    def __post_init__(self) -> None:
        if not self.model_uri.startswith(("runs:/", "models:/")):
            raise ConfigError(
                "model_uri must look like runs:/<run_id>/model, models:/<name>/<version> "
                f"or models:/<name>@<alias> (got {self.model_uri!r})"
            )
        check_int_range("batch_size", self.batch_size, low=0, high=65536)
        check_choice("device", self.device, DEVICES)
        if self.tta:
            check_choice("tta", self.tta, TTA_MODES)

    def as_params(self) -> dict[str, str]:
        return {f.name: _param_string(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _param_string(value: object) -> str:
    return "" if value is None else str(value)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")


def check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false (got {value!r})")


def check_norm_batch(norm_batch: int, *, norm: str, batch_size: int) -> None:
    """`norm_batch`: 0 (the whole batch), or a divisor of `batch_size` for a norm with batch
    statistics."""
    if norm_batch == 0 and not isinstance(norm_batch, bool):
        return
    check_int_range("norm_batch", norm_batch, low=1, high=8192, also=NORM_BATCH_CHOICE)
    if norm not in BATCH_STATISTICS_NORMS:
        raise ConfigError(
            f"norm_batch needs a norm with batch statistics ({', '.join(BATCH_STATISTICS_NORMS)}); "
            f"got norm={norm}"
        )
    if batch_size % norm_batch:
        raise ConfigError(
            f"norm_batch must divide batch_size {batch_size} into equal groups (got {norm_batch})"
        )


def recipe_help(name: str) -> str:
    """`0: the norm's recipe (batch 128, group 256, layer 128, ...)`, for a RECIPES parameter."""
    values = ", ".join(f"{norm} {_shown(recipe[name])}" for norm, recipe in RECIPES.items())
    return f"{_shown(PER_NORM_VALUES[name])}: the norm's recipe ({values})."


def _shown(value: int | float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _asks_for_recipe(given: object, per_norm: int | float | str) -> bool:
    """Whether a RECIPES parameter was left at its "per norm" value (0 or "auto"); a bool is
    never a number here (True == 1)."""
    if isinstance(per_norm, str):
        return given == per_norm
    return isinstance(given, int | float) and not isinstance(given, bool) and given == per_norm


def check_int_range(
    name: str, value: int, *, low: int, high: int | None = None, also: str = ""
) -> None:
    """`also` names a value allowed besides the range, e.g. `0 (the norm's recipe)`."""
    either = f"{also} or " if also else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be {either}an integer (got {value!r})")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{name} must be {either}{allowed} (got {value})")


def check_float_range(
    name: str,
    value: float,
    *,
    low: float,
    high: float,
    open_low: bool = False,
    open_high: bool = False,
    also: str = "",
) -> None:
    """`also` names a value allowed besides the interval, e.g. `0 (the norm's recipe)`."""
    either = f"{also} or " if also else ""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConfigError(f"{name} must be a number (got {value!r})")
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if too_low or too_high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ConfigError(f"{name} must be {either}in {interval} (got {value:g})")


def parse_widths(text: str) -> dict[str, int]:
    """`C2=32,C7=24` -> {"C2": 32, "C7": 24}; which layers exist is the model's to check."""
    widths: dict[str, int] = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        layer, _, value = part.partition("=")
        try:
            channels = int(value)
        except ValueError:
            channels = 0
        if not layer.strip() or channels < 1 or channels > 1024:
            raise ConfigError(
                f"widths are LAYER=CHANNELS pairs, channels in 1..1024, e.g. C2=32,C7=24 "
                f"(got {part.strip()!r})"
            )
        widths[layer.strip()] = channels
    return widths


def _widths_string(widths: dict[str, int]) -> str:
    return ",".join(f"{layer}={channels}" for layer, channels in widths.items())


def parse_norms(text: str) -> list[str]:
    """Parse `batch,group` into a validated list, keeping order and dropping repeats."""
    norms: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        check_choice("norm", name, NORMS)
        if name not in norms:
            norms.append(name)
    if not norms:
        raise ConfigError(f"norm must name at least one of {', '.join(NORMS)} (got {text!r})")
    return norms
