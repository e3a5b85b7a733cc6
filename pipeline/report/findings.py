"""What the report says in words: the findings drawn from the per-norm table (who leads, by how
much against its standard error, over- and under-fitting) and the notes on runs that diverged
or did not train (no MLflow here).
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.model import NUM_CLASSES
from pipeline.report.frame import Study, row_label
from pipeline.report.levers import ADOPT_STANDARD_ERRORS, AT_CHANCE
from pipeline.report.tables import percent

OVERFIT_GAP_POINTS = 5.0
# A final train accuracy below this (percent) is called under-fitting.
UNDERFIT_TRAIN_ACC = 60.0
# Validation accuracy peaking this far (points) above its final value is mentioned.
PEAK_DROP_POINTS = 1.0


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
    key = "final_val_acc" if on_val else "final_test_acc"
    ranked = table.sort_values(f"{key}_mean", ascending=False).reset_index(drop=True)
    notes = []
    if not on_val:
        notes.append(
            "These runs held no validation split out (val_size 0, or logged before it "
            "existed): they are ranked on the test split, which then chose."
        )
    notes += _ranking_notes(ranked, on_val=on_val)
    for row in ranked.itertuples(index=False):
        notes += _fit_notes(row)
    return notes


def _accuracies(row, *, on_val: bool, inside: bool = False) -> str:
    """ "80.79% (test 82.20%)", or within parentheses "80.79%, test 82.20%"; the test
    accuracy alone where the runs held no validation split out."""
    if not on_val:
        return f"{percent(row['final_test_acc_mean'])}%"
    test = f"test {percent(row['final_test_acc_mean'])}%"
    val = f"{percent(row['final_val_acc_mean'])}%"
    return f"{val}, {test}" if inside else f"{val} ({test})"


def _ranking_notes(ranked: pd.DataFrame, *, on_val: bool) -> list[str]:
    """Who leads, by how much, and whether that margin is more than noise."""
    key, split = ("final_val_acc", "validation") if on_val else ("final_test_acc", "test")
    leader = ranked.iloc[0]
    # "**batch** norm", or "**batch** norm (norm_batch 8)" for a row of its own.
    bold = row_label(leader["norm"], leader["statistics_group"], name="**{norm}** norm")
    if len(ranked) == 1:
        return [
            f"Only {bold} was run ({_accuracies(leader, on_val=on_val, inside=True)} final "
            f"{split} accuracy); there is nothing to compare it with."
        ]
    runner, last = ranked.iloc[1], ranked.iloc[-1]
    margin = 100 * (leader[f"{key}_mean"] - runner[f"{key}_mean"])
    lead = (
        f"{bold} leads on final {split} accuracy with {_accuracies(leader, on_val=on_val)}, "
        f"{margin:.2f} points ahead of {runner['label']} "
        f"({_accuracies(runner, on_val=on_val, inside=True)})"
    )
    if len(ranked) > 2:
        lead += f"; {last['label']} is last ({_accuracies(last, on_val=on_val, inside=True)})."
    else:
        lead += "."
    return [lead, _margin_note(margin, [leader[f"{key}_se"], runner[f"{key}_se"]])]


def _margin_note(margin: float, errors: list[float]) -> str:
    """The leader's margin in points against the standard error of the difference of the two
    means (`errors`: each one's, as fractions)."""
    if any(math.isnan(e) for e in errors):
        return (
            "With one seed per norm the seed-to-seed spread is unknown, so this margin is "
            "not yet evidence of a real difference; rerun with `-P seeds=3`."
        )
    error = 100 * math.hypot(*errors)  # of the difference of two independent means
    if margin > ADOPT_STANDARD_ERRORS * error:
        verdict = "more than twice its standard error, so the lead is unlikely to be noise"
    elif margin > error:
        verdict = "larger than its standard error but less than twice it: a weak lead"
    else:
        verdict = "within its standard error: the two are not distinguishable"
    return (
        f"The margin of {margin:.2f} points is {verdict} "
        f"(standard error of the difference: {error:.2f} points)."
    )


def _fit_notes(row) -> list[str]:
    """A row's train-test gap (under- or over-fitting) and a validation peak well above its
    final value."""
    gap = 100 * row.train_test_gap_mean
    train = 100 * row.final_train_acc_mean
    if train < UNDERFIT_TRAIN_ACC:
        notes = [
            f"{row.label}: final train accuracy is only {train:.2f}% (gap {gap:+.2f} points), "
            "a sign of under-fitting: more epochs or a different learning rate may help."
        ]
    elif gap > OVERFIT_GAP_POINTS:
        notes = [
            f"{row.label}: train accuracy exceeds test accuracy by {gap:.2f} points, a sign "
            "of over-fitting (more regularisation or augmentation may help)."
        ]
    else:
        notes = [f"{row.label}: train-test gap {gap:+.2f} points, no sign of over-fitting."]
    drop = 100 * (row.best_val_acc_mean - row.final_val_acc_mean)
    if drop > PEAK_DROP_POINTS:
        notes.append(
            f"{row.label}: validation accuracy peaked {drop:.2f} points above its final "
            "value before the last epoch (the tables report the final epoch)."
        )
    return notes
