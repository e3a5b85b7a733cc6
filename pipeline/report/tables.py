"""The study's tables (per run, per norm, per class, per lever, per tta) and the findings
drawn from them, as pandas DataFrames and Markdown (no MLflow here).

Accuracies are fractions as logged (CSV) and percentages in the Markdown. The headline number is
the test accuracy after the last epoch, mean ± std over seeds; the best epoch is picked on the
test set and is shown for reference only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from pipeline.config import NORMS, TTA_MODES, TrainConfig
from pipeline.report.frame import TABLE_PARAMS, Study, ordered_norms

# A final train accuracy this far above test accuracy (percentage points) is called over-fitting.
OVERFIT_GAP_POINTS = 5.0
# A final train accuracy below this (percent) is called under-fitting.
UNDERFIT_TRAIN_ACC = 60.0
# Test accuracy peaking this far (points) above its final value is mentioned.
PEAK_DROP_POINTS = 1.0


def run_summary(study: Study) -> pd.DataFrame:
    """One row per train run: final and best test accuracy, final train accuracy, the gap."""
    columns = [
        "run_id",
        "run_name",
        "norm",
        "seed",
        "epochs_logged",
        "final_test_acc",
        "best_test_acc",
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
        rows.append(
            {
                "run_id": run.run_id,
                "run_name": run.run_name,
                "norm": run.norm,
                "seed": run.seed,
                "epochs_logged": int(last["epoch"]),
                "final_test_acc": float(last["test_acc"]),
                "best_test_acc": float(history["test_acc"].max()),
                "final_train_acc": float(last["train_acc"]),
                "train_test_gap": float(last["train_acc"] - last["test_acc"]),
                "final_test_loss": float(last["test_loss"]),
                "epoch_seconds": float(history["epoch_seconds"].mean()),
                "run_minutes": float(run.run_minutes),
            }
        )
    summary = pd.DataFrame(rows, columns=columns)
    return summary.sort_values(["norm", "seed"], key=_norm_order_key).reset_index(drop=True)


def norm_table(study: Study) -> pd.DataFrame:
    """One row per norm: parameters, then mean and std over seeds of each run summary."""
    summary = run_summary(study)
    rows = []
    for norm in study.norms:
        runs = summary[summary["norm"] == norm]
        params = study.train[study.train["norm"] == norm]
        row: dict[str, object] = {"norm": norm, "runs": len(runs)}
        row["seeds"] = ",".join(str(s) for s in sorted(runs["seed"].dropna().astype(int)))
        for name in TABLE_PARAMS:
            values = [str(v) for v in dict.fromkeys(params[name].dropna())]
            row[name] = "/".join(values)
        for metric in (
            "final_test_acc",
            "best_test_acc",
            "final_train_acc",
            "train_test_gap",
            "epoch_seconds",
            "run_minutes",
        ):
            values = runs[metric]
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
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


def lever_table(study: Study) -> pd.DataFrame:
    """One row per norm and combination of `study.group_by` values: final test accuracy over
    seeds, and the mean gain over that norm's default-recipe runs on the seeds both have.

    The default recipe is the row whose group_by values are the norm's `TrainConfig` defaults
    (config.RECIPES); pairing by seed compares runs that started from the same initial weights
    and batch order.
    """
    keys = list(study.group_by)
    summary = run_summary(study).merge(study.train[["run_id", *keys]], on="run_id")
    for key in keys:
        summary[key] = summary[key].map(param_value)
    rows = []
    for norm in study.norms:
        recipe = TrainConfig(norm=norm).as_params()  # the norm's defaults (config.RECIPES)
        defaults = {key: param_value(value) for key, value in recipe.items()}
        runs = summary[summary["norm"] == norm]
        is_default = pd.Series(True, index=runs.index)
        for key in keys:
            is_default &= runs[key] == defaults.get(key, "")
        baseline = runs[is_default].set_index("seed")["final_test_acc"]
        groups = [
            (bool(is_default.loc[group.index].all()), values, group)
            for values, group in runs.groupby(keys, sort=True, dropna=False)
        ]
        groups.sort(key=lambda item: not item[0])  # the default recipe first
        for is_baseline, values, group in groups:
            values = values if isinstance(values, tuple) else (values,)
            gain, paired = _paired_gain(group.set_index("seed")["final_test_acc"], baseline)
            accuracy = group["final_test_acc"]
            rows.append(
                {
                    "norm": norm,
                    **dict(zip(keys, values, strict=True)),
                    "default": is_baseline,
                    "runs": len(group),
                    "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int))),
                    "final_test_acc_mean": float(accuracy.mean()),
                    "final_test_acc_std": float(accuracy.std(ddof=1))
                    if len(group) > 1
                    else math.nan,
                    "gain_points": math.nan if is_baseline else gain,
                    "paired_seeds": 0 if is_baseline else paired,
                }
            )
    return pd.DataFrame(rows)


def _paired_gain(mine: pd.Series, baseline: pd.Series) -> tuple[float, int]:
    """Mean of `mine - baseline` in points over the index labels both have (seeds, models),
    and how many there are; NaN when they share none."""
    shared = sorted(set(mine.index) & set(baseline.index))
    if not shared:
        return math.nan, 0
    return float(100 * (mine[shared] - baseline[shared]).mean()), len(shared)


def _gain_cells(gains: pd.Series, counts: pd.Series, noun: str) -> list[str]:
    """ "+1.50 (2 seeds)" per row; empty where there is no gain."""
    return [
        "" if math.isnan(g) else f"{g:+.2f} ({n} {noun}{'s' * (n != 1)})"
        for g, n in zip(gains, counts, strict=True)
    ]


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
    out["final test acc %"] = [
        percent(m, s)
        for m, s in zip(table["final_test_acc_mean"], table["final_test_acc_std"], strict=True)
    ]
    out["gain (points)"] = _gain_cells(table["gain_points"], table["paired_seeds"], "seed")
    return out


def tta_table(study: Study) -> pd.DataFrame:
    """Evaluate runs per norm and test-time augmentation: test accuracy over the evaluated
    models, and the mean gain over `TrainConfig`'s default tta on the models evaluated both ways.
    """
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
            gain, paired = _paired_gain(mine, baseline)
            rows.append(
                {
                    "norm": norm,
                    "tta": tta,
                    "models": int(group["source_run_id"].nunique()),
                    "test_acc_mean": float(mine.mean()),
                    "test_acc_std": float(mine.std(ddof=1)) if len(mine) > 1 else math.nan,
                    "gain_points": math.nan if tta == default else gain,
                    "paired_models": 0 if tta == default else paired,
                }
            )
    return pd.DataFrame(rows)


def readable_tta_table(table: pd.DataFrame) -> pd.DataFrame:
    out = table[["norm", "tta", "models"]].copy()
    out["test acc %"] = [
        percent(m, s) for m, s in zip(table["test_acc_mean"], table["test_acc_std"], strict=True)
    ]
    out["gain (points)"] = _gain_cells(table["gain_points"], table["paired_models"], "model")
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
    """norm_table with accuracies as `mean ± std` percentages, for the Markdown report."""
    out = table[["norm", "runs", "seeds", *TABLE_PARAMS]].copy()
    out["groups"] = [
        g if n == "group" else "" for n, g in zip(out["norm"], out["groups"], strict=True)
    ]
    for label, prefix in (
        ("final test acc %", "final_test_acc"),
        ("best test acc %", "best_test_acc"),
        ("final train acc %", "final_train_acc"),
        ("train-test gap (points)", "train_test_gap"),
    ):
        out[label] = [
            percent(m, s)
            for m, s in zip(table[f"{prefix}_mean"], table[f"{prefix}_std"], strict=True)
        ]
    out["epoch s"] = [f"{s:.1f}" for s in table["epoch_seconds_mean"]]
    out["run min"] = [
        _spread(m, s)
        for m, s in zip(table["run_minutes_mean"], table["run_minutes_std"], strict=True)
    ]
    return out


# --------------------------------------------------------------------------- findings


def findings(table: pd.DataFrame) -> list[str]:
    """Plain-language observations generated from the per-norm table."""
    table = table[table["runs"] > 0]
    if table.empty:
        return ["No finished train runs with logged epochs were found."]
    ranked = table.sort_values("final_test_acc_mean", ascending=False).reset_index(drop=True)
    notes = []
    leader = ranked.iloc[0]
    if len(ranked) == 1:
        notes.append(
            f"Only **{leader['norm']}** norm was run "
            f"({percent(leader['final_test_acc_mean'])}% final test accuracy); "
            "there is nothing to compare it with."
        )
    else:
        runner = ranked.iloc[1]
        margin = 100 * (leader["final_test_acc_mean"] - runner["final_test_acc_mean"])
        notes.append(
            f"**{leader['norm']}** norm leads on final test accuracy with "
            f"{percent(leader['final_test_acc_mean'])}%, {margin:.2f} points ahead of "
            f"{runner['norm']} ({percent(runner['final_test_acc_mean'])}%)"
            + (
                f"; {ranked.iloc[-1]['norm']} is last "
                f"({percent(ranked.iloc[-1]['final_test_acc_mean'])}%)."
                if len(ranked) > 2
                else "."
            )
        )
        spreads = [s for s in (leader["final_test_acc_std"], runner["final_test_acc_std"])]
        if any(math.isnan(s) for s in spreads):
            notes.append(
                "With one seed per norm the seed-to-seed spread is unknown, so this margin is "
                "not yet evidence of a real difference; rerun with `-P seeds=3`."
            )
        else:
            spread = 100 * max(spreads)
            if margin > 2 * spread:
                verdict = "more than twice the seed spread, so the lead is unlikely to be noise"
            elif margin > spread:
                verdict = "larger than the seed spread but less than twice it: a weak lead"
            else:
                verdict = "within the seed spread: the two are not distinguishable"
            notes.append(
                f"The margin of {margin:.2f} points is {verdict} "
                f"(largest std over seeds: {spread:.2f} points)."
            )
    for row in ranked.itertuples(index=False):
        gap = 100 * row.train_test_gap_mean
        train = 100 * row.final_train_acc_mean
        if train < UNDERFIT_TRAIN_ACC:
            notes.append(
                f"{row.norm}: final train accuracy is only {train:.2f}% (gap {gap:+.2f} points), "
                "a sign of under-fitting: more epochs or a different learning rate may help."
            )
        elif gap > OVERFIT_GAP_POINTS:
            notes.append(
                f"{row.norm}: train accuracy exceeds test accuracy by {gap:.2f} points, a sign "
                "of over-fitting (more regularisation or augmentation may help)."
            )
        else:
            notes.append(f"{row.norm}: train-test gap {gap:+.2f} points, no sign of over-fitting.")
        drop = 100 * (row.best_test_acc_mean - row.final_test_acc_mean)
        if drop > PEAK_DROP_POINTS:
            notes.append(
                f"{row.norm}: test accuracy peaked {drop:.2f} points above its final value "
                "before the last epoch (the table reports the final epoch)."
            )
    return notes
