"""compare's report offline: runs as plain records (report.RunRecord, what tracking.run_records
makes of MLflow's) -> the study frame -> tables, findings, report.md and report.html (no
subprocess; one test goes through a temporary MLflow store)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import config
from pipeline import report as comparison
from pipeline.engine import EpochMetrics
from pipeline.report import RunRecord

START = pd.Timestamp("2026-01-01 12:00", tz="UTC").to_pydatetime()


def _fake_study(tmp_path: Path, finals: dict[str, list[float]]) -> comparison.Study:
    """Train/evaluate runs as records, with two-epoch histories."""
    rows, histories, evaluations, grids = [], {}, {}, {}
    for norm, accuracies in finals.items():
        for seed, accuracy in enumerate(accuracies, start=1):
            run_id = f"{norm}{seed}"
            rows.append(
                RunRecord(
                    run_id=run_id,
                    run_name=f"train-{norm}-seed{seed}",
                    tags={"step": "train"},
                    params={
                        "norm": norm,
                        "seed": str(seed),
                        "epochs": "2",
                        "groups": "4",
                        "data": "'~/data'",
                        "val_size": "40",
                        "val_digest": "d1",
                        # per-norm recipes: each norm's resolved values
                        "optimizer": "muon" if norm == "batch" else "sgd",
                        "pool": "avg" if norm == "layer" else "max",
                    },
                    # the runs of seed s take 10 + s minutes
                    start_time=START,
                    end_time=START + pd.Timedelta(minutes=10 + seed),
                )
            )
            # Validation half a point below test, and no higher at its first epoch.
            histories[run_id] = [
                EpochMetrics(1, 1.5, accuracy - 0.2, 1.4, accuracy - 0.1, 0.1, 2.0, 1.4, 0.5),
                EpochMetrics(
                    2, 1.0, accuracy + 0.02, 1.1, accuracy, 0.0, 3.0, 1.1, accuracy - 0.005
                ),
            ]
            rows.append(
                RunRecord(
                    run_id=f"eval-{run_id}",
                    run_name=f"evaluate-cifar10-{norm}-v{seed}",
                    tags={"step": "evaluate", "norm": norm, "seed": str(seed)},
                )
            )
            evaluations[f"eval-{run_id}"] = {
                "per_class_accuracy": {"cat": accuracy, "dog": accuracy / 2}
            }
            grid = tmp_path / f"{run_id}.png"
            Image.fromarray(np.full((20, 30, 3), 40 * seed, dtype=np.uint8)).save(grid)
            grids[run_id] = grid
    return comparison.build_study(
        rows, histories, evaluations=evaluations, misclassified=grids, source="test"
    )


def test_norm_table_is_mean_std_and_standard_error_over_seeds(tmp_path):
    finals = {"layer": [0.60, 0.62, 0.64], "batch": [0.70, 0.71, 0.72]}
    study = _fake_study(tmp_path, finals)
    assert study.norms == ["batch", "layer"]
    table = comparison.norm_table(study).set_index("norm")
    for norm, values in finals.items():
        assert table.loc[norm, "runs"] == 3
        assert table.loc[norm, "final_test_acc_mean"] == pytest.approx(np.mean(values))
        assert table.loc[norm, "final_val_acc_mean"] == pytest.approx(np.mean(values) - 0.005)
        assert table.loc[norm, "final_test_acc_std"] == pytest.approx(np.std(values, ddof=1))
        assert table.loc[norm, "final_test_acc_se"] == pytest.approx(
            np.std(values, ddof=1) / np.sqrt(3)
        )
        assert table.loc[norm, "train_test_gap_mean"] == pytest.approx(0.02)
        assert table.loc[norm, "epoch_seconds_mean"] == pytest.approx(2.5)
        assert table.loc[norm, "run_minutes_mean"] == pytest.approx(12.0)
        assert table.loc[norm, "run_minutes_std"] == pytest.approx(1.0)
    readable = comparison.readable_norm_table(comparison.norm_table(study)).set_index("norm")
    assert readable.loc["batch", "run min"] == "12.0 ± 0.6"  # 1 / sqrt(3): the SE
    assert readable.loc["batch", "final val acc %"] == "70.50 ± 0.58"
    assert readable.loc["batch", "final test acc %"] == "71.00 ± 0.58"
    assert readable.loc["layer", "groups"] == ""  # groups is a group-norm parameter
    # the per-norm parameters each norm resolved show beside it; a run without one, blank
    assert list(readable.loc["batch", ["optimizer", "pool", "activation"]]) == ["muon", "max", ""]
    assert list(readable.loc["layer", ["optimizer", "pool"]]) == ["sgd", "avg"]
    notes = comparison.findings(comparison.norm_table(study))
    assert notes[0].startswith(
        "**batch** norm leads on final validation accuracy with 70.50% (test 71.00%)"
    )
    assert "9.00 points ahead of layer" in notes[0]
    # SEs 0.58 and 1.15 points: the difference's is 1.29, and 9.00 > 2 x 1.29.
    assert "more than twice its standard error" in notes[1] and "1.29 points" in notes[1]
    classes = comparison.per_class_table(study)
    assert classes.loc["dog", "layer"] == pytest.approx(np.mean(finals["layer"]) / 2)


def test_findings_call_a_margin_inside_its_standard_error_a_tie(tmp_path):
    study = _fake_study(tmp_path, {"group": [0.50, 0.60, 0.55], "layer": [0.56, 0.52, 0.54]})
    notes = comparison.findings(comparison.norm_table(study))
    assert any("within its standard error" in note for note in notes)
    assert any("under-fitting" in note for note in notes)  # train accuracy below 60%


def test_findings_rank_on_test_only_where_no_run_held_validation_out(tmp_path):
    study = _fake_study(tmp_path, {"batch": [0.70, 0.72], "layer": [0.60, 0.61]})
    study = dataclasses.replace(
        study, history=study.history.assign(val_acc=np.nan, val_loss=np.nan)
    )
    notes = comparison.findings(comparison.norm_table(study))
    assert "ranked on the test split" in notes[0]
    assert notes[1].startswith("**batch** norm leads on final test accuracy with 71.00%")


def test_report_renders_with_relative_links(tmp_path):
    study = _fake_study(tmp_path, {"batch": [0.7, 0.72], "group": [0.65, 0.66]})
    report = comparison.write_report(study, tmp_path / "out")
    text = report.read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (report.parent / link).is_file(), link
    assert "70.00 ± 1.00" not in text  # the headline is a mean, not one seed
    assert "71.00 ± 1.00" in text and "70.50 ± 1.00" in text  # test and validation, ± SE
    assert not math.isnan(float(pd.read_csv(report.parent / "norms.csv")["epochs"][0]))
    # The HTML copy (MLflow renders it, images included) carries the same table, figures inlined.
    page = (report.parent / "report.html").read_text()
    assert "<td>71.00 ± 1.00</td>" in page
    images = re.findall(r'<img alt="([^"]*)" src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for _, src in images)
    assert len(images) == text.count("![")
    assert "<h2>Findings</h2>" in page and "<li><strong>batch</strong> norm leads" in page


def test_report_html_is_one_page_with_its_tables_figures_and_text_as_typed(tmp_path):
    study = _fake_study(tmp_path, {"batch": [0.7, 0.72]})
    study = dataclasses.replace(study, source="runs named <script>alert(1)</script> & co")
    report = comparison.write_report(study, tmp_path / "out")
    page = (report.parent / "report.html").read_text()
    tables = [line for line in report.read_text().splitlines() if line.startswith("| --- |")]
    assert page.count("<table>") == len(tables) >= 3
    assert re.search(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)
    # Names in the report are text: MLflow runs the page with scripts allowed.
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    # Links to the CSVs stay relative (they resolve in the artifact directory, not inlined).
    assert '<a href="norms.csv">norms.csv</a>' in page


# --------------------------------------------------------------------------- levers and tta


def _lever_runs(
    finals: dict[tuple[str, str], list[float]],
    key: str = "whiten",
    *,
    digests: dict[str, str] | None = None,
) -> tuple[list[RunRecord], dict]:
    """Train runs of (norm, value of `key`) with per-seed final validation accuracies (test
    one point above), as records; every run has translate=4 and validates on split "d1" unless
    `digests` names another for its run id."""
    runs, histories = [], {}
    for (norm, value), accuracies in finals.items():
        for seed, accuracy in enumerate(accuracies, start=1):
            run_id = f"{norm}-{value}-{seed}"
            params = {"norm": norm, "seed": str(seed), key: value, "translate": "4"}
            params["val_digest"] = (digests or {}).get(run_id, "d1")
            runs.append(RunRecord(run_id=run_id, tags={"step": "train"}, params=params))
            histories[run_id] = [
                EpochMetrics(1, 1.0, accuracy, 1.0, accuracy + 0.01, 0.1, 1.0, 1.0, accuracy)
            ]
    return runs, histories


def test_paired_gain_and_the_adoption_rule_on_a_hand_worked_case():
    """Default and lever on four seeds: differences 1.2, 0.8, 1.5, 0.6 points; mean 1.025,
    sample variance 0.4875 / 3 = 0.1625, SE sqrt(0.1625) / 2 = 0.2016: 1.025 > 2 x 0.2016."""
    default = pd.Series([0.800, 0.810, 0.820, 0.805], index=[1, 2, 3, 4])
    lever = pd.Series([0.812, 0.818, 0.835, 0.811], index=[1, 2, 3, 4])
    gain = comparison.paired_gain(lever, default)
    assert gain.pairs == 4
    assert gain.points == pytest.approx(1.025)
    assert gain.standard_error == pytest.approx(0.201556, abs=1e-6)
    assert gain.adopted
    # Differences +1.0, -0.5, +0.8: mean 0.433, SE 0.470; twice the SE is more than the gain.
    small = comparison.paired_gain(pd.Series([0.81, 0.805, 0.828], index=[1, 2, 3]), default)
    assert small.points == pytest.approx(0.4333, abs=1e-4)
    assert small.standard_error == pytest.approx(0.470225, abs=2e-6)
    assert not small.adopted
    # Large but on two seeds: below the three the rule needs.
    two = comparison.paired_gain(pd.Series([0.82, 0.83], index=[1, 2]), default)
    assert two.points == pytest.approx(2.0) and two.pairs == 2 and not two.adopted
    nothing = comparison.paired_gain(pd.Series([0.9], index=[9]), default)
    assert nothing.pairs == 0 and math.isnan(nothing.points) and not nothing.adopted


def test_lever_table_ranks_on_validation_and_pairs_each_lever_with_the_default_recipe():
    runs, histories = _lever_runs(
        {
            ("batch", "False"): [0.800, 0.810, 0.820, 0.805],
            ("batch", "true"): [0.812, 0.818, 0.835, 0.811],  # the hand-worked case: adopted
            ("layer", "True"): [0.70],  # as the CLI logs; no default-recipe layer run to pair with
        }
    )
    study = comparison.build_study(runs, histories, group_by=("whiten", "translate"))
    table = comparison.lever_table(study)
    assert list(zip(table["norm"], table["whiten"], table["default"], strict=True)) == [
        ("batch", "true", False),  # ranked first: the higher validation accuracy
        ("batch", "false", True),
        ("layer", "true", False),
    ]
    assert set(table["translate"]) == {"4"}
    batch = table[table["norm"] == "batch"].set_index("whiten")
    assert batch.loc["false", "final_val_acc_mean"] == pytest.approx(0.80875)
    assert batch.loc["false", "final_test_acc_mean"] == pytest.approx(0.81875)
    assert batch.loc["true", "gain_points"] == pytest.approx(1.025)
    assert batch.loc["true", "gain_se_points"] == pytest.approx(0.201556, abs=1e-6)
    assert batch.loc["true", "paired_seeds"] == 4 and batch.loc["true", "adopt"]
    assert math.isnan(batch.loc["false", "gain_points"])
    assert math.isnan(table[table["norm"] == "layer"]["gain_points"].iloc[0])
    readable = comparison.readable_lever_table(table, ("whiten", "translate"))
    assert readable.loc[0, "val gain (points ± SE)"] == "+1.02 ± 0.20 (4 seeds)"
    assert readable.loc[0, "adopt?"] == "yes" and readable.loc[1, "adopt?"] == ""
    assert readable.loc[1, "recipe"] == "default"
    assert readable.loc[1, "test acc % (reported, not chosen on)"] == "81.88 ± 0.43"


def test_a_lever_that_trains_where_the_default_did_not_is_adopted(monkeypatch):
    """none's learning-rate screen, before its recipe held 0.05: the default (0.2) collapsed to
    chance on seed 3 (val and train 10%), 0.05 trained on all three. Paired differences +0.10,
    +7.14, +63.74 points: mean 23.66, SE 20.14, inside twice its SE, so the gain alone adopts
    nothing; training where the default did not does, as 0.05 is not behind on the seeds where
    both trained."""
    finals = {
        ("none", "0.2"): [0.7570, 0.6818, 0.1000],
        ("none", "0.05"): [0.7580, 0.7532, 0.7374],
        ("none", "0.1"): [0.7350, 0.6500, 0.7000],  # behind where both trained: not adopted
        ("none", "0.025"): [0.7272, 0.7000],  # two seeds: too few
        ("none", "0.3"): [0.7600, 0.6700, 0.1200],  # at chance itself on seed 3: not adopted
    }
    # none's default as it was then: the shared 0.2
    monkeypatch.setitem(config.RECIPES, "none", {**config.RECIPES["none"], "learning_rate": 0.2})
    runs, histories = _lever_runs(finals, key="learning_rate")
    study = comparison.build_study(runs, histories, group_by=("learning_rate",))
    table = comparison.lever_table(study).set_index("learning_rate")
    assert table.loc["0.2", "default"]
    assert table.loc["0.05", "gain_points"] == pytest.approx(23.66, abs=0.005)
    assert table.loc["0.05", "gain_se_points"] == pytest.approx(20.14, abs=0.005)
    assert table.loc["0.05", "gain_points"] < 2 * table.loc["0.05", "gain_se_points"]
    assert table.loc["0.05", "adopt"] and table.loc["0.05", "rescued_seeds"] == "3"
    for lever in ("0.1", "0.025", "0.3"):
        assert not table.loc[lever, "adopt"] and table.loc[lever, "rescued_seeds"] == ""
    readable = comparison.readable_lever_table(table.reset_index(), ("learning_rate",))
    verdicts = dict(zip(readable["learning_rate"], readable["adopt?"], strict=True))
    assert verdicts["0.05"] == "yes: trains where the default did not (seed 3)"
    assert verdicts["0.1"] == "no" and verdicts["0.2"] == ""
    # A default seed that diverged (FAILED, tagged, no history) counts as not trained too.
    runs, histories = _lever_runs(
        {("none", "0.2"): [0.7570, 0.6818], ("none", "0.05"): [0.7580, 0.7532, 0.7374]},
        key="learning_rate",
    )
    diverged = dataclasses.replace(
        runs[0],
        run_id="none-0.2-3",
        params={**runs[0].params, "seed": "3"},
        status="FAILED",
        tags={**runs[0].tags, "diverged": "training diverged at epoch 2 (loss nan); lower lr"},
    )
    runs = [*runs, diverged]
    study = comparison.build_study(runs, histories, group_by=("learning_rate",))
    table = comparison.lever_table(study).set_index("learning_rate")
    assert table.loc["0.05", "paired_seeds"] == 2 and table.loc["0.05", "rescued_seeds"] == "3"
    assert table.loc["0.05", "adopt"]


def test_lever_table_never_pairs_runs_validated_on_different_splits():
    runs, histories = _lever_runs(
        {("batch", "False"): [0.80, 0.81, 0.82], ("batch", "true"): [0.85, 0.86, 0.87]},
        digests={"batch-true-1": "d2", "batch-true-2": "d2", "batch-true-3": "d2"},
    )
    study = comparison.build_study(runs, histories, group_by=("whiten",))
    lever = comparison.lever_table(study).set_index("whiten").loc["true"]
    assert lever["paired_seeds"] == 0 and math.isnan(lever["gain_points"])
    assert not lever["adopt"]


def test_lever_table_holds_the_levers_it_does_not_group_by_at_the_recipe(tmp_path):
    """Two screens in one experiment, compared by `whiten` alone: the label-smoothing screen's
    runs have the recipe's whiten, but they are not the recipe. Counted as the default they
    would lift it by half their gain; they are set aside and named instead, a diverged one too
    (else the default would seem to fail on its seed)."""
    runs, histories = _lever_runs(
        {("batch", "False"): [0.800, 0.810, 0.820], ("batch", "true"): [0.806, 0.815, 0.828]}
    )
    smoothed, _ = _lever_runs({("batch", "False"): [0.850, 0.860, 0.870]})
    for seed, accuracy, run in zip((1, 2, 3), (0.850, 0.860, 0.870), smoothed, strict=True):
        run_id = f"batch-smoothed-{seed}"
        params = {**run.params, "label_smoothing": "0.05"}
        runs.append(dataclasses.replace(run, run_id=run_id, params=params))
        histories[run_id] = [
            EpochMetrics(1, 1.0, accuracy, 1.0, accuracy + 0.01, 0.1, 1.0, 1.0, accuracy)
        ]
    diverged = dataclasses.replace(
        runs[-1],
        run_id="batch-smoothed-4",
        params={**runs[-1].params, "seed": "4"},
        status="FAILED",
        tags={"step": "train", "diverged": "training diverged at epoch 2 (loss nan)"},
    )
    study = comparison.build_study([*runs, diverged], histories, group_by=("whiten",))
    table = comparison.lever_table(study).set_index("whiten")
    assert table.loc["false", "default"] and table.loc["false", "runs"] == 3
    assert table.loc["false", "final_val_acc_mean"] == pytest.approx(0.81)
    assert table.loc["true", "gain_points"] == pytest.approx(0.6333, abs=1e-4)  # +.6 +.5 +.8
    assert table.loc["true", "rescued_seeds"] == ""
    aside = comparison.set_aside(study)
    assert sorted(aside["run_id"]) == [f"batch-smoothed-{seed}" for seed in (1, 2, 3, 4)]
    assert set(aside["moved"]) == {"label_smoothing 0.05"}
    note = "batch norm 4 runs (label_smoothing 0.05)"
    assert note in comparison.set_aside_note(study)
    assert note in comparison.write_report(study, tmp_path / "out").read_text()
    # Grouped by both, every run has its row and none is set aside.
    both = comparison.build_study(runs, histories, group_by=("whiten", "label_smoothing"))
    assert len(comparison.lever_table(both)) == 3 and comparison.set_aside(both).empty
    assert comparison.set_aside_note(both) == ""


def test_runs_from_before_a_setting_existed_are_its_recipe_value_in_the_lever_table():
    """The recipe's runs were trained before `muon_ns_steps` was a param, the lever's after:
    the runs without it trained with what the setting's default keeps, so they are the
    default row the lever pairs with, not a row of their own."""
    runs, histories = _lever_runs(
        {("layer", ""): [0.80, 0.81, 0.82], ("layer", "3"): [0.79, 0.80, 0.815]},
        key="muon_ns_steps",
    )
    runs = [
        dataclasses.replace(run, params={k: v for k, v in run.params.items() if v != ""})
        for run in runs
    ]
    study = comparison.build_study(runs, histories, group_by=("muon_ns_steps",))
    table = comparison.lever_table(study).set_index("muon_ns_steps")
    assert list(table.index) == ["5", "3"] and table.loc["5", "default"]
    assert table.loc["3", "gain_points"] == pytest.approx(-0.8333, abs=1e-4)
    assert table.loc["3", "paired_seeds"] == 3


def test_lever_table_takes_each_norms_own_recipe_as_its_default(monkeypatch):
    """batch_size is per norm (config.RECIPES): with a recipe of batch 256 for batch norm, 256 is
    batch norm's default and a lever for layer norm, whose default is 128."""
    monkeypatch.setitem(config.RECIPES, "batch", {**config.RECIPES["batch"], "batch_size": 256})
    runs, histories = _lever_runs(
        {
            ("batch", "256"): [0.80, 0.82],
            ("batch", "128"): [0.79, 0.81],
            ("layer", "256"): [0.78, 0.79],
            ("layer", "128"): [0.79, 0.81],
        },
        key="batch_size",
    )
    study = comparison.build_study(runs, histories, group_by=("batch_size",))
    table = comparison.lever_table(study)
    assert list(zip(table["norm"], table["batch_size"], table["default"], strict=True)) == [
        ("batch", "256", True),
        ("batch", "128", False),
        ("layer", "128", True),
        ("layer", "256", False),
    ]
    layer = table[table["norm"] == "layer"].set_index("batch_size")
    assert layer.loc["256", "gain_points"] == pytest.approx(-1.5)


def test_tta_table_compares_evaluations_of_the_same_models(tmp_path):
    runs, histories = _lever_runs({("batch", "False"): [0.80, 0.82]})
    evaluations = []
    for seed, (flip, translate) in enumerate([(0.80, 0.81), (0.82, 0.825)], start=1):
        for tta, accuracy in (("flip-translate", translate), ("flip", flip)):
            evaluations.append(
                RunRecord(
                    run_id=f"eval-{seed}-{tta}",
                    tags={
                        "step": "evaluate",
                        "norm": "batch",
                        "seed": str(seed),
                        "source_run_id": f"batch-False-{seed}",
                    },
                    params={"tta": tta},
                    metrics={"test_acc": accuracy},
                )
            )
    payloads = {
        e.run_id: {"per_class_accuracy": {"cat": e.metrics["test_acc"]}} for e in evaluations
    }
    study = comparison.build_study([*runs, *evaluations], histories, evaluations=payloads)
    # per class, each model counts once, evaluated as its training run evaluated (flip)
    assert sorted(study.per_class["run_id"]) == ["eval-1-flip", "eval-2-flip"]
    assert comparison.per_class_table(study).loc["cat", "batch"] == pytest.approx(0.81)
    table = comparison.tta_table(study).set_index("tta")
    assert table.loc["flip", "models"] == 2
    assert table.loc["flip-translate", "test_acc_mean"] == pytest.approx(0.8175)
    # gains are over train's default tta (flip-translate), on the models evaluated both ways
    assert table.loc["flip", "gain_points"] == pytest.approx(-0.75)
    assert math.isnan(table.loc["flip-translate", "gain_points"])
    report = comparison.write_report(study, tmp_path / "out").read_text()
    assert "## Test-time augmentation" in report and "-0.75 ± 0.25 (2 models)" in report
    assert "## Levers" not in report  # no group_by given


def _runs_with(rows_spec: list[dict]) -> tuple[list[RunRecord], dict]:
    """Train runs (norm, seed, final test accuracy, params) with one-epoch histories."""
    rows, histories = [], {}
    for spec in rows_spec:
        run_id = f"{spec['norm']}-{spec.get('norm_batch', 0)}-{spec['seed']}"
        rows.append(
            RunRecord(
                run_id=run_id,
                run_name=f"train-{spec['norm']}-seed{spec['seed']}",
                status=spec.get("status", "FINISHED"),
                tags={
                    "step": "train",
                    **({"diverged": spec["diverged"]} if "diverged" in spec else {}),
                },
                params={
                    "norm": spec["norm"],
                    "seed": str(spec["seed"]),
                    "batch_size": "128",
                    "norm_batch": str(spec.get("norm_batch", 0)),
                    "val_digest": "d1",
                },
            )
        )
        if not spec.get("diverged"):
            accuracy, loss = spec["acc"], spec.get("loss", 1.0)
            histories[run_id] = [
                EpochMetrics(1, loss, accuracy, loss, accuracy, 0.1, 1.0, 1.0, accuracy)
            ]
    return rows, histories


def test_the_report_draws_the_batch_dependence_when_statistics_groups_vary(tmp_path):
    specs = [
        {"norm": "batch", "norm_batch": size, "seed": seed, "acc": acc + 0.01 * seed}
        for size, acc in ((2, 0.60), (8, 0.70), (0, 0.75))
        for seed in (1, 2, 3)
    ]
    specs += [{"norm": "group", "seed": seed, "acc": 0.72} for seed in (1, 2)]
    runs, histories = _runs_with(specs)
    study = comparison.build_study(runs, histories, source="test")
    points, references = comparison.batch_dependence(study)
    assert list(points["images_per_group"]) == [2, 8, 128]  # 0: the whole batch of 128
    assert list(points["runs"]) == [3, 3, 3]
    assert points["mean"].tolist() == pytest.approx([0.62, 0.72, 0.77])
    assert points["min"].tolist() == pytest.approx([0.61, 0.71, 0.76])
    assert list(references["norm"]) == ["group"] and references["mean"][0] == pytest.approx(0.72)
    report = comparison.write_report(study, tmp_path / "out")
    text = report.read_text()
    assert "## Batch-size dependence" in text
    assert "![final test accuracy against images per statistics group]" in text
    assert (report.parent / "plots" / "batch_dependence.png").stat().st_size > 10_000
    assert "| batch | 128 (whole batch) | 128 | 3 | 1,2,3 | 77.00 ± 0.58 |" in text
    # Statistics groups are never pooled: each norm_batch is a row of the per-norm table, a
    # line of the curves and a name in the findings, from the smallest group up.
    assert study.labels == [
        "batch (norm_batch 2)",
        "batch (norm_batch 8)",
        "batch (whole batch)",
        "group",
    ]
    table = comparison.norm_table(study).set_index("label")
    assert list(table["runs"]) == [3, 3, 3, 2]
    assert list(table["norm"]) == ["batch", "batch", "batch", "group"]
    assert table.loc["batch (norm_batch 8)", "final_test_acc_mean"] == pytest.approx(0.72)
    assert table.loc["batch (whole batch)", "norm_batch"] == "0"
    notes = comparison.findings(comparison.norm_table(study))
    assert notes[0].startswith("**batch** norm (whole batch) leads on final validation accuracy")
    assert "5.00 points ahead of batch (norm_batch 8) (72.00%" in notes[0]
    assert "batch (norm_batch 2) is last" in notes[0]
    assert "| batch (norm_batch 8) | 3 | 1,2,3 |" in text
    # Without a run grouping its statistics there is no such figure.
    plain = [spec for spec in specs if spec.get("norm_batch", 0) == 0]
    runs, histories = _runs_with(plain)
    study = comparison.build_study(runs, histories, source="test")
    assert comparison.batch_dependence(study) is None
    assert "Batch-size dependence" not in comparison.write_report(study, tmp_path / "p").read_text()


def test_a_diverged_run_is_named_by_the_findings_and_counted_in_no_mean(tmp_path):
    runs, histories = _runs_with(
        [
            {"norm": "none", "seed": 1, "acc": 0.50},
            {
                "norm": "none",
                "seed": 2,
                "status": "FAILED",
                "diverged": "training diverged at epoch 3 (loss nan); lower learning_rate",
            },
            {"norm": "none", "seed": 3, "acc": 0.10, "loss": math.nan},
            {"norm": "none", "seed": 4, "acc": 0.0997, "loss": 2.3061},  # collapsed: at chance
            {"norm": "batch", "seed": 1, "acc": 0.70},
        ]
    )
    study = comparison.build_study(runs, histories, source="test")
    assert list(study.diverged["run_name"]) == ["train-none-seed2"]
    table = comparison.norm_table(study).set_index("norm")
    # the diverged one is in no mean; the one at chance is, a result like any other
    assert table.loc["none", "runs"] == 3
    assert table.loc["none", "final_test_acc_mean"] == pytest.approx((0.50 + 0.10 + 0.0997) / 3)
    notes = comparison.divergence_notes(study)
    assert notes[0].startswith("none diverged (loss NaN): run `train-none-seed2` (seed 2)")
    assert "epoch 3" in notes[0]
    assert notes[1].startswith("none diverged (loss NaN): run `train-none-seed3` (seed 3) ended")
    assert notes[2] == (
        "none did not train: run `train-none-seed4` (seed 4) ended epoch 1 at chance, training "
        "accuracy 9.97% (1 in 10 is 10.00%), loss 2.306. It counts in its norm's mean."
    )
    assert len(notes) == 3  # seed 1 (50%) and batch norm (70%) trained
    text = comparison.write_report(study, tmp_path / "out").read_text()
    assert "- none diverged (loss NaN): run `train-none-seed2`" in text
    assert "- none did not train: run `train-none-seed4`" in text


# --------------------------------------------------------------------------- the study's input


def test_the_study_frame_carries_norm_norm_batch_and_label_as_columns():
    specs = [
        {"norm": "batch", "norm_batch": 8, "seed": 1, "acc": 0.7},
        {"norm": "batch", "seed": 1, "acc": 0.75},
        {"norm": "group", "norm_batch": 0, "seed": 1, "acc": 0.72},
    ]
    runs, histories = _runs_with(specs)
    # a run from before norm_batch existed: the whole batch, as 0
    runs.append(
        RunRecord(run_id="old", tags={"step": "train"}, params={"norm": "batch", "seed": "2"})
    )
    histories["old"] = histories["batch-0-1"]
    study = comparison.build_study(runs, histories)
    train = study.train.set_index("run_id")
    assert train["norm_batch"].to_dict() == {
        "batch-8-1": 8,
        "batch-0-1": 0,
        "group-0-1": 0,
        "old": 0,
    }
    assert train.loc["batch-8-1", "statistics_group"] == "norm_batch 8"
    assert train.loc["old", "statistics_group"] == "whole batch"
    assert train.loc["group-0-1", "statistics_group"] == ""  # group's runs are one row
    for run in train.itertuples():
        assert run.label == comparison.row_label(run.norm, run.statistics_group)
    assert study.lines.to_dict("records") == [
        {"label": "batch (norm_batch 8)", "norm": "batch", "statistics_group": "norm_batch 8"},
        {"label": "batch (whole batch)", "norm": "batch", "statistics_group": "whole batch"},
        {"label": "group", "norm": "group", "statistics_group": ""},
    ]
    assert study.line_names("{norm} norm") == {
        "batch (norm_batch 8)": "batch norm (norm_batch 8)",
        "batch (whole batch)": "batch norm (whole batch)",
        "group": "group norm",
    }
    history = study.history.drop_duplicates("run_id").set_index("run_id")
    assert history.loc["old", "label"] == "batch (whole batch)"
    table = comparison.norm_table(study).set_index("label")
    assert list(table["statistics_group"]) == ["norm_batch 8", "whole batch", ""]
    assert table.loc["batch (whole batch)", "runs"] == 2


def test_the_findings_name_a_row_from_its_columns_not_its_label(tmp_path):
    runs, histories = _runs_with(
        [
            {"norm": "batch", "norm_batch": size, "seed": 1, "acc": 0.6 + size / 100}
            for size in (2, 8)
        ]
    )
    table = comparison.norm_table(comparison.build_study(runs, histories))
    assert comparison.findings(table)[0].startswith("**batch** norm (norm_batch 8) leads")
    renamed = table.assign(label=["two", "eight"])  # what a label says is never read back
    assert comparison.findings(renamed)[0].startswith("**batch** norm (norm_batch 8) leads")


def test_recipe_value_prefers_the_resolved_recipe_and_falls_back_to_the_plain_param():
    logged = {"optimizer": "per_norm", "resolved.optimizer": "muon", "pool": "max"}
    assert comparison.recipe_value(logged, "optimizer") == "muon"
    assert comparison.recipe_value(logged, "pool") == "max"  # an older run: resolved as plain
    assert comparison.recipe_value(logged, "activation") is None
    # only the recipe's parameters have a resolved value
    assert comparison.recipe_value({"seed": "1", "resolved.seed": "2"}, "seed") == "1"


def test_the_report_shows_each_runs_resolved_recipe(monkeypatch):
    recipe = {**config.RECIPES["batch"], "learning_rate": 0.1, "batch_size": 256}
    monkeypatch.setitem(config.RECIPES, "batch", recipe)
    new = {"learning_rate": "0", "resolved.learning_rate": "0.1", "batch_size": "0"}
    new |= {"resolved.batch_size": "256", "optimizer": "", "resolved.optimizer": "muon"}
    old = {"learning_rate": "0.2", "batch_size": "128", "optimizer": "sgd"}
    runs, histories = [], {}
    for seed, (params, accuracy) in enumerate([(new, 0.8), (old, 0.7)], start=1):
        run_id = f"batch-{seed}"
        params = {"norm": "batch", "seed": str(seed), "val_digest": "d1", **params}
        runs.append(RunRecord(run_id=run_id, tags={"step": "train"}, params=params))
        histories[run_id] = [EpochMetrics(1, 1.0, accuracy, 1.0, accuracy, 0.1, 1.0, 1.0, accuracy)]
    study = comparison.build_study(runs, histories, group_by=("learning_rate",))
    row = comparison.norm_table(study).iloc[0]
    assert (row["learning_rate"], row["batch_size"], row["optimizer"]) == (
        "0.1/0.2",
        "256/128",
        "muon/sgd",
    )
    levers = comparison.lever_table(study).set_index("learning_rate")
    assert levers.loc["0.1", "default"]
    # The old run moved the batch and the optimizer as well as the rate: not the rate's lever.
    assert list(levers.index) == ["0.1"]
    aside = comparison.set_aside(study)
    assert list(aside["run_id"]) == ["batch-2"]
    assert aside["moved"].iloc[0] == "batch_size 128, optimizer sgd"


def test_tracked_runs_reach_the_report_as_records(tracking_store):
    import mlflow

    from pipeline import tracking

    # An experiment by id, not set_experiment: MLflow's active experiment would outlive the test.
    experiment = mlflow.create_experiment("records")
    with mlflow.start_run(experiment_id=experiment, run_name="train-batch-seed1") as trained:
        mlflow.set_tags({"step": "train"})
        mlflow.log_params({"norm": "batch", "seed": "1", "norm_batch": "8", "data": "'~/data'"})
        mlflow.log_params({"optimizer": "sgd", "resolved.optimizer": "muon"})
        mlflow.log_metric("test_acc", 0.7)
    train_id = trained.info.run_id
    with mlflow.start_run(experiment_id=experiment, run_name="evaluate-batch") as evaluated:
        mlflow.set_tags({"step": "evaluate", "norm": "batch", "seed": "1"})
        mlflow.set_tags({"source_run_id": train_id})
        mlflow.log_metric("test_acc", 0.71)
    records = {
        record.run_id: record
        for record in tracking.run_records(tracking.study_runs(experiment_name="records"))
    }
    train = records[train_id]
    assert (train.run_name, train.status) == ("train-batch-seed1", "FINISHED")
    assert train.params == {
        "norm": "batch",
        "seed": "1",
        "norm_batch": "8",
        "data": "'~/data'",
        "optimizer": "sgd",
        "resolved.optimizer": "muon",
    }
    assert train.metrics == {"test_acc": pytest.approx(0.7)}
    assert train.tags["step"] == "train" and "source_run_id" not in train.tags
    assert train.start_time.tzinfo is not None and train.start_time <= train.end_time
    assert records[evaluated.info.run_id].params == {}  # nothing logged, nothing made up
    study = comparison.build_study(
        list(records.values()),
        {train_id: [EpochMetrics(1, 1.0, 0.7, 1.0, 0.7, 0.1, 1.0, 1.0, 0.7)]},
    )
    assert study.train.loc[0, ["norm", "norm_batch", "optimizer"]].tolist() == ["batch", 8, "muon"]
    assert study.train.loc[0, "run_minutes"] >= 0
    assert study.evaluated.loc[0, ["source_run_id", "test_acc"]].tolist() == [train_id, 0.71]


def test_compare_reads_the_runs_of_several_experiments(tracking_store):
    """`--experiment-name study,screen`: a screen's lever runs, kept in their own experiment,
    pair with the study's; an unknown name is refused by name."""
    import mlflow

    from pipeline import tracking

    ids = {}
    for name, pool in (("study", "auto"), ("screen", "avg")):
        experiment = mlflow.create_experiment(name)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.set_tags({"step": "train"})
            mlflow.log_params({"norm": "batch", "seed": "1", "pool": pool})
        ids[name] = run.info.run_id
    found = tracking.study_runs(experiment_name="study, screen")
    assert sorted(found["run_id"]) == sorted(ids.values())
    only = tracking.study_runs(experiment_name="study,screen", filter_string="params.pool = 'avg'")
    assert only["run_id"].tolist() == [ids["screen"]]
    with pytest.raises(tracking.TrackingError, match="experiment_name 'nope' does not exist"):
        tracking.study_runs(experiment_name="study,nope")


def test_untracked_runs_reach_the_report_as_records():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "untracked.py"
    spec = importlib.util.spec_from_file_location("untracked", path)
    untracked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(untracked)
    runs = [
        {
            "run_id": f"runs-{seed}-{graphs}",
            "params": {"norm": "batch", "seed": str(seed), "cuda_graphs": graphs},
            "records": [
                dataclasses.asdict(EpochMetrics(1, 1.0, acc, 1.0, acc, 0.1, 1.0, 1.0, acc))
            ],
            "process_seconds": 60.0,
        }
        for seed in (1, 2)
        for graphs, acc in (("auto", 0.8), ("off", 0.7))
    ]
    table = untracked.lever_table(runs)
    assert "| batch | auto | default | 2 | 1,2 | 80.00 ± 0.00 |" in table
    assert "| batch | off |  | 2 | 1,2 | 70.00 ± 0.00 | -10.00 ± 0.00 (2 seeds) | no |" in table
