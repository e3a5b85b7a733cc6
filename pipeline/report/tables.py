"""The study's tables per run, per norm and per class, and the batch-size dependence, as pandas
DataFrames and Markdown, with the formatting the report's tables share (no MLflow here).
report.levers holds the lever and tta tables, report.findings what is said about them.

Accuracies are fractions as logged (CSV) and percentages in the Markdown. Three splits, three
jobs: every choice the tables make (the lever table's ranking and its `adopt?`, the findings'
leader) is made on the validation accuracy after the last epoch; the test accuracy after the
last epoch is reported beside it, never chosen on. Means are shown with their standard error
over the n runs (`mean ± SE`).
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.config import BATCH_STATISTICS_NORMS, NORMS
from pipeline.norms import REGISTRY
from pipeline.report.frame import TABLE_PARAMS, Study, ordered_norms

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
    """One row per norm (per `Study.lines`: a batch-dependence sweep's norm_batch values are
    rows of their own, named by `label` and `statistics_group`): parameters, then mean, std and
    standard error over its runs of each run summary."""
    summary = run_summary(study)
    rows = []
    for line in study.lines.itertuples(index=False):
        runs = summary[summary["label"] == line.label]
        params = study.train[study.train["label"] == line.label]
        row: dict[str, object] = {
            "norm": line.norm,
            "label": line.label,
            "statistics_group": line.statistics_group,
            "runs": len(runs),
        }
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


def mean_of(values: pd.Series) -> float:
    """The mean of the values present; NaN where there are none."""
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


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
    return spread(100 * mean, 100 * std, digits=2)


def percent_column(table: pd.DataFrame, metric: str) -> list[str]:
    """`percent(mean, SE)` of each row, from the table's `<metric>_mean` and `<metric>_se`."""
    means, errors = table[f"{metric}_mean"], table[f"{metric}_se"]
    return [percent(m, s) for m, s in zip(means, errors, strict=True)]


def spread(mean: float, std: float = math.nan, *, digits: int = 1) -> str:
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
        out[label] = percent_column(table, prefix)
    out["epoch s"] = [f"{s:.1f}" for s in table["epoch_seconds_mean"]]
    out["run min"] = [
        spread(m, s)
        for m, s in zip(table["run_minutes_mean"], table["run_minutes_se"], strict=True)
    ]
    return out


# --------------------------------------------------------------------------- batch dependence


def images_per_group(norm_batch: int, batch_size) -> float:
    """Images a batch-statistics group holds: `norm_batch`, or the whole batch where it is 0
    (the study frame's `norm_batch`: runs from before the parameter are 0 too)."""
    return (
        float(norm_batch) if norm_batch > 0 else float(pd.to_numeric(batch_size, errors="coerce"))
    )


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
    if not (summary["norm_batch"] > 0).any():
        return None
    summary["batch_size"] = pd.to_numeric(summary["batch_size"], errors="coerce")

    def aggregate(rows: pd.DataFrame) -> dict[str, object]:
        accuracy = rows["final_test_acc"].dropna()
        return {
            "runs": len(rows),
            "seeds": ",".join(str(s) for s in sorted(rows["seed"].dropna().astype(int))),
            "mean": mean_of(accuracy),
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
