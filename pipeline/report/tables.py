"""The study's tables (per run, per norm, per class, per lever, per tta) and the findings
drawn from them, as pandas DataFrames and Markdown (no MLflow here).

Accuracies are fractions as logged (CSV) and percentages in the Markdown. Three splits, three
jobs: every choice the tables make (the lever table's ranking and its `adopt?`, the findings'
leader) is made on the validation accuracy after the last epoch; the test accuracy after the
last epoch is reported beside it, never chosen on. Means are shown with their standard error
over the n runs (`mean ± SE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pipeline.config import BATCH_STATISTICS_NORMS, NORMS, TTA_MODES, TrainConfig
from pipeline.model import NUM_CLASSES
from pipeline.norms import REGISTRY
from pipeline.report.frame import TABLE_PARAMS, Study, ordered_norms

# A final train accuracy this far above test accuracy (percentage points) is called over-fitting.
OVERFIT_GAP_POINTS = 5.0
# A final train accuracy below this (percent) is called under-fitting.
UNDERFIT_TRAIN_ACC = 60.0
# Validation accuracy peaking this far (points) above its final value is mentioned.
PEAK_DROP_POINTS = 1.0
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

SUMMARY_METRICS = (
    "final_val_acc",
    "best_val_acc",
    "final_test_acc",
    "final_train_acc",
    "train_test_gap",
    "epoch_seconds",
    "run_minutes",
)


def run_summary(study: Study) -> pd.DataFrame:
    """One row per train run: final validation and test accuracy, the best validation epoch,
    final train accuracy, the train-test gap, timings, and the run's validation split."""
    columns = [
        "run_id",
        "run_name",
        "norm",
        "label",
        "seed",
        "val_digest",
        "epochs_logged",
        "final_val_acc",
        "best_val_acc",
        "final_test_acc",
        "final_train_acc",
        "train_test_gap",
        "final_test_loss",
        "epoch_seconds",
        "run_minutes",
    ]
    rows = []
    for run in study.train.itertuples(index=False):
        history = study.history[study.history["run_id"] == run.run_id].sort_values("epoch")
        if history.empty:
            continue
        last = history.iloc[-1]
        val = history["val_acc"] if "val_acc" in history else pd.Series(dtype=float)
        rows.append(
            {
                "run_id": run.run_id,
                "run_name": run.run_name,
                "norm": run.norm,
                "label": run.label,
                "seed": run.seed,
                "val_digest": run.val_digest,
                "epochs_logged": int(last["epoch"]),
                "final_val_acc": _number(last.get("val_acc")),
                "best_val_acc": float(val.max()) if val.notna().any() else math.nan,
                "final_test_acc": float(last["test_acc"]),
                "final_train_acc": float(last["train_acc"]),
                "train_test_gap": float(last["train_acc"] - last["test_acc"]),
                "final_test_loss": float(last["test_loss"]),
                "epoch_seconds": float(history["epoch_seconds"].mean()),
                "run_minutes": float(run.run_minutes),
            }
        )
    summary = pd.DataFrame(rows, columns=columns)
    return summary.sort_values(["norm", "seed"], key=_norm_order_key).reset_index(drop=True)


def _number(value) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def standard_error(values: pd.Series) -> float:
    """The standard error of the mean of `values` (sample std / sqrt(n)); NaN below two."""
    values = values.dropna()
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def norm_table(study: Study) -> pd.DataFrame:
    """One row per norm (per `Study.labels`: a batch-dependence sweep's norm_batch values are
    rows of their own): parameters, then mean, std and standard error over its runs of each
    run summary."""
    summary = run_summary(study)
    rows = []
    for label in study.labels:
        runs = summary[summary["label"] == label]
        params = study.train[study.train["label"] == label]
        norm = params["norm"].iloc[0]
        row: dict[str, object] = {"norm": norm, "label": label, "runs": len(runs)}
        row["seeds"] = ",".join(str(s) for s in sorted(runs["seed"].dropna().astype(int)))
        for name in TABLE_PARAMS:
            values = [str(v) for v in dict.fromkeys(params[name].dropna())]
            row[name] = "/".join(values)
        for metric in SUMMARY_METRICS:
            values = runs[metric].dropna()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{metric}_se"] = standard_error(values)
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_table(study: Study) -> pd.DataFrame:
    """Classes x norms: test accuracy per class, mean over each norm's evaluated models."""
    if study.per_class.empty:
        return pd.DataFrame()
    table = study.per_class.pivot_table(
        index="class", columns="norm", values="accuracy", aggfunc="mean", sort=False
    )
    return table[[n for n in study.norms if n in table.columns]]


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
    (config.RECIPES); pairing by seed compares runs that started from the same initial weights
    and batch order, and pairing on the split's digest never compares runs validated on
    different images.
    """
    keys = list(study.group_by)
    summary = run_summary(study).merge(study.train[["run_id", *keys]], on="run_id")
    for key in keys:
        summary[key] = summary[key].map(param_value)
    outcomes = _training_outcomes(study, summary, keys)
    rows = []
    for norm in study.norms:
        recipe = TrainConfig(norm=norm).as_params()  # the norm's defaults (config.RECIPES)
        defaults = {key: param_value(value) for key, value in recipe.items()}
        runs = summary[summary["norm"] == norm]
        is_default = pd.Series(True, index=runs.index)
        for key in keys:
            is_default &= runs[key] == defaults.get(key, "")
        pair_keys = ["seed", "val_digest"]
        baseline = runs[is_default].set_index(pair_keys)["final_val_acc"]
        mine = outcomes[outcomes["norm"] == norm]
        default_failed = _failed_seeds(mine, keys, tuple(defaults.get(key, "") for key in keys))
        baseline_trained = runs[is_default & _trained(runs)]
        norm_rows = []
        for values, group in runs.groupby(keys, sort=True, dropna=False):
            values = values if isinstance(values, tuple) else (values,)
            is_baseline = bool(is_default.loc[group.index].all())
            gain = paired_gain(group.set_index(pair_keys)["final_val_acc"], baseline)
            seeds = set(group["seed"].dropna().astype(int))
            rescued = sorted(default_failed & seeds)
            # NaN where no seed trained under both: not behind.
            behind = (
                paired_gain(
                    group.set_index(pair_keys)["final_val_acc"],
                    baseline_trained.set_index(pair_keys)["final_val_acc"],
                ).points
                < 0
            )
            trains_where_default_does_not = (
                not is_baseline
                and bool(rescued)
                and not _failed_seeds(mine, keys, values)
                and len(seeds) >= ADOPT_MIN_SEEDS
                and not behind
            )
            norm_rows.append(
                {
                    "norm": norm,
                    **dict(zip(keys, values, strict=True)),
                    "default": is_baseline,
                    "runs": len(group),
                    "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int))),
                    "final_val_acc_mean": _mean(group["final_val_acc"]),
                    "final_val_acc_se": standard_error(group["final_val_acc"]),
                    "gain_points": math.nan if is_baseline else gain.points,
                    "gain_se_points": math.nan if is_baseline else gain.standard_error,
                    "paired_seeds": 0 if is_baseline else gain.pairs,
                    "adopt": False
                    if is_baseline
                    else gain.adopted or trains_where_default_does_not,
                    # Seeds the defaults did not train on and this lever did, where that
                    # decided the adoption.
                    "rescued_seeds": ",".join(map(str, rescued))
                    if trains_where_default_does_not and not gain.adopted
                    else "",
                    "final_test_acc_mean": _mean(group["final_test_acc"]),
                    "final_test_acc_se": standard_error(group["final_test_acc"]),
                }
            )
        # Ranked on validation; rows without it (runs from before the split) come last.
        norm_rows.sort(
            key=lambda row: (math.isnan(row["final_val_acc_mean"]), -row["final_val_acc_mean"])
        )
        rows.extend(norm_rows)
    return pd.DataFrame(rows)


def _training_outcomes(study: Study, summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """norm, seed, the group_by values and `trained` for every train run: False where it
    diverged (no final accuracy) or ended at chance."""
    finished = summary[["norm", "seed", *keys]].assign(trained=_trained(summary).to_numpy())
    if study.diverged.empty:
        return finished
    diverged = study.diverged[["norm", "seed", *keys]].assign(trained=False)
    for key in keys:
        diverged[key] = diverged[key].map(param_value)
    return pd.concat([finished, diverged], ignore_index=True)


def _trained(summary: pd.DataFrame) -> pd.Series:
    """Per finished run: its final training accuracy is at least AT_CHANCE (it trained)."""
    return summary["final_train_acc"] >= AT_CHANCE


def _failed_seeds(outcomes: pd.DataFrame, keys: Sequence[str], values: tuple) -> set[int]:
    """The seeds on which the runs with these group_by values did not train."""
    match = ~outcomes["trained"]
    for key, value in zip(keys, values, strict=True):
        match &= outcomes[key] == value
    return set(pd.to_numeric(outcomes.loc[match, "seed"], errors="coerce").dropna().astype(int))


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


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
    out["val acc % (mean ± SE)"] = [
        percent(m, s)
        for m, s in zip(table["final_val_acc_mean"], table["final_val_acc_se"], strict=True)
    ]
    out["val gain (points ± SE)"] = _gain_cells(
        table["gain_points"], table["gain_se_points"], table["paired_seeds"], "seed"
    )
    out["adopt?"] = [
        ""
        if d
        else (f"yes: trains where the default did not (seed {r})" if r else "yes" if a else "no")
        for d, a, r in zip(table["default"], table["adopt"], table["rescued_seeds"], strict=True)
    ]
    out["test acc % (reported, not chosen on)"] = [
        percent(m, s)
        for m, s in zip(table["final_test_acc_mean"], table["final_test_acc_se"], strict=True)
    ]
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
    out["test acc % (mean ± SE)"] = [
        percent(m, s) for m, s in zip(table["test_acc_mean"], table["test_acc_se"], strict=True)
    ]
    out["gain (points ± SE)"] = _gain_cells(
        table["gain_points"], table["gain_se_points"], table["paired_models"], "model"
    )
    return out


def markdown_table(frame: pd.DataFrame, *, index: bool = False) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    if index:
        frame = frame.reset_index()
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("|", "\\|")


def percent(mean: float, std: float = math.nan) -> str:
    """Fractions as percentages, two decimals: "82.10 ± 0.20", or "82.10" without a std."""
    return _spread(100 * mean, 100 * std, digits=2)


def _spread(mean: float, std: float = math.nan, *, digits: int = 1) -> str:
    """ "82.10 ± 0.20"; the mean alone without a std (one run); empty without a mean."""
    if math.isnan(mean):
        return ""
    text = f"{mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _norm_order_key(column: pd.Series) -> pd.Series:
    if column.name == "norm":
        order = {n: i for i, n in enumerate(NORMS)}
        return column.map(lambda n: order.get(n, len(order)))
    return column


def readable_norm_table(table: pd.DataFrame) -> pd.DataFrame:
    """norm_table with accuracies as `mean ± SE` percentages, for the Markdown report: the
    validation accuracy (what choices are made on) first, the test accuracy beside it."""
    out = table[["norm", "runs", "seeds", *TABLE_PARAMS]].copy()
    out["groups"] = [
        g if n in REGISTRY and REGISTRY[n].groups else ""
        for n, g in zip(table["norm"], out["groups"], strict=True)
    ]
    out["norm_batch"] = [
        b if n in BATCH_STATISTICS_NORMS else ""
        for n, b in zip(table["norm"], out["norm_batch"], strict=True)
    ]
    out["norm"] = table["label"]
    for label, prefix in (
        ("final val acc %", "final_val_acc"),
        ("final test acc %", "final_test_acc"),
        ("final train acc %", "final_train_acc"),
        ("train-test gap (points)", "train_test_gap"),
    ):
        out[label] = [
            percent(m, s)
            for m, s in zip(table[f"{prefix}_mean"], table[f"{prefix}_se"], strict=True)
        ]
    out["epoch s"] = [f"{s:.1f}" for s in table["epoch_seconds_mean"]]
    out["run min"] = [
        _spread(m, s)
        for m, s in zip(table["run_minutes_mean"], table["run_minutes_se"], strict=True)
    ]
    return out


# --------------------------------------------------------------------------- batch dependence


def images_per_group(norm_batch, batch_size) -> float:
    """Images a batch-statistics group holds: `norm_batch`, or the whole batch where it is 0
    or was not logged (runs from before the parameter)."""
    groups = pd.to_numeric(pd.Series([norm_batch]), errors="coerce").fillna(0).iloc[0]
    return float(groups) if groups > 0 else float(pd.to_numeric(batch_size, errors="coerce"))


def batch_dependence(study: Study) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The points of the batch-dependence figure, or None where no run took its batch
    statistics over groups (no `norm_batch` > 0).

    Returns (points, references): per norm with batch statistics, batch size and images per
    statistics group, and per norm without batch statistics (whose accuracy does not depend on
    it): runs, seeds and the final test accuracy's mean, min, max and standard error over them.
    Test accuracy after the last epoch, as in Wu & He's figure: reported, not chosen on.
    """
    summary = run_summary(study).merge(
        study.train[["run_id", "batch_size", "norm_batch"]], on="run_id"
    )
    if summary.empty:
        return None
    summary["images_per_group"] = [
        images_per_group(n, b)
        for n, b in zip(summary["norm_batch"], summary["batch_size"], strict=True)
    ]
    grouped = pd.to_numeric(summary["norm_batch"], errors="coerce").fillna(0) > 0
    if not grouped.any():
        return None
    summary["batch_size"] = pd.to_numeric(summary["batch_size"], errors="coerce")

    def aggregate(rows: pd.DataFrame) -> dict[str, object]:
        accuracy = rows["final_test_acc"].dropna()
        return {
            "runs": len(rows),
            "seeds": ",".join(str(s) for s in sorted(rows["seed"].dropna().astype(int))),
            "mean": _mean(accuracy),
            "min": float(accuracy.min()) if len(accuracy) else math.nan,
            "max": float(accuracy.max()) if len(accuracy) else math.nan,
            "se": standard_error(accuracy),
        }

    batched = summary[summary["norm"].isin(BATCH_STATISTICS_NORMS)]
    points = [
        {"norm": norm, "batch_size": int(size), "images_per_group": int(per), **aggregate(rows)}
        for (norm, size, per), rows in batched.groupby(
            ["norm", "batch_size", "images_per_group"], sort=True
        )
    ]
    others = summary[~summary["norm"].isin(BATCH_STATISTICS_NORMS)]
    references = [
        {"norm": norm, **aggregate(others[others["norm"] == norm])}
        for norm in ordered_norms(others["norm"])
    ]
    points_frame = pd.DataFrame(
        points,
        columns=["norm", "batch_size", "images_per_group", "runs", "seeds", "mean", "min", "max"]
        + ["se"],
    )
    points_frame = points_frame.sort_values(
        ["norm", "batch_size", "images_per_group"], key=_norm_order_key
    ).reset_index(drop=True)
    return points_frame, pd.DataFrame(
        references, columns=["norm", "runs", "seeds", "mean", "min", "max", "se"]
    )


def readable_batch_dependence(points: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """One row per point of the figure, the flat references after the batch-statistics norm."""

    def row(entry, images_per_group: str, batch_size: str) -> dict[str, object]:
        return {
            "norm": entry.norm,
            "images per statistics group": images_per_group,
            "batch size": batch_size,
            "runs": entry.runs,
            "seeds": entry.seeds,
            "final test acc % (mean ± SE)": percent(entry.mean, entry.se),
            "min-max %": f"{100 * entry.min:.2f}-{100 * entry.max:.2f}",
        }

    rows = [
        row(
            point,
            str(point.images_per_group)
            + (" (whole batch)" if point.images_per_group == point.batch_size else ""),
            str(point.batch_size),
        )
        for point in points.itertuples(index=False)
    ]
    rows += [
        row(reference, "(per image: no batch statistics)", "")
        for reference in references.itertuples(index=False)
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- findings


def divergence_notes(study: Study) -> list[str]:
    """One line per train run that diverged: stopped on a non-finite loss (FAILED, tagged
    `diverged`), or finished with a non-finite final loss; such runs are in no mean. And one
    per finished run that ended at chance (training accuracy below `AT_CHANCE`, the loss
    finite): its accuracy is a result, counted in its norm's mean, but named, as it is what
    moves the mean and the spread."""
    notes = []
    for run in study.diverged.itertuples(index=False):
        notes.append(
            f"{run.norm} diverged (loss NaN): run `{run.run_name}` (seed {run.seed}) stopped: "
            f"{run.diverged}. It is counted in no table."
        )
    finals = study.history.sort_values("epoch").groupby("run_id", sort=False).last()
    for run in study.train.itertuples(index=False):
        if run.run_id not in finals.index:
            continue
        last = finals.loc[run.run_id]
        losses = {"train": last["train_loss"], "test": last["test_loss"]}
        bad = [f"{split} loss {value}" for split, value in losses.items() if not _finite(value)]
        if bad:
            notes.append(
                f"{run.norm} diverged (loss NaN): run `{run.run_name}` (seed {run.seed}) ended "
                f"epoch {int(last['epoch'])} with {' and '.join(bad)}."
            )
        elif _finite(last["train_acc"]) and last["train_acc"] < AT_CHANCE:
            notes.append(
                f"{run.norm} did not train: run `{run.run_name}` (seed {run.seed}) ended epoch "
                f"{int(last['epoch'])} at chance, training accuracy "
                f"{percent(last['train_acc'])}% (1 in {NUM_CLASSES} is "
                f"{percent(1 / NUM_CLASSES)}%), loss {last['train_loss']:.3f}. It counts in "
                f"its norm's mean."
            )
    return notes


def _finite(value) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def findings(table: pd.DataFrame) -> list[str]:
    """Plain-language observations generated from the per-norm table. The norms are ranked on
    final validation accuracy (on test only where no run held a validation split out)."""
    table = table[table["runs"] > 0]
    if table.empty:
        return ["No finished train runs with logged epochs were found."]
    on_val = bool(table["final_val_acc_mean"].notna().all())
    key, split = ("final_val_acc", "validation") if on_val else ("final_test_acc", "test")
    ranked = table.sort_values(f"{key}_mean", ascending=False).reset_index(drop=True)
    notes = []
    if not on_val:
        notes.append(
            "These runs held no validation split out (val_size 0, or logged before it "
            "existed): they are ranked on the test split, which then chose."
        )

    def both(row, *, inside: bool = False) -> str:
        """ "80.79% (test 82.20%)", or within parentheses "80.79%, test 82.20%"."""
        if not on_val:
            return f"{percent(row['final_test_acc_mean'])}%"
        test = f"test {percent(row['final_test_acc_mean'])}%"
        val = f"{percent(row['final_val_acc_mean'])}%"
        return f"{val}, {test}" if inside else f"{val} ({test})"

    def bold(row) -> str:
        """ "**batch** norm", or "**batch** norm (norm_batch 8)" for a row of its own."""
        return f"**{row['norm']}** norm{row['label'].removeprefix(row['norm'])}"

    leader = ranked.iloc[0]
    if len(ranked) == 1:
        notes.append(
            f"Only {bold(leader)} was run ({both(leader, inside=True)} final {split} "
            "accuracy); there is nothing to compare it with."
        )
    else:
        runner = ranked.iloc[1]
        margin = 100 * (leader[f"{key}_mean"] - runner[f"{key}_mean"])
        notes.append(
            f"{bold(leader)} leads on final {split} accuracy with {both(leader)}, "
            f"{margin:.2f} points ahead of {runner['label']} ({both(runner, inside=True)})"
            + (
                f"; {ranked.iloc[-1]['label']} is last ({both(ranked.iloc[-1], inside=True)})."
                if len(ranked) > 2
                else "."
            )
        )
        errors = [leader[f"{key}_se"], runner[f"{key}_se"]]
        if any(math.isnan(e) for e in errors):
            notes.append(
                "With one seed per norm the seed-to-seed spread is unknown, so this margin is "
                "not yet evidence of a real difference; rerun with `-P seeds=3`."
            )
        else:
            error = 100 * math.hypot(*errors)  # of the difference of two independent means
            if margin > ADOPT_STANDARD_ERRORS * error:
                verdict = "more than twice its standard error, so the lead is unlikely to be noise"
            elif margin > error:
                verdict = "larger than its standard error but less than twice it: a weak lead"
            else:
                verdict = "within its standard error: the two are not distinguishable"
            notes.append(
                f"The margin of {margin:.2f} points is {verdict} "
                f"(standard error of the difference: {error:.2f} points)."
            )
    for row in ranked.itertuples(index=False):
        gap = 100 * row.train_test_gap_mean
        train = 100 * row.final_train_acc_mean
        if train < UNDERFIT_TRAIN_ACC:
            notes.append(
                f"{row.label}: final train accuracy is only {train:.2f}% (gap {gap:+.2f} points), "
                "a sign of under-fitting: more epochs or a different learning rate may help."
            )
        elif gap > OVERFIT_GAP_POINTS:
            notes.append(
                f"{row.label}: train accuracy exceeds test accuracy by {gap:.2f} points, a sign "
                "of over-fitting (more regularisation or augmentation may help)."
            )
        else:
            notes.append(f"{row.label}: train-test gap {gap:+.2f} points, no sign of over-fitting.")
        drop = 100 * (row.best_val_acc_mean - row.final_val_acc_mean)
        if drop > PEAK_DROP_POINTS:
            notes.append(
                f"{row.label}: validation accuracy peaked {drop:.2f} points above its final "
                "value before the last epoch (the tables report the final epoch)."
            )
    return notes
