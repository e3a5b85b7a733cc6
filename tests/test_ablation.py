"""scripts/ablation.py: the combination rule, and a tiny end-to-end run of the script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# Importable by name: the script's worker processes (spawn) import it again from sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ablation  # noqa: E402


def _record(norm, name, seed, acc, stage=1):
    return {"stage": stage, "norm": norm, "name": name, "seed": seed, "test_acc": acc}


def test_combination_takes_the_best_paying_value_of_each_knob_on_shared_seeds():
    records = [
        _record("group", "baseline", 1, 0.800),
        _record("group", "baseline", 2, 0.810),
        _record("group", "learning rate 0.1", 1, 0.805),  # +0.5 on seed 1
        _record("group", "learning rate 0.4", 1, 0.809),  # +0.9: the better lr wins
        _record("group", "learning rate 0.4", 2, 0.819),
        _record("group", "cutout 8", 1, 0.801),  # +0.1: below the 0.15 threshold
        _record("group", "groups 8", 2, 0.780),  # loses
        _record("group", "ema 0.998", 3, 0.990),  # no seed shared with the baseline
    ]
    table = ablation.scores(records)
    assert ablation.gain(table, "group", "learning rate 0.4") == (pytest.approx(0.9), 2)
    name, config, model, chosen = ablation.combine(table, "group", min_gain=0.15)
    assert chosen == ["learning rate 0.4"]
    assert config == {"learning_rate": 0.4} and model == {}
    assert name == "combined: learning rate 0.4"


def test_tiny_study_runs_both_stages_and_reports_them(image_folder, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    code = ablation.main(
        [
            "--data", str(image_folder), "--norms", "layer", "--epochs", "1",
            "--seeds", "1", "--final-seeds", "1,2", "--min-gain", "-100",
            "--only", "cutout 8", "--batch-size", "32", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["stage"], r["name"], r["seed"]) for r in records} == {
        (1, "baseline", 1),
        (1, "cutout 8", 1),
        (2, "combined: cutout 8", 1),
        (2, "combined: cutout 8", 2),
        (2, "baseline", 2),  # seed 1's baseline is reused from stage 1
    }
    assert "| layer | combined: cutout 8 | 48,250 | 2 |" in capsys.readouterr().out
    assert all(0 <= r["test_acc"] <= 1 and r["params"] <= 50_000 for r in records)
