"""Frozen run configurations and their validation: the one source of parameter names.

Every knob has one spelling everywhere: the MLproject parameter, the click option, the field here
and the MLflow param (`learning_rate`, `batch_size`, `norm`, `groups`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
# batch and layer norm, 256 for group norm (docs/history.md#the-recipe-re-decided-on-validation);
# Muon for batch, group and layer norm, SiLU for batch and group norm and average pooling for
# layer norm (docs/history.md#third-round-muon-the-activation-and-the-pooling). The resolved
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
PER_NORM_SHIFT = -1  # translate's: its 0 turns the shift off
# Each RECIPES parameter's "per norm" value (the parameter's default): 0, -1 or "auto".
PER_NORM_VALUES: dict[str, int | float | str] = {
    "activation": "auto",
    "batch_size": PER_NORM,
    "learning_rate": float(PER_NORM),
    "optimizer": "auto",
    "pool": "auto",
    "translate": PER_NORM_SHIFT,
}
NORM_BATCH_CHOICE = "0 (the whole batch)"


def setting(
    default: object,
    help: str = "",
    *,
    check: Callable[[str, object], None] | None = None,
    choices: tuple[str, ...] = (),
    click_choice: bool = False,
) -> dataclasses.Field:
    """A TrainConfig or EvalConfig field: its default, its check and its help, the one
    declaration of a setting; the click options (cli.config_options) and MLproject follow
    from it.

    `choices` are checked here (`norm must be one of ...`) unless `click_choice`, where click
    refuses other values already (`'adam' is not one of ...`); a RECIPES parameter's click
    choices add its "per norm" value."""
    if choices and check is None:

        def check(name: str, value: object) -> None:
            check_choice(name, value, choices)

    metadata = {"help": help, "check": check, "choices": choices, "click_choice": click_choice}
    return dataclasses.field(default=default, metadata=metadata)


def int_range(low: int, high: int | None = None, *, also: str = "") -> Callable:
    return lambda name, value: check_int_range(name, value, low=low, high=high, also=also)


def float_range(
    low: float, high: float, *, open_low: bool = False, open_high: bool = False, also: str = ""
) -> Callable:
    return lambda name, value: check_float_range(
        name, value, low=low, high=high, open_low=open_low, open_high=open_high, also=also
    )


def _check_data(name: str, value: object) -> None:
    if not str(value).strip():
        raise ConfigError(f"{name} must be a CIFAR-10 directory, an image-folder tree or a .tar.gz")


_DATA_HELP = "CIFAR-10 directory (downloaded there when missing), image-folder tree or .tar.gz."
_DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda or mps."
_EVAL_BATCH_HELP = "Images per forward pass; 0: 128 on the CPU, 1024 on a GPU."
_BF16_NORMS = ", ".join(name for name, entry in REGISTRY.items() if entry.bf16) or "none yet"
_STANDARDIZED = ", ".join(name for name, entry in REGISTRY.items() if entry.standardize)
_NORM_HELP = "; ".join(f"{name}: {entry.description}" for name, entry in REGISTRY.items()) + "."


def _shown(value: int | float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_help(name: str) -> str:
    """`0: the norm's recipe (batch 128, group 256, layer 128, ...)`, for a RECIPES parameter."""
    values = ", ".join(f"{norm} {_shown(recipe[name])}" for norm, recipe in RECIPES.items())
    return f"{_shown(PER_NORM_VALUES[name])}: the norm's recipe ({values})."


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train` needs; defaults are the recipe the results (docs/results.md) come from.

    A setting is one `setting(...)` here: `train`'s click option is made from it, MLproject
    passes what it does not declare through (`--key value`), and it is logged under its name.
    """

    norm: str = setting("batch", _NORM_HELP, choices=NORMS)
    groups: int = setting(4, "Groups for norm=group.", check=int_range(1))
    epochs: int = setting(
        MAX_EPOCHS,
        f"1..{MAX_EPOCHS}; up to {MAX_MEASUREMENT_EPOCHS} to measure the model's ceiling "
        "(such runs are tagged beyond_budget and never registered).",
        check=int_range(1, MAX_MEASUREMENT_EPOCHS),
    )
    batch_size: int = setting(
        PER_NORM,
        f"Images per training step; {recipe_help('batch_size')}",
        check=int_range(2, 8192, also=PER_NORM_CHOICE),
    )
    norm_batch: int = setting(  # checked with batch_size (check_norm_batch)
        0,
        "Images per batch-statistics group (ghost batches): each group of a training batch "
        "normalized by its own statistics, as per-GPU batch norm; 0: the whole batch. Must "
        "divide batch_size; only for a norm with batch statistics "
        f"({', '.join(BATCH_STATISTICS_NORMS)}).",
    )
    learning_rate: float = setting(
        float(PER_NORM),
        f"Peak of the one-cycle schedule; {recipe_help('learning_rate')}",
        check=float_range(0.0, 10.0, open_low=True, also=PER_NORM_CHOICE),
    )
    momentum: float = setting(0.9, check=float_range(0.0, 1.0, open_high=True))
    weight_decay: float = setting(5e-4, "On conv weights only.", check=float_range(0.0, 1.0))
    dropout: float = setting(0.0, check=float_range(0.0, 1.0, open_high=True))
    label_smoothing: float = setting(0.1, check=float_range(0.0, 1.0, open_high=True))
    warmup_epochs: float = setting(2.0, check=float_range(0.0, float(MAX_EPOCHS)))
    ema: float = setting(
        0.0,
        "Per-step decay of a moving average of the weights, which is what gets evaluated "
        "and logged; 0 turns it off.",
        check=float_range(0.0, 1.0, open_high=True),
    )
    cutout: int = setting(
        0,
        "Side in pixels of the square blanked in each training image; 0 turns it off.",
        check=int_range(0, 32),
    )
    translate: int = setting(
        PER_NORM_SHIFT,
        f"Largest random shift in pixels of a training image, 0: off; {recipe_help('translate')}",
        check=int_range(0, 16, also=f"{PER_NORM_SHIFT} (the norm's recipe)"),
    )
    whiten: bool = setting(
        False, "Start C1 from PCA whitening filters of the training images' patches."
    )
    widths: str = setting(
        "",
        "Output channels of some layers instead of the defaults, e.g. C2=32,C7=24 (the model "
        "stays within 50,000 parameters).",
        check=lambda name, value: parse_widths(value),
    )
    order: str = setting(
        "norm-act",
        "conv -> norm -> ReLU, or conv -> ReLU -> norm.",
        choices=ORDERS,
        click_choice=True,
    )
    standardize: str = setting(
        "auto",
        f"Weight standardization of the convs; auto: the norm's default, on for {_STANDARDIZED}.",
        choices=STANDARDIZE,
        click_choice=True,
    )
    residual: bool = setting(
        False,
        "Add each 3x3 layer's input to its output where their channels match (C4->C5, "
        "C7->C8->C9 by default): no parameter or layer added.",
    )
    conv_groups: int = setting(
        1,
        "Grouped 3x3 convs C2..C9 (1: dense); the 1x1 layers c3 and c6 mix the groups.",
        check=int_range(1, 64),
    )
    activation: str = setting(
        "auto",
        f"The non-linearity of every conv block (no parameters); {recipe_help('activation')}",
        choices=ACTIVATIONS,
        click_choice=True,
    )
    pool: str = setting(
        "auto",
        f"P1 and P2: 2x2 max or average pooling; {recipe_help('pool')}",
        choices=POOLS,
        click_choice=True,
    )
    optimizer: str = setting(
        "auto",
        "sgd: SGD with Nesterov momentum for everything; muon: Muon for the conv filters but "
        "the c10 head (muon_lr, muon_momentum), the same SGD for norms, biases and the head; "
        f"{recipe_help('optimizer')}",
        choices=OPTIMIZERS,
        click_choice=True,
    )
    muon_lr: float = setting(
        0.03,
        "optimizer=muon: the filters' peak learning rate (the one-cycle schedule scales it).",
        check=float_range(0.0, 10.0, open_low=True),
    )
    muon_momentum: float = setting(
        0.9,
        "optimizer=muon: the filters' Nesterov momentum.",
        check=float_range(0.0, 1.0, open_high=True),
    )
    muon_renormalize: bool = setting(
        True, "optimizer=muon: reset each filter tensor's norm to sqrt(out channels) every step."
    )
    muon_ns_steps: int = setting(
        5,
        "optimizer=muon: Newton-Schulz iterations that orthogonalize each filter's update "
        "(Jordan, 2024, and torch.optim.Muon: 5).",
        check=int_range(1, 10),
    )
    muon_pointwise: bool = setting(
        True,
        "optimizer=muon: Muon for the 1x1 convs c3 and c6 as well; false: the same SGD as "
        "the head's for them.",
    )
    tta: str = setting(
        DEFAULT_TTA,
        f"Test-time augmentation: {', '.join(TTA_MODES)}. How each epoch's validation and test "
        "accuracy are computed.",
        choices=TTA_MODES,
    )
    val_size: int = setting(
        DEFAULT_VAL_SIZE,
        "Training images held out for validation, drawn per class with a seed of their own "
        "(the same images in every run of a dataset); choices rank by them. 0: none.",
        check=int_range(0, 1_000_000),
    )
    seed: int = setting(1, check=int_range(0, 2**31 - 1))
    data: str = setting(DEFAULT_DATA, _DATA_HELP, check=_check_data)
    stats: str = setting(
        "", "stats.json path or runs:/<id>/stats.json; empty computes (and caches) them."
    )
    device: str = setting("auto", _DEVICE_HELP, choices=DEVICES)
    precision: str = setting(
        "auto",
        "auto: fp32, or bf16 autocast for the norms measured to hold their accuracy in it "
        f"({_BF16_NORMS}) on a CPU with native bf16 (AVX512-BF16, AMX); bf16: autocast always.",
        choices=PRECISIONS,
        click_choice=True,
    )
    compile: str = setting(
        "off",
        "torch.compile the model: faster steps after a warm-up of a minute or more per run.",
        choices=COMPILE_MODES,
        click_choice=True,
    )
    cuda_graphs: str = setting(
        "auto",
        "Replay the training step and the evaluation's forward passes as CUDA graphs; "
        "auto: on for a CUDA device (not with compile on), off elsewhere.",
        choices=CUDA_GRAPHS,
        click_choice=True,
    )
    registered_model: str = setting(
        REGISTERED_MODEL,
        "Registry name ({norm} is filled in); an empty string disables registration.",
    )
    resume: str = setting(
        "",
        "Run id of an interrupted train run to continue, with that run's settings (a setting "
        "given as well must equal the run's).",
    )

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        for name, value in RECIPES[self.norm].items():
            if _asks_for_recipe(getattr(self, name), PER_NORM_VALUES[name]):
                object.__setattr__(self, name, value)
        object.__setattr__(self, "standardize", str(self.standardize).lower())
        check_fields(self)
        check_norm_batch(self.norm_batch, norm=self.norm, batch_size=self.batch_size)
        if not REGISTRY[self.norm].activation and self.activation != "relu":
            raise ConfigError(
                f"activation does not apply to norm={self.norm}, which brings its own "
                f"(got activation={self.activation}; leave it at auto or relu)"
            )
        object.__setattr__(self, "widths", _widths_string(parse_widths(self.widths)))
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

    @classmethod
    def from_params(cls, params: dict[str, str], **overrides) -> TrainConfig:
        """The config a run's logged params (strings) describe; a field the run did not log
        (it predates the field) takes its default, `tta` the one runs evaluated with then."""
        values = {"tta": TTA_BEFORE_PARAM}
        for field in dataclasses.fields(cls):
            if field.name in params:
                values[field.name] = parse_setting(field.name, _unquoted(params[field.name]))
        return cls(**{**values, **overrides})


def parse_setting(name: str, text: str) -> object:
    """A setting's value from its string (a logged param, a grid's value), as its TrainConfig
    field takes it; the field validates it."""
    kind = next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name)
    try:
        if kind == "bool":
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"{name} takes {kind} values (got {text!r})") from None
    return text


def _unquoted(text: str) -> str:
    """A param `mlflow run` logged shell-quoted (an empty value as '') as the value itself."""
    if text.startswith("'") and text.endswith("'") and len(text) >= 2:
        return text[1:-1].replace("'\"'\"'", "'")
    return text


def train_run_name(norm: str, seed: int | str, overrides: dict[str, str] | None = None) -> str:
    """`train-group-seed2`, and a sweep trial's overrides after it (`-groups=8`): the one
    place a training's run name is made (the UI's run list tells the runs apart by it)."""
    base = f"train-{norm}-seed{seed}"
    if not overrides:
        return base
    return base + "-" + ",".join(f"{key}={value}" for key, value in overrides.items())


def model_label(*, run_id: str, name: str | None = None, version: str | None = None) -> str:
    """`cifar10-layer-v3` for a registered version, else the run id's first 8 characters:
    how an evaluation names the model it evaluates."""
    return f"{name}-v{version}" if version else run_id[:8]


# Batch norm at evaluation: the running statistics of training, or each test batch's own.
BN_STATS = ("running", "test-batch")
NO_CORRUPTIONS, GENERATED_CORRUPTIONS = "none", "generated"  # or a directory of CIFAR-10-C


def _check_model_uri(name: str, value: object) -> None:
    if not str(value).startswith(("runs:/", "models:/")):
        raise ConfigError(
            f"{name} must look like runs:/<run_id>/model, models:/<name>/<version> "
            f"or models:/<name>@<alias> (got {value!r})"
        )


@dataclass(frozen=True)
class EvalConfig:
    """Everything `evaluate` needs: a setting is one `setting(...)` here, as in TrainConfig;
    `evaluate`'s options (and `main`'s evaluation options) are made from it."""

    model_uri: str = setting(
        "",
        "runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>.",
        check=_check_model_uri,
    )
    data: str = setting(DEFAULT_DATA, _DATA_HELP, check=_check_data)
    stats: str = setting("", "Default: the training run's stats.json.")
    batch_size: int = setting(0, _EVAL_BATCH_HELP, check=int_range(0, 65536))
    device: str = setting("auto", _DEVICE_HELP, choices=DEVICES)
    tta: str = setting(
        "",
        f"Test-time augmentation: {', '.join(TTA_MODES)}. Default: what the training run used.",
        check=lambda name, value: value and check_choice(name, value, TTA_MODES),
    )
    corruptions: str = setting(
        NO_CORRUPTIONS,
        f"{NO_CORRUPTIONS}; {GENERATED_CORRUPTIONS}: CIFAR-10-C's 15 corruptions x 5 severities "
        "built from the test split (cached per data, eval_seed and implementation); or a "
        "directory of the published CIFAR-10-C files (<corruption>.npy, labels.npy).",
    )
    corruption_tta: str = setting(
        "none",
        "Test-time augmentation of the corrupted images (the clean figures keep tta).",
        choices=TTA_MODES,
    )
    bn_stats: str = setting(
        "running",
        "running: batch norm normalizes with the statistics learned in training; test-batch: "
        "with each test batch's own (bn_stats_batch images, shuffled by eval_seed). Only for "
        f"a norm with batch statistics ({', '.join(BATCH_STATISTICS_NORMS)}).",
        choices=BN_STATS,
    )
    bn_stats_batch: int = setting(
        128,
        "bn_stats=test-batch: images per test batch whose statistics batch norm takes (not "
        "batch_size); the last partial batch joins the one before.",
        check=int_range(2, 65536),
    )
    eval_seed: int = setting(
        0,
        "Seeds the generated corruptions and the test-batch shuffle (not the training's seed).",
        check=int_range(0, 2**31 - 1),
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def as_params(self) -> dict[str, str]:
        return {f.name: _param_string(getattr(self, f.name)) for f in dataclasses.fields(self)}


def check_fields(config: object) -> None:
    """Run each `setting(...)` field's check (a bool field must be a bool)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type == "bool":
            check_bool(field.name, value)
        elif field.metadata.get("check"):
            field.metadata["check"](field.name, value)


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
