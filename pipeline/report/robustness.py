"""Robustness and calibration side by side (no MLflow here): the evaluate runs that evaluated a
CIFAR-10-C suite, per norm and batch-norm statistics, as a table, two figures and findings.

Each evaluation is a row of `robustness_runs`, named by `row_label` from its norm and its
`statistics_group` column (the training's, and `test-batch stats` for bn_stats=test-batch), so
batch norm's test-batch evaluations are a row of their own, never pooled with its running ones.
The relative corruption error follows Hendrycks & Dietterich's mCE, relative to batch norm with
running statistics instead of AlexNet: per corruption, a model's error summed over the five
severities divided by that of batch norm's model of the same seed, then averaged over the
corruptions (1 = as robust as batch norm, below 1 = more robust).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from pipeline.corruptions import SEVERITIES
from pipeline.plots import reliability_figure, severity_figure
from pipeline.report.frame import CELL_PREFIX, Study, ordered_norms, row_label
from pipeline.report.levers import ADOPT_MIN_SEEDS, ADOPT_STANDARD_ERRORS, paired_gain
from pipeline.report.tables import (
    markdown_table,
    mean_of,
    percent,
    percent_column,
    spread,
    standard_error,
)

BASELINE_NORM = "batch"  # the reference of the relative corruption error
TEST_BATCH_GROUP = "test-batch stats"
SUMMARIZED = (
    "test_acc",
    "corruption_acc",
    "relative_corruption_error",
    "corruption_ece",
    "test_ece",
    "test_ece_calibrated",
    "temperature",
)


def robustness_runs(study: Study) -> pd.DataFrame:
    """One row per evaluate run with a corruption suite: its evaluated columns, then
    statistics_group, label and relative_corruption_error; empty where none has a suite."""
    evaluated = study.evaluated
    if "corruption_acc" not in evaluated or not evaluated["corruption_acc"].notna().any():
        return pd.DataFrame()
    rows = evaluated[evaluated["corruption_acc"].notna()].copy()
    trained = study.train.set_index("run_id")["statistics_group"] if len(study.train) else {}
    training_group = rows["source_run_id"].map(trained).fillna("")
    rows["statistics_group"] = [
        ", ".join(part for part in (group, TEST_BATCH_GROUP if bn == "test-batch" else "") if part)
        for group, bn in zip(training_group, rows["bn_stats"], strict=True)
    ]
    rows["label"] = [
        row_label(norm, group)
        for norm, group in zip(rows["norm"], rows["statistics_group"], strict=True)
    ]
    rows["relative_corruption_error"] = _relative_errors(rows)
    order = {norm: index for index, norm in enumerate(ordered_norms(rows["norm"]))}
    rows = rows.assign(_norm=rows["norm"].map(order), _group=rows["statistics_group"] != "")
    rows = rows.sort_values(["_norm", "_group", "statistics_group", "seed"], kind="stable")
    return rows.drop(columns=["_norm", "_group"]).reset_index(drop=True)


def _corruption_errors(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run (index) and corruption (column): the error summed over the severities."""
    cells = [c for c in rows.columns if c.startswith(CELL_PREFIX)]
    errors = {}
    for column in cells:
        corruption = column[len(CELL_PREFIX) :].rsplit("/", 1)[0]
        errors[corruption] = errors.get(corruption, 0) + (1 - rows[column])
    return pd.DataFrame(errors, index=rows.index)


def _relative_errors(rows: pd.DataFrame) -> list[float]:
    """Each run's relative corruption error against batch norm's running-statistics model of
    the same seed (the mean where it was evaluated more than once); NaN without one."""
    errors = _corruption_errors(rows)
    is_baseline = (rows["norm"] == BASELINE_NORM) & (rows["statistics_group"] == "")
    baseline = errors[is_baseline].groupby(rows.loc[is_baseline, "seed"]).mean()
    relative = []
    for index, seed in rows["seed"].items():
        if pd.isna(seed) or seed not in baseline.index:
            relative.append(math.nan)
            continue
        ratios = errors.loc[index] / baseline.loc[seed]
        relative.append(mean_of(ratios.replace([math.inf, -math.inf], math.nan)))
    return relative


def robustness_table(study: Study) -> pd.DataFrame:
    """One row per label (norm, and batch norm's test-batch statistics apart): models, seeds,
    and the mean and standard error over its models of each of SUMMARIZED."""
    runs = robustness_runs(study)
    if runs.empty:
        return pd.DataFrame()
    rows = []
    for label, group in runs.groupby("label", sort=False):
        row: dict[str, object] = {
            "norm": group["norm"].iloc[0],
            "label": label,
            "statistics_group": group["statistics_group"].iloc[0],
            "bn_stats": group["bn_stats"].iloc[0],
            "models": len(group),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int))),
        }
        for metric in SUMMARIZED:
            values = group[metric] if metric in group else pd.Series(dtype=float)
            row[f"{metric}_mean"] = mean_of(values)
            row[f"{metric}_se"] = standard_error(values)
        rows.append(row)
    return pd.DataFrame(rows)


def readable_robustness_table(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"norm": table["label"], "models": table["models"]})
    out["seeds"] = table["seeds"]
    for title, metric in (
        ("clean acc %", "test_acc"),
        ("corruption acc %", "corruption_acc"),
        ("ECE % (clean)", "test_ece"),
        ("ECE % after temperature", "test_ece_calibrated"),
        ("ECE % (corrupted)", "corruption_ece"),
    ):
        out[title] = percent_column(table, metric)
    out["relative corruption error"] = [
        spread(m, s, digits=3)
        for m, s in zip(
            table["relative_corruption_error_mean"],
            table["relative_corruption_error_se"],
            strict=True,
        )
    ]
    out["temperature"] = [spread(m, digits=2) for m in table["temperature_mean"]]
    return out


def severity_points(runs: pd.DataFrame) -> pd.DataFrame:
    """label, severity (0: clean), mean, min, max over a label's models of the accuracy at
    that severity (each model's: the mean over its corruptions)."""
    rows = []
    for label, group in runs.groupby("label", sort=False):
        columns = {0: ["test_acc"]}
        for severity in SEVERITIES:
            suffix = f"/{severity}"
            columns[severity] = [
                c for c in group.columns if c.startswith(CELL_PREFIX) and c.endswith(suffix)
            ]
        for severity, names in columns.items():
            per_model = group[names].mean(axis=1) if names else pd.Series(dtype=float)
            if per_model.notna().any():
                rows.append(
                    {
                        "label": label,
                        "severity": severity,
                        "mean": per_model.mean(),
                        "min": per_model.min(),
                        "max": per_model.max(),
                    }
                )
    return pd.DataFrame(rows, columns=["label", "severity", "mean", "min", "max"])


def _by(runs: pd.DataFrame, metric: str, key: str) -> pd.Series:
    """`metric` per `key` (seed, or source_run_id): the mean of a key's evaluations."""
    rows = runs.dropna(subset=[key])
    return rows.groupby(key)[metric].mean() if metric in rows else pd.Series(dtype=float)


def _gain_text(gain, *, noun: str) -> str:
    error = "" if math.isnan(gain.standard_error) else f" ± {gain.standard_error:.2f}"
    return f"{gain.points:+.2f}{error} points over {gain.pairs} {noun}{'s' * (gain.pairs != 1)}"


def robustness_findings(study: Study) -> list[str]:
    """Which norm degrades least under corruption, whether the differences pass the adoption
    rule, what test-batch statistics change for batch norm, and what the temperature does."""
    runs = robustness_runs(study)
    table = robustness_table(study)
    if table.empty:
        return []
    notes = []
    running = table[table["bn_stats"] == "running"]
    if len(running):
        drop = running["test_acc_mean"] - running["corruption_acc_mean"]
        best = running.loc[drop.idxmin()]
        notes.append(
            f"{row_label(best['norm'], best['statistics_group'], name='**{norm}** norm')} "
            f"degrades least under corruption: {percent(best['test_acc_mean'])}% clean, "
            f"{percent(best['corruption_acc_mean'])}% over the corruptions "
            f"({100 * drop[best.name]:.2f} points lost; relative corruption error "
            f"{spread(best['relative_corruption_error_mean'], digits=3) or 'n/a'})."
        )
    notes += _against_batch_notes(runs)
    notes += _test_batch_notes(runs)
    before, after = mean_of(runs["test_ece"]), mean_of(runs["test_ece_calibrated"])
    if not math.isnan(before) and not math.isnan(after):
        notes.append(
            f"The temperature fitted on each model's validation split takes the clean test "
            f"ECE from {percent(before)}% to {percent(after)}% on average over the "
            f"{len(runs)} evaluations (Guo et al., 2017)."
        )
    return notes


def _against_batch_notes(runs: pd.DataFrame) -> list[str]:
    """Each other norm's corruption accuracy against batch norm's, paired by seed, judged by
    the adoption rule."""
    plain = runs[runs["statistics_group"] == ""]
    baseline = _by(plain[plain["norm"] == BASELINE_NORM], "corruption_acc", "seed")
    notes = []
    for label, group in plain[plain["norm"] != BASELINE_NORM].groupby("label", sort=False):
        gain = paired_gain(_by(group, "corruption_acc", "seed"), baseline)
        if gain.pairs == 0:
            continue
        verdict = "passes" if gain.adopted else "does not pass"
        notes.append(
            f"{label} against {BASELINE_NORM} norm on corruption accuracy, paired by seed: "
            f"{_gain_text(gain, noun='seed')}; {verdict} the adoption rule (a gain over "
            f"{ADOPT_STANDARD_ERRORS:g} standard errors over {ADOPT_MIN_SEEDS} or more seeds)."
        )
    return notes


def _test_batch_notes(runs: pd.DataFrame) -> list[str]:
    """What test-batch statistics change, on the same models evaluated both ways."""
    notes = []
    tested = runs[runs["bn_stats"] == "test-batch"]
    for norm in ordered_norms(tested["norm"]):
        mine = tested[tested["norm"] == norm]
        theirs = runs[(runs["norm"] == norm) & (runs["bn_stats"] == "running")]
        changes = []
        for metric, name in (
            ("corruption_acc", "corruption accuracy"),
            ("test_acc", "clean accuracy"),
            ("test_ece", "clean ECE"),
        ):
            gain = paired_gain(
                _by(mine, metric, "source_run_id"), _by(theirs, metric, "source_run_id")
            )
            if gain.pairs:
                changes.append(f"{name} {_gain_text(gain, noun='model')}")
        if changes:
            notes.append(
                f"Test-batch statistics for {norm} norm (each batch norm layer normalizing "
                f"with the test batch's statistics, the same models as with running ones): "
                + "; ".join(changes)
                + " (Schneider et al., 2020; Nado et al., 2020)."
            )
    return notes


def _pooled_diagram(payloads: list[dict], key: str) -> dict | None:
    """One reliability diagram from several models' (`key`: reliability or
    reliability_calibrated): counts summed, confidence and accuracy weighted by them."""
    diagrams = [p[key] for p in payloads if isinstance(p.get(key), dict)]
    if not diagrams:
        return None
    counts = pd.DataFrame([d["count"] for d in diagrams]).fillna(0)
    total = counts.sum()
    safe = total.where(total > 0, 1)
    pooled = {"edges": diagrams[0]["edges"], "count": total.astype(int).tolist()}
    for name in ("confidence", "accuracy"):
        values = pd.DataFrame([d[name] for d in diagrams]).fillna(0)
        pooled[name] = ((values * counts).sum() / safe).tolist()
    return pooled


def robustness_section(study: Study, directory: Path) -> list[str]:
    """The report's section: robustness.csv, the table, the two figures and the findings;
    nothing where no evaluation has a corruption suite."""
    runs = robustness_runs(study)
    if runs.empty:
        return []
    table = robustness_table(study)
    table.to_csv(directory / "robustness.csv", index=False)
    lines = dict(zip(table["label"], table["norm"], strict=True))
    _save(severity_figure(severity_points(runs), lines), directory / "plots" / "severity.png")
    panels = {}
    for label, group in runs.groupby("label", sort=False):
        payloads = [study.reliability[r] for r in group["run_id"] if r in study.reliability]
        before = _pooled_diagram(payloads, "reliability")
        if before is not None:
            panels[label] = (before, _pooled_diagram(payloads, "reliability_calibrated"))
    figures = ["![accuracy against corruption severity per norm](plots/severity.png)", ""]
    if panels:
        _save(reliability_figure(panels), directory / "plots" / "reliability.png")
        figures += ["![reliability diagrams per norm](plots/reliability.png)", ""]
    return [
        "## Robustness to corruptions and calibration",
        "",
        markdown_table(readable_robustness_table(table)),
        "",
        "From the evaluate runs with a CIFAR-10-C suite, mean ± standard error over the "
        "models. *Corruption acc*: over the 15 corruptions x 5 severities (without test-time "
        "augmentation unless `corruption_tta` says). *Relative corruption error*: per "
        "corruption the error summed over the severities divided by batch norm's (running "
        "statistics, same seed), averaged over the corruptions, as Hendrycks & Dietterich's "
        "mCE is relative to AlexNet; below 1 is more robust than batch norm. *ECE*: expected "
        "calibration error (15 bins) on the clean test split, then after the temperature "
        f"fitted on the training run's validation split. *{TEST_BATCH_GROUP}*: batch norm "
        "normalizing with each test batch's statistics (`bn_stats=test-batch`), a row apart. "
        "On the test split: reported, not chosen on. Machine-readable: "
        "[robustness.csv](robustness.csv).",
        "",
        *figures,
        *[f"- {note}" for note in robustness_findings(study)],
        "",
    ]


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
