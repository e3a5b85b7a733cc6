"""Runs -> pandas DataFrames -> a side-by-side report of the norms (no MLflow here).

cli.compare fetches the runs, metric histories and artifacts through tracking.py and hands them
to `build_study`; `write_report` writes report.md, CSV tables and figures into one directory whose
relative links render from the MLflow artifact view.

Accuracies are fractions as logged (CSV) and percentages in the Markdown. The headline number is
the test accuracy after the last epoch, mean ± std over seeds; the best epoch is picked on the
test set and is shown for reference only.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.config import NORMS, TTA_BEFORE_PARAM, TTA_MODES, TrainConfig  # noqa: E402
from pipeline.engine import EpochMetrics  # noqa: E402
from pipeline.plots import whole_epochs  # noqa: E402

# Parameters shown per norm; a value that differs between a norm's runs is shown as "a/b".
TABLE_PARAMS = (
    "num_params",
    "groups",
    "epochs",
    "batch_size",
    "learning_rate",
    "momentum",
    "weight_decay",
    "dropout",
    "label_smoothing",
    "warmup_epochs",
)
# A final train accuracy this far above test accuracy (percentage points) is called over-fitting.
OVERFIT_GAP_POINTS = 5.0
# A final train accuracy below this (percent) is called under-fitting.
UNDERFIT_TRAIN_ACC = 60.0
# Test accuracy peaking this far (points) above its final value is mentioned.
PEAK_DROP_POINTS = 1.0

NORM_COLORS = {"batch": "tab:blue", "group": "tab:orange", "layer": "tab:green"}


@dataclass(frozen=True)
class Study:
    """A study's runs as tables: one row per train run, per epoch, and per evaluated class."""

    train: pd.DataFrame  # run_id, run_name, norm, seed, TABLE_PARAMS...
    history: pd.DataFrame  # run_id, norm, seed, epoch, train_loss, ..., epoch_seconds
    per_class: pd.DataFrame  # run_id, norm, seed, class, accuracy (from evaluation.json)
    misclassified: dict[str, Path]  # norm -> plots/misclassified.png of its first seed
    source: str  # what was compared, for the report's first line
    # Train-run params whose values split each norm's runs into the rows of the lever table.
    group_by: tuple[str, ...] = ()
    # One row per evaluate run: run_id, norm, seed, source_run_id, tta, test_acc.
    evaluated: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    @property
    def norms(self) -> list[str]:
        return ordered_norms(self.train["norm"])


def ordered_norms(names) -> list[str]:
    """The distinct norms in `names`: batch, group, layer first, anything else after, sorted."""
    present = set(names)
    return [n for n in NORMS if n in present] + sorted(present - set(NORMS))


def build_study(
    runs: pd.DataFrame,
    histories: Mapping[str, Sequence[EpochMetrics]],
    *,
    evaluations: Mapping[str, dict] | None = None,
    misclassified: Mapping[str, Path] | None = None,
    source: str = "",
    group_by: Sequence[str] = (),
) -> Study:
    """Assemble a Study from `mlflow.search_runs` rows, each train run's epoch records, the
    evaluate runs' evaluation.json payloads and the train runs' misclassified grids (by run id).
    """
    group_by = tuple(group_by)
    runs = runs.reset_index(drop=True)  # rows are looked up by index below
    train = train_runs(runs, extra_params=group_by)
    rows = []
    for run in train.itertuples(index=False):
        for record in histories.get(run.run_id, ()):
            rows.append({"run_id": run.run_id, "norm": run.norm, "seed": run.seed, **vars(record)})
    fields = [field.name for field in dataclasses.fields(EpochMetrics)]
    history = pd.DataFrame(rows, columns=["run_id", "norm", "seed", *fields])

    evaluate = step_runs(runs, "evaluate")
    evaluated = evaluate.copy()
    for column, key in (
        ("source_run_id", "tags.source_run_id"),
        ("test_acc", "metrics.test_acc"),
    ):
        evaluated[column] = _column(runs.loc[evaluate.index], key).map(_unquote)
    evaluated["tta"] = _logged_tta(runs.loc[evaluate.index])
    evaluated["test_acc"] = pd.to_numeric(evaluated["test_acc"], errors="coerce")

    per_class_rows = []
    for run in _one_evaluation_per_model(evaluated, runs).itertuples(index=False):
        payload = (evaluations or {}).get(run.run_id)
        if not payload:
            continue
        for name, accuracy in payload.get("per_class_accuracy", {}).items():
            per_class_rows.append(
                {
                    "run_id": run.run_id,
                    "norm": run.norm,
                    "seed": run.seed,
                    "class": name,
                    "accuracy": float(accuracy),
                }
            )
    per_class = pd.DataFrame(
        per_class_rows, columns=["run_id", "norm", "seed", "class", "accuracy"]
    )

    grids: dict[str, Path] = {}
    for run in train.sort_values(["norm", "seed"]).itertuples(index=False):
        path = (misclassified or {}).get(run.run_id)
        if path is not None and run.norm not in grids:
            grids[run.norm] = Path(path)
    return Study(
        train=train,
        history=history,
        per_class=per_class,
        misclassified=grids,
        source=source,
        group_by=group_by,
        evaluated=evaluated.reset_index(drop=True),
    )


def _logged_tta(runs: pd.DataFrame) -> pd.Series:
    """The `tta` param of each run; runs from before the param existed evaluated with flip."""
    return _column(runs, "params.tta").map(_unquote).fillna(TTA_BEFORE_PARAM)


def _one_evaluation_per_model(evaluated: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One evaluate run per model: the one that used the test-time augmentation its training
    run evaluated with (what `evaluate` does by default), else the first. A model evaluated
    several ways (for the TTA table) thus counts once, as its training saw it, per class."""
    trained_tta = pd.Series(_logged_tta(runs).to_numpy(), index=runs["run_id"].to_numpy())
    # A model trained outside the compared runs: evaluated as train's default would have.
    expected = evaluated["source_run_id"].map(trained_tta).fillna(TrainConfig().tta)
    ranked = evaluated.assign(_mismatch=evaluated["tta"] != expected)
    ranked = ranked.sort_values("_mismatch", kind="stable")
    model = ranked["source_run_id"].fillna(ranked["run_id"])
    return ranked[~model.duplicated()].drop(columns="_mismatch").sort_index()


def train_runs(runs: pd.DataFrame, *, extra_params: Sequence[str] = ()) -> pd.DataFrame:
    """One row per train run: run id and name, norm, seed, the TABLE_PARAMS and `extra_params`,
    and the run's wall time in minutes (start to end, as the tracking store recorded them)."""
    rows = step_runs(runs, "train")
    for name in dict.fromkeys([*TABLE_PARAMS, *extra_params]):
        rows[name] = _column(runs.loc[rows.index], f"params.{name}").map(_unquote)
    started = pd.to_datetime(_column(runs.loc[rows.index], "start_time"), utc=True)
    ended = pd.to_datetime(_column(runs.loc[rows.index], "end_time"), utc=True)
    rows["run_minutes"] = (ended - started).dt.total_seconds() / 60
    return rows.reset_index(drop=True)


def step_runs(runs: pd.DataFrame, step: str) -> pd.DataFrame:
    """Runs of one step (`train`, `evaluate`) with run id, run name, norm and seed."""
    is_step = (_column(runs, "tags.step") == step) | (
        _column(runs, "tags.mlflow.project.entryPoint") == step
    )
    selected = runs[is_step.fillna(False).astype(bool)]
    norm = _column(selected, "params.norm").fillna(_column(selected, "tags.norm"))
    seed = _column(selected, "params.seed").fillna(_column(selected, "tags.seed"))
    frame = pd.DataFrame(
        {
            "run_id": selected["run_id"] if len(selected) else pd.Series(dtype=object),
            "run_name": _column(selected, "tags.mlflow.runName"),
            "norm": norm.map(_unquote),
            "seed": pd.to_numeric(seed.map(_unquote), errors="coerce").astype("Int64"),
        },
        index=selected.index,
    )
    return frame[frame["norm"].notna()]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _unquote(value):
    """Params that `mlflow run` logged shell-quoted (`'~/data'`) read back as typed."""
    if isinstance(value, str) and value[:1] in ("'", '"'):
        try:
            return " ".join(shlex.split(value))
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- tables


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

    The default recipe is the row whose group_by values are `TrainConfig`'s defaults; pairing
    by seed compares runs that started from the same initial weights and batch order.
    """
    keys = list(study.group_by)
    summary = run_summary(study).merge(study.train[["run_id", *keys]], on="run_id")
    for key in keys:
        summary[key] = summary[key].map(param_value)
    defaults = {key: param_value(value) for key, value in TrainConfig().as_params().items()}
    rows = []
    for norm in study.norms:
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
        _percent(m, s)
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
        _percent(m, s) for m, s in zip(table["test_acc_mean"], table["test_acc_std"], strict=True)
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


def _percent(mean: float, std: float = math.nan) -> str:
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
            _percent(m, s)
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
            f"({_percent(leader['final_test_acc_mean'])}% final test accuracy); "
            "there is nothing to compare it with."
        )
    else:
        runner = ranked.iloc[1]
        margin = 100 * (leader["final_test_acc_mean"] - runner["final_test_acc_mean"])
        notes.append(
            f"**{leader['norm']}** norm leads on final test accuracy with "
            f"{_percent(leader['final_test_acc_mean'])}%, {margin:.2f} points ahead of "
            f"{runner['norm']} ({_percent(runner['final_test_acc_mean'])}%)"
            + (
                f"; {ranked.iloc[-1]['norm']} is last "
                f"({_percent(ranked.iloc[-1]['final_test_acc_mean'])}%)."
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


# --------------------------------------------------------------------------- figures


def _band_by_norm(history: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per norm and epoch: mean, min and max of `metric` over seeds."""
    bands = {}
    for norm, rows in history.groupby("norm", sort=False):
        bands[norm] = rows.groupby("epoch")[metric].agg(["mean", "min", "max"]).sort_index()
    return bands


def _plot_band(axis, band: pd.DataFrame, *, label: str, color, scale: float = 1.0, style="o-"):
    axis.plot(band.index, scale * band["mean"], style, color=color, label=label)
    axis.fill_between(band.index, scale * band["min"], scale * band["max"], color=color, alpha=0.2)


def overlay_figure(study: Study):
    """Test accuracy and loss per epoch: one line per norm (mean), band = min-max over seeds."""
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    accuracy = _band_by_norm(study.history, "test_acc")
    loss = _band_by_norm(study.history, "test_loss")
    for norm in study.norms:
        if norm not in accuracy:
            continue
        color = NORM_COLORS.get(norm)
        _plot_band(acc_axis, accuracy[norm], label=norm, color=color, scale=100)
        _plot_band(loss_axis, loss[norm], label=norm, color=color)
    acc_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    loss_axis.set(xlabel="epoch", ylabel="test loss", title="Test loss")
    for axis in (acc_axis, loss_axis):
        whole_epochs(axis, sorted(set(study.history["epoch"])))
        axis.grid(alpha=0.3)
        axis.legend(title="norm (band: seed min-max)")
    figure.tight_layout()
    return figure


def train_vs_test_figure(study: Study):
    """Train vs test accuracy per epoch, one panel per norm, bands over seeds."""
    norms = [n for n in study.norms if n in set(study.history["norm"])] or study.norms
    figure, axes = plt.subplots(
        1, len(norms), figsize=(4.5 * len(norms), 4), squeeze=False, sharey=True
    )
    train = _band_by_norm(study.history, "train_acc")
    test = _band_by_norm(study.history, "test_acc")
    for axis, norm in zip(axes[0], norms, strict=True):
        if norm in train:
            _plot_band(axis, train[norm], label="train", color="tab:gray", scale=100, style="s--")
            _plot_band(axis, test[norm], label="test", color=NORM_COLORS.get(norm), scale=100)
        axis.set(xlabel="epoch", title=f"{norm} norm")
        whole_epochs(axis, sorted(set(study.history["epoch"])))
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0][0].set_ylabel("accuracy (%)")
    figure.tight_layout()
    return figure


def misclassified_figure(study: Study):
    """Each norm's misclassified-image grid (from its train run), side by side."""
    norms = [n for n in study.norms if n in study.misclassified]
    figure, axes = plt.subplots(
        1, len(norms), figsize=(7 * len(norms), 8.5), squeeze=False, layout="constrained"
    )
    for axis, norm in zip(axes[0], norms, strict=True):
        axis.imshow(plt.imread(study.misclassified[norm]))
        axis.set_title(f"{norm} norm", fontsize=16)
        axis.axis("off")
    return figure


def per_class_figure(table: pd.DataFrame):
    """Grouped bars: test accuracy per class, one bar per norm."""
    figure, axis = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(table.columns))
    positions = np.arange(len(table.index))
    for offset, norm in enumerate(table.columns):
        axis.bar(
            positions + (offset - (len(table.columns) - 1) / 2) * width,
            100 * table[norm].to_numpy(),
            width,
            label=norm,
            color=NORM_COLORS.get(norm),
        )
    axis.set_xticks(positions, table.index, rotation=30, ha="right")
    axis.set(ylabel="test accuracy (%)", title="Per-class test accuracy (mean over seeds)")
    axis.set_ylim(0, 105)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(title="norm")
    figure.tight_layout()
    return figure


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- report


def write_report(study: Study, directory: Path) -> Path:
    """Write report.md, norms.csv/.md, runs.csv, per_class_accuracy.csv and plots/*.png into
    `directory`; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    summary = run_summary(study)
    table = norm_table(study)
    classes = per_class_table(study)
    table.to_csv(directory / "norms.csv", index=False)
    summary.to_csv(directory / "runs.csv", index=False)
    readable = readable_norm_table(table)
    (directory / "norms.md").write_text(markdown_table(readable) + "\n")

    sections = [
        "# Normalization study: side by side",
        "",
        f"Compared: {study.source or 'selected runs'}; {len(summary)} train runs "
        f"({', '.join(study.norms) or 'none'}), {study.per_class['run_id'].nunique()} "
        "evaluated models.",
        "",
        "## Results per norm",
        "",
        markdown_table(readable),
        "",
        "Accuracies are percentages after the last epoch, mean ± std over seeds (std needs two "
        "or more seeds). *Best* is the best epoch on the test set, for reference only: it is "
        "picked on the test set. Gap = final train minus final test accuracy. *Epoch s*: "
        "mean seconds per epoch (training and evaluation); *run min*: wall time of a train run "
        "from start to end as the tracking store recorded it (data, epochs, logging, "
        "registration). `groups` applies to group norm only. "
        "Machine-readable: [norms.csv](norms.csv), per run: [runs.csv](runs.csv).",
        "",
        "## Findings",
        "",
        *[f"- {note}" for note in findings(table)],
        "",
    ]
    if study.group_by:
        levers = lever_table(study)
        levers.to_csv(directory / "levers.csv", index=False)
        keys = ", ".join(f"`{key}`" for key in study.group_by)
        sections += [
            f"## Levers: runs grouped by {keys}",
            "",
            markdown_table(readable_lever_table(levers, study.group_by)),
            "",
            "Final test accuracy, mean ± std over seeds. Gain: the mean difference in points "
            "from the norm's default recipe (the row marked *default*: every grouped parameter "
            "at `train`'s default), paired on the seeds both have. "
            "Machine-readable: [levers.csv](levers.csv).",
            "",
        ]
    if "tta" in study.evaluated and study.evaluated["tta"].nunique() > 1:
        ttas = tta_table(study)
        ttas.to_csv(directory / "tta.csv", index=False)
        sections += [
            "## Test-time augmentation",
            "",
            markdown_table(readable_tta_table(ttas)),
            "",
            "From the evaluate runs: test accuracy per `tta`, mean ± std over the evaluated "
            f"models; gain over `tta={TrainConfig().tta}` on the same models. "
            "Machine-readable: [tta.csv](tta.csv).",
            "",
        ]
    if not study.history.empty:
        _save(overlay_figure(study), directory / "plots" / "test_curves.png")
        _save(train_vs_test_figure(study), directory / "plots" / "train_vs_test.png")
        sections += [
            "## Test accuracy and loss per epoch",
            "",
            "![test accuracy and loss per epoch](plots/test_curves.png)",
            "",
            "## Train vs test",
            "",
            "![train vs test accuracy per norm](plots/train_vs_test.png)",
            "",
        ]
    if study.misclassified:
        _save(misclassified_figure(study), directory / "plots" / "misclassified.png")
        sections += [
            "## Misclassified test images",
            "",
            "The first seed of each norm, side by side:",
            "",
            "![misclassified test images per norm](plots/misclassified.png)",
            "",
        ]
    if not classes.empty:
        classes.to_csv(directory / "per_class_accuracy.csv")
        _save(per_class_figure(classes), directory / "plots" / "per_class_accuracy.png")
        shown = (100 * classes).round(2)
        sections += [
            "## Per-class test accuracy (%)",
            "",
            markdown_table(shown, index=True),
            "",
            "![per-class accuracy per norm](plots/per_class_accuracy.png)",
            "",
            "From the evaluate runs' evaluation.json: "
            "[per_class_accuracy.csv](per_class_accuracy.csv).",
            "",
        ]
    runs = summary[["run_name", "run_id", "norm", "seed"]].copy()
    runs["final test acc %"] = [_percent(v) for v in summary["final_test_acc"]]
    runs["best test acc %"] = [_percent(v) for v in summary["best_test_acc"]]
    runs["final train acc %"] = [_percent(v) for v in summary["final_train_acc"]]
    runs["epoch s"] = [f"{v:.1f}" for v in summary["epoch_seconds"]]
    runs["run min"] = [_spread(v) for v in summary["run_minutes"]]
    sections += ["## Runs", "", markdown_table(runs), ""]
    text = "\n".join(sections)
    report = directory / "report.md"
    report.write_text(text)
    # MLflow's Markdown viewer shows relative images as text; its HTML viewer renders this copy,
    # with the figures inlined.
    (directory / "report.html").write_text(markdown_to_html(text, base=directory))
    return report


def markdown_to_html(text: str, *, base: Path) -> str:
    """The report's Markdown subset (headings, paragraphs, lists, pipe tables, links, images)
    as one self-contained HTML page; images under `base` become data URIs."""
    body: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip(), base)}</h{level}>")
            index += 1
        elif line.startswith("|"):
            rows = []
            while index < len(lines) and lines[index].startswith("|"):
                rows.append([c.strip() for c in lines[index].strip().strip("|").split("|")])
                index += 1
            head, rest = rows[0], [r for r in rows[2:]]
            body.append("<table><thead><tr>")
            body += [f"<th>{_inline(c, base)}</th>" for c in head]
            body.append("</tr></thead><tbody>")
            for row in rest:
                body.append("<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in row) + "</tr>")
            body.append("</tbody></table>")
        elif line.startswith("- "):
            body.append("<ul>")
            while index < len(lines) and lines[index].startswith("- "):
                body.append(f"<li>{_inline(lines[index][2:], base)}</li>")
                index += 1
            body.append("</ul>")
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and lines[index][0] not in "#|-":
                paragraph.append(lines[index])
                index += 1
            body.append(f"<p>{_inline(' '.join(paragraph), base)}</p>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Normalization study</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str, base: Path) -> str:
    """Escape, then `code`, **bold**, *italic*, ![alt](image) and [text](link)."""
    text = html.escape(text, quote=False)

    def image(match: re.Match) -> str:
        path = base / match.group(2)
        if path.is_file():
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            source = f"data:image/png;base64,{encoded}"
        else:
            source = html.escape(match.group(2))
        return f'<img alt="{match.group(1)}" src="{source}">'

    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", text)
