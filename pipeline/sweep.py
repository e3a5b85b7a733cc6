"""Sweeps: a grid of `train` parameters -> the list of trials, each a validated TrainConfig.

A grid is a string, `learning_rate=0.1,0.2,0.4;label_smoothing=0,0.1` (values separated by
commas, or by `|` where a value holds commas: `widths=C2=32,C7=24|C1=24`), or a YAML file:

    grid:                      # every norm
      learning_rate: [0.1, 0.4]
    norms:                     # per norm, where values differ (added to, or replacing, `grid`)
      group:
        groups: [2, 8]
    variants:                  # levers that only make sense together: each one trial
      - {conv_groups: 2, widths: "C4=48,C5=48"}

`variants` (top level, or inside a norm's grid, adding to the top level's) adds one trial per
entry, its values set together, in either mode.

`mode=grid` trains every combination; `mode=one-at-a-time` trains the defaults and each value
alone against them (the ablation design). Every trial runs for each norm and seed. Nothing here
talks to MLflow: the workflow runs the trials as `train` steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    check_int_range,
    parse_setting,
    train_run_name,
)

MODES = ("grid", "one-at-a-time")
MAX_TRIALS = 500
# Set by the sweep itself (norm, seed), shared by every trial, or naming one run: not levers.
NOT_SWEPT = ("norm", "seed", "data", "stats", "device", "registered_model", "resume")


@dataclass(frozen=True)
class Trial:
    """One training of a sweep: its overrides of the sweep's recipe, and the full config."""

    overrides: dict[str, str]  # swept parameter -> value, as the grid spells it
    config: TrainConfig

    @property
    def name(self) -> str:
        """`train-group-seed2-groups=8`: the run name, telling trials apart in the UI."""
        return train_run_name(self.config.norm, self.config.seed, self.overrides)


Grid = dict[str, list[str]]
Variant = dict[str, str]
VARIANTS = "variants"


@dataclass(frozen=True)
class Spec:
    """A sweep's values: the grid, and the variants (levers set together, one trial each)."""

    grid: Grid
    variants: list[Variant] = dataclasses.field(default_factory=list)


def sweepable() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SWEPT]


def parse_grid(text: str) -> Grid:
    """`key=v1,v2;key2=v3` -> {key: [v1, v2], key2: [v3]}, keys checked."""
    grid: Grid = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, separator, values = part.partition("=")
        key = key.strip()
        if not separator or not values.strip():
            raise ConfigError(f"grid entries are key=value,value,... (got {part.strip()!r})")
        splitter = "|" if "|" in values else ","
        grid[key] = [value.strip() for value in values.split(splitter) if value.strip()]
    return grid


def load_grid(spec: str) -> tuple[Spec, dict[str, Spec]]:
    """A grid string or a YAML file -> (what every norm sweeps, what each norm adds)."""
    path = Path(spec).expanduser()
    if not spec.strip():
        raise ConfigError("grid is empty: give key=value,... pairs or a YAML file")
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"grid file {spec!r} does not exist")
        return _grid_file(path)
    return Spec(parse_grid(spec)), {}


def _grid_file(path: Path) -> tuple[Spec, dict[str, Spec]]:
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"grid file {path}: not valid YAML ({error})") from None
    if not isinstance(document, dict) or not set(document) <= {"grid", "norms", VARIANTS}:
        raise ConfigError(f"grid file {path}: expected the keys `grid`, `norms`, `variants`")
    per_norm = document.get("norms") or {}
    if not isinstance(per_norm, dict):
        raise ConfigError(f"grid file {path}: `norms` maps a norm to its grid")
    common = _file_spec(path, document.get("grid") or {})
    variants = _file_variants(path, document.get(VARIANTS) or [])
    return (
        Spec(common.grid, common.variants + variants),
        {str(norm): _file_spec(path, grid or {}) for norm, grid in per_norm.items()},
    )


def _file_spec(path: Path, grid) -> Spec:
    """A grid of the file (top level or a norm's), its `variants` key apart."""
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path}: a grid maps a parameter to a list of values")
    swept = {
        str(key): [_yaml_value(v) for v in (values if isinstance(values, list) else [values])]
        for key, values in grid.items()
        if key != VARIANTS
    }
    return Spec(swept, _file_variants(path, grid.get(VARIANTS, [])))


def _file_variants(path: Path, variants) -> list[Variant]:
    if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
        raise ConfigError(f"grid file {path}: `variants` is a list of parameter -> value maps")
    return [{str(key): _yaml_value(value) for key, value in v.items()} for v in variants]


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def convert(key: str, value: str):
    """A grid value as the TrainConfig field `key` takes it (the field validates it)."""
    try:
        return parse_setting(key, value)
    except ConfigError as error:
        raise ConfigError(f"grid: {error}") from None


def trials(
    spec: str,
    *,
    norms: Sequence[str],
    seeds: int,
    mode: str = "grid",
    max_trials: int = MAX_TRIALS,
    **recipe,
) -> tuple[list[Trial], list[str]]:
    """Every trial of a sweep, validated before any run starts, and the swept keys in order.

    `recipe` is the sweep's base recipe (train options); each trial overrides it.
    """
    check_choice("mode", mode, MODES)
    check_int_range("max_trials", max_trials, low=1)
    check_int_range("seeds", seeds, low=1, high=100)
    common, per_norm = load_grid(spec)
    unknown_norms = sorted(set(per_norm) - set(norms))
    allowed = sweepable()
    found: list[Trial] = []
    keys: list[str] = []
    for norm in norms:
        own = per_norm.get(norm, Spec({}))
        grid = {**common.grid, **own.grid}
        variants = common.variants + own.variants  # a norm's variants add to every norm's
        for key, values in grid.items():
            if key not in allowed:
                raise ConfigError(f"grid: {key!r} is not a train parameter ({', '.join(allowed)})")
            if not values:
                raise ConfigError(f"grid: {key} has no values")
            for value in values:
                _config(norm, 1, recipe, {key: value})  # each value alone must validate
        for variant in variants:
            unknown = [key for key in variant if key not in allowed]
            if unknown:
                raise ConfigError(f"grid: variant {unknown[0]!r} is not a train parameter")
        keys.extend(key for key in grid if key not in keys)
        keys.extend(key for variant in variants for key in variant if key not in keys)
        for overrides in _combinations(grid, mode) + variants:
            for seed in range(1, seeds + 1):
                found.append(Trial(overrides, _config(norm, seed, recipe, overrides)))
    if unknown_norms:
        raise ConfigError(
            f"grid: per-norm values for {', '.join(unknown_norms)}, which this sweep does not "
            f"train (norm={','.join(norms)})"
        )
    if not keys:
        raise ConfigError("grid is empty: give key=value,... pairs or a YAML file")
    found = _unique(found)
    if len(found) > max_trials:
        raise ConfigError(
            f"the sweep has {len(found)} trials, more than max_trials={max_trials}: "
            "narrow the grid or raise max_trials"
        )
    return found, keys


def _combinations(grid: Grid, mode: str) -> list[dict[str, str]]:
    if mode == "grid":
        return [
            dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
        ]
    # one-at-a-time: the defaults, then each value alone
    return [{}] + [{key: value} for key, values in grid.items() for value in values]


def _config(norm: str, seed: int, recipe: dict, overrides: dict[str, str]) -> TrainConfig:
    values = {key: convert(key, value) for key, value in overrides.items()}
    try:
        return TrainConfig(**{**recipe, **values, "norm": norm, "seed": seed})
    except ConfigError as error:
        if not overrides:
            raise
        where = ", ".join(f"{key}={value}" for key, value in overrides.items())
        raise ConfigError(f"grid: {where}: {error}") from None


def _unique(found: list[Trial]) -> list[Trial]:
    """Drop trials whose config another trial already has (a swept value equal to the
    default, in one-at-a-time mode, is the baseline)."""
    seen: set[tuple] = set()
    unique = []
    for trial in found:
        key = tuple(sorted(trial.config.as_params().items()))
        if key not in seen:
            seen.add(key)
            unique.append(trial)
    return unique
