"""The lever table (a study's runs grouped by the params they vary, each lever paired by seed
with its norm's default recipe) and the tta table, with the adoption rule they apply (no MLflow
here). As in report.tables, every choice is made on the validation split; the test accuracy is
reported beside it, never chosen on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pipeline.config import TTA_BEFORE_PARAM, TTA_MODES, TrainConfig
from pipeline.model import NUM_CLASSES
from pipeline.report.frame import TRAINING_SETTINGS, Study, ordered_norms
from pipeline.report.tables import mean_of, percent_column, run_summary, standard_error

# The adoption rule: a lever is adopted when its gain over the defaults, paired by seed on the
# same validation split, exceeds ADOPT_STANDARD_ERRORS standard errors over ADOPT_MIN_SEEDS or
# more seeds (config.RECIPES holds what was adopted). Or, first of all, when it trains where the
# defaults do not: the defaults failed on a seed (diverged, or ended at chance: AT_CHANCE) that
# the lever trained on, the lever trained on every one of its ADOPT_MIN_SEEDS or more seeds, and
# on the seeds where both trained it is not behind (one collapse makes the paired gain's
# standard error as large as the gain, so the first clause alone would keep a recipe that
# does not train).
ADOPT_STANDARD_ERRORS = 2.0
ADOPT_MIN_SEEDS = 3
# A run whose training accuracy after its last epoch is below 1.5x chance (15% for 10 classes)
# did not train: a collapse to one class, the loss stuck at ln(10), not a slow start. A finished
# run that learned anything is far above it after its first epoch on real data.
AT_CHANCE = 1.5 / NUM_CLASSES


@dataclass(frozen=True)
class PairedGain:
    """A lever's gain over the defaults on the seeds both ran on the same validation split."""

    points: float  # mean of (lever - default) in percentage points
    standard_error: float  # of that mean, in points: std of the differences / sqrt(n)
    pairs: int  # seeds paired

    @property
    def adopted(self) -> bool:
        """The adoption rule: a gain above ADOPT_STANDARD_ERRORS standard errors over at
        least ADOPT_MIN_SEEDS paired seeds."""
        return (
            self.pairs >= ADOPT_MIN_SEEDS
            and not math.isnan(self.standard_error)
            and self.points > ADOPT_STANDARD_ERRORS * self.standard_error
        )


def paired_gain(mine: pd.Series, baseline: pd.Series) -> PairedGain:
    """`mine - baseline` in points over the index labels both have (a seed and a validation
    split's digest, or a model), with its standard error; NaN where they share none."""
    shared = sorted(set(mine.dropna().index) & set(baseline.dropna().index))
    if not shared:
        return PairedGain(math.nan, math.nan, 0)
    differences = 100 * (mine[shared] - baseline[shared]).astype(float)
    return PairedGain(float(differences.mean()), standard_error(differences), len(shared))


def lever_table(study: Study) -> pd.DataFrame:
    """One row per norm and combination of `study.group_by` values, ranked per norm by final
    validation accuracy: its mean and standard error over seeds, the gain over that norm's
    default-recipe runs paired by seed on the same validation split, with its standard error
    and the adoption rule's verdict; the final test accuracy beside it, never chosen on.

    The default recipe is the row whose group_by values are the norm's `TrainConfig` defaults
    (config.RECIPES). Every other training setting that varies among a norm's runs is held at
    the recipe: a run that moved one (another sweep's lever in the same experiment) is in no
    row (`set_aside` names it), so the default row is the recipe itself. Pairing by seed
    compares runs that started from the same initial weights and batch order, and pairing on
    the split's digest never compares runs validated on different images.
    """
    keys = list(study.group_by)
    summary = _predating_at_recipe(
        run_summary(study).merge(study.train[["run_id", *keys]], on="run_id"), keys
    )
    outcomes = _training_outcomes(study, summary, keys)
    # Runs where a lever not grouped by moved away from the recipe belong to no row.
    aside = set(set_aside(study)["run_id"])
    summary = summary[~summary["run_id"].isin(aside)]
    outcomes = outcomes[~outcomes["run_id"].isin(aside)]
    rows = []
    for norm in study.norms:
        norm_rows = _norm_lever_rows(
            summary[summary["norm"] == norm], outcomes[outcomes["norm"] == norm], keys, norm=norm
        )
        # Ranked on validation; rows without it (runs from before the split) come last.
        norm_rows.sort(
            key=lambda row: (math.isnan(row["final_val_acc_mean"]), -row["final_val_acc_mean"])
        )
        rows.extend(norm_rows)
    return pd.DataFrame(rows)


# Runs are paired by seed (the same initial weights and batch order) on the same validation split.
PAIR_KEYS = ["seed", "val_digest"]


def _norm_lever_rows(
    runs: pd.DataFrame, outcomes: pd.DataFrame, keys: Sequence[str], *, norm: str
) -> list[dict[str, object]]:
    """One norm's rows of the lever table, one per combination of `keys` values, each judged
    against the runs of the norm's default recipe."""
    recipe = TrainConfig(norm=norm).as_params()  # the norm's defaults (config.RECIPES)
    defaults = {key: param_value(value) for key, value in recipe.items()}
    default_values = tuple(defaults.get(key, "") for key in keys)
    is_default = pd.Series(True, index=runs.index)
    for key, value in zip(keys, default_values, strict=True):
        is_default &= runs[key] == value
    baseline = runs[is_default].set_index(PAIR_KEYS)["final_val_acc"]
    baseline_trained = runs[is_default & _trained(runs)].set_index(PAIR_KEYS)["final_val_acc"]
    default_failed = _failed_seeds(outcomes, keys, default_values)
    rows = []
    for values, group in runs.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        mine = group.set_index(PAIR_KEYS)["final_val_acc"]
        seeds = set(group["seed"].dropna().astype(int))
        # NaN where no seed trained under both: not behind.
        behind = paired_gain(mine, baseline_trained).points < 0
        rescued = sorted(default_failed & seeds)
        row = _lever_row(
            group,
            is_baseline=bool(is_default.loc[group.index].all()),
            gain=paired_gain(mine, baseline),
            rescued=rescued,
            rescues=bool(rescued)
            and not _failed_seeds(outcomes, keys, values)
            and len(seeds) >= ADOPT_MIN_SEEDS
            and not behind,
        )
        rows.append({"norm": norm, **dict(zip(keys, values, strict=True)), **row})
    return rows


def _lever_row(
    group: pd.DataFrame, *, is_baseline: bool, gain: PairedGain, rescued: list[int], rescues: bool
) -> dict[str, object]:
    """A lever's row: its accuracies over seeds and, unless it is the default recipe, its gain
    and the adoption rule's verdict; `rescues`: it trains on the seeds `rescued`, where the
    default did not, on all its seeds, and is not behind where both trained."""
    rescues = rescues and not is_baseline
    return {
        "default": is_baseline,
        "runs": len(group),
        "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int))),
        "final_val_acc_mean": mean_of(group["final_val_acc"]),
        "final_val_acc_se": standard_error(group["final_val_acc"]),
        "gain_points": math.nan if is_baseline else gain.points,
        "gain_se_points": math.nan if is_baseline else gain.standard_error,
        "paired_seeds": 0 if is_baseline else gain.pairs,
        "adopt": False if is_baseline else gain.adopted or rescues,
        # Seeds the defaults did not train on and this lever did, where that decided the
        # adoption.
        "rescued_seeds": ",".join(map(str, rescued)) if rescues and not gain.adopted else "",
        "final_test_acc_mean": mean_of(group["final_test_acc"]),
        "final_test_acc_se": standard_error(group["final_test_acc"]),
    }


def _training_outcomes(study: Study, summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """norm, seed, the group_by values and `trained` for every train run: False where it
    diverged (no final accuracy) or ended at chance."""
    finished = summary[["run_id", "norm", "seed", *keys]]
    finished = finished.assign(trained=_trained(summary).to_numpy())
    if study.diverged.empty:
        return finished
    diverged = study.diverged[["run_id", "norm", "seed", *keys]].assign(trained=False)
    return pd.concat([finished, _predating_at_recipe(diverged, keys)], ignore_index=True)


def _predating_at_recipe(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """`runs` with the values of `keys` spelled one way (param_value), and where a run logged
    none (it predates the setting) the value it trained with: its norm's recipe value, which
    a new setting's default keeps; `tta` the one runs evaluated with before it was a param."""
    runs = runs.copy()
    for key in keys:
        runs[key] = runs[key].map(param_value)
    for norm in runs["norm"].unique():
        recipe = {**TrainConfig(norm=norm).as_params(), "tta": TTA_BEFORE_PARAM}
        of_norm = runs["norm"] == norm
        for key in (key for key in keys if key in recipe):
            runs.loc[of_norm & (runs[key] == ""), key] = param_value(recipe[key])
    return runs


def set_aside(study: Study) -> pd.DataFrame:
    """The train runs (diverged ones too) that the lever table leaves out: run_id, norm, seed
    and `moved`, the training settings (as "<name> <value>") that the run does not hold at
    its norm's recipe, among those not grouped by that vary between the norm's runs. Such a
    run is another lever's, swept in the same experiments; counted as the recipe, it would
    pull the default row off the recipe."""
    columns = ["run_id", "norm", "seed", "moved"]
    runs = pd.concat([study.train, study.diverged])
    if runs.empty or study.settings.empty:
        return pd.DataFrame(columns=columns)
    free = [name for name in TRAINING_SETTINGS if name not in study.group_by]
    runs = _predating_at_recipe(
        runs[["run_id", "norm", "seed"]].merge(study.settings, on="run_id"), free
    )
    rows = []
    for norm, group in runs.groupby("norm", sort=False):
        recipe = TrainConfig(norm=norm).as_params()
        moved = pd.Series([[] for _ in group.index], index=group.index, dtype=object)
        for name in free:
            default, values = param_value(recipe[name]), group[name]
            if values.nunique() < 2:
                continue
            for index in values.index[values != default]:
                moved[index].append(f"{name} {values[index]}")
        for index in moved.index[moved.map(bool)]:
            row = group.loc[index]
            rows.append([row["run_id"], norm, row["seed"], ", ".join(moved[index])])
    return pd.DataFrame(rows, columns=columns)


def set_aside_note(study: Study) -> str:
    """One line that counts the runs the lever table left out, per norm and setting; "" where
    it left out none."""
    aside = set_aside(study)
    if aside.empty:
        return ""
    counts = aside.groupby(["norm", "moved"], sort=False).size()
    order = ordered_norms(aside["norm"])
    parts = [
        f"{norm} norm {count} run{'s' * (count != 1)} ({moved})"
        for (norm, moved), count in sorted(counts.items(), key=lambda item: order.index(item[0][0]))
    ]
    return (
        "Not in the table, a setting not grouped by away from the recipe: "
        + "; ".join(parts)
        + ". Group by it too to compare them."
    )


def _trained(summary: pd.DataFrame) -> pd.Series:
    """Per finished run: its final training accuracy is at least AT_CHANCE (it trained)."""
    return summary["final_train_acc"] >= AT_CHANCE


def _failed_seeds(outcomes: pd.DataFrame, keys: Sequence[str], values: tuple) -> set[int]:
    """The seeds on which the runs with these group_by values did not train."""
    match = ~outcomes["trained"]
    for key, value in zip(keys, values, strict=True):
        match &= outcomes[key] == value
    return set(pd.to_numeric(outcomes.loc[match, "seed"], errors="coerce").dropna().astype(int))


def _gain_cells(gains: pd.Series, errors: pd.Series, counts: pd.Series, noun: str) -> list[str]:
    """ "+1.50 ± 0.40 (3 seeds)" per row (± the standard error where there are two or more);
    empty where there is no gain."""
    cells = []
    for gain, error, count in zip(gains, errors, counts, strict=True):
        if math.isnan(gain):
            cells.append("")
            continue
        spread = "" if math.isnan(error) else f" ± {error:.2f}"
        cells.append(f"{gain:+.2f}{spread} ({count} {noun}{'s' * (count != 1)})")
    return cells


def param_value(value) -> str:
    """One spelling per value: `mlflow run -P whiten=true` logs "true" where the CLI logs
    "True", and "0" and "0.0" are the same number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def readable_lever_table(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    out = table[["norm", *keys]].copy()
    out["recipe"] = ["default" if d else "" for d in table["default"]]
    out["runs"] = table["runs"]
    out["seeds"] = table["seeds"]
    out["val acc % (mean ± SE)"] = percent_column(table, "final_val_acc")
    out["val gain (points ± SE)"] = _gain_cells(
        table["gain_points"], table["gain_se_points"], table["paired_seeds"], "seed"
    )
    out["adopt?"] = [
        ""
        if d
        else (f"yes: trains where the default did not (seed {r})" if r else "yes" if a else "no")
        for d, a, r in zip(table["default"], table["adopt"], table["rescued_seeds"], strict=True)
    ]
    out["test acc % (reported, not chosen on)"] = percent_column(table, "final_test_acc")
    return out


def tta_table(study: Study) -> pd.DataFrame:
    """Evaluate runs per norm and test-time augmentation: test accuracy over the evaluated
    models, and the mean gain over `TrainConfig`'s default tta on the models evaluated both
    ways, with its standard error. On the test split (what `evaluate` reads): reported, not a
    basis for choosing a tta."""
    evaluated = study.evaluated.dropna(subset=["test_acc"])
    default = TrainConfig().tta
    rows = []
    # Models trained outside the compared runs count too: norms come from the evaluations.
    for norm in ordered_norms(evaluated["norm"]):
        runs = evaluated[evaluated["norm"] == norm]
        baseline = runs[runs["tta"] == default].groupby("source_run_id")["test_acc"].mean()
        for tta in [t for t in TTA_MODES if t in set(runs["tta"])]:
            group = runs[runs["tta"] == tta]
            mine = group.groupby("source_run_id")["test_acc"].mean()
            gain = paired_gain(mine, baseline)
            rows.append(
                {
                    "norm": norm,
                    "tta": tta,
                    "models": int(group["source_run_id"].nunique()),
                    "test_acc_mean": float(mine.mean()),
                    "test_acc_se": standard_error(mine),
                    "gain_points": math.nan if tta == default else gain.points,
                    "gain_se_points": math.nan if tta == default else gain.standard_error,
                    "paired_models": 0 if tta == default else gain.pairs,
                }
            )
    return pd.DataFrame(rows)


def readable_tta_table(table: pd.DataFrame) -> pd.DataFrame:
    out = table[["norm", "tta", "models"]].copy()
    out["test acc % (mean ± SE)"] = percent_column(table, "test_acc")
    out["gain (points ± SE)"] = _gain_cells(
        table["gain_points"], table["gain_se_points"], table["paired_models"], "model"
    )
    return out
