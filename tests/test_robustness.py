"""Robustness and calibration: `evaluate --corruptions` on tiny published-layout files and a
tiny generated suite, `--bn-stats test-batch`, each bad input in one line, compare's robustness
table and findings from synthetic records, and `main` passing the options to its evaluate steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import VAL_SIZE, run_in_process
from mlflow.tracking import MlflowClient

from pipeline import cli, corruptions, workflow
from pipeline.config import EvalConfig, TrainConfig
from pipeline.records import RunRecord
from pipeline.report import build_study, robustness_findings, robustness_table
from pipeline.report.robustness import readable_robustness_table

SUITE_IMAGES = 20  # per severity: the published files' N/5


def _train(norm: str, image_folder) -> str:
    cli.cli.main(
        [
            "train",
            f"--norm={norm}",
            "--epochs=1",
            "--batch-size=32",
            f"--val-size={VAL_SIZE}",
            "--registered-model=",
            f"--data={image_folder}",
        ],
        standalone_mode=False,
    )
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, f"params.norm = '{norm}'")
    return run.info.run_id


def _published(directory, names=("gaussian_noise", "fog"), *, extra=("saturate",), count=None):
    """Tiny CIFAR-10-C files: `names` (and `extra`), SUITE_IMAGES per severity."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 5 * SUITE_IMAGES
    for name in (*names, *extra):
        images = rng.integers(0, 256, size=(total, 32, 32, 3), dtype=np.uint8)
        np.save(directory / f"{name}.npy", images)
    labels = np.tile(np.arange(SUITE_IMAGES) % 10, 5)
    np.save(directory / "labels.npy", labels if count is None else labels[:count])
    return directory


def _evaluations(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {
        run.data.tags["mlflow.runName"]: run
        for run in client.search_runs(experiments, "tags.step = 'evaluate'")
    }


def _artifacts(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def test_evaluate_logs_the_suite_and_calibration_in_both_bn_stats_modes(
    tracking_store, image_folder, tmp_path, monkeypatch, capsys
):
    run_id = _train("batch", image_folder)
    published = _published(tmp_path / "cifar10-c")
    uri = f"runs:/{run_id}/model"
    base = ["evaluate", f"--model-uri={uri}", f"--data={image_folder}"]
    cli.cli.main([*base, f"--corruptions={published}"], standalone_mode=False)
    assert "missing from" in capsys.readouterr().out  # the 13 absent corruptions are named
    cli.cli.main(
        [*base, "--corruptions=generated", "--bn-stats=test-batch", "--bn-stats-batch=16"],
        standalone_mode=False,
    )
    client = MlflowClient()
    runs = _evaluations(client)
    label = run_id[:8]
    running, tested = runs[f"evaluate-{label}"], runs[f"evaluate-{label}-bn-test-batch"]
    assert (running.data.tags["bn_stats"], tested.data.tags["bn_stats"]) == (
        "running",
        "test-batch",
    )
    assert tested.data.params["bn_stats_batch"] == "16"
    for run in (running, tested):
        metrics = run.data.metrics
        for key in ("test_ece", "test_nll", "test_brier", "test_ece_calibrated"):
            assert 0 <= metrics[key] < 10, key
        assert metrics["temperature"] > 0
        assert "plots/reliability.png" in _artifacts(client, run.info.run_id)
        assert "corruptions.json" in _artifacts(client, run.info.run_id)
    # published: the 2 corruptions held, the extra apart, the missing ones tagged
    metrics = running.data.metrics
    cells = [key for key in metrics if key.startswith("corruption_acc/")]
    assert sorted(cells) == sorted(
        f"corruption_acc/{name}/{severity}"
        for name in ("gaussian_noise", "fog")
        for severity in corruptions.SEVERITIES
    )
    assert metrics["corruption_acc"] == pytest.approx(np.mean([metrics[c] for c in cells]), 1e-5)
    assert "corruption_ece" in metrics and "corruption_extra_acc/saturate/5" in metrics
    missing = running.data.tags["corruptions_missing"].split(",")
    assert len(missing) == 13 and "fog" not in missing
    table = json.loads(
        client.download_artifacts(running.info.run_id, "corruptions.json", str(tmp_path))
        and (tmp_path / "corruptions.json").read_text()
    )
    assert table["columns"] == ["corruption", "severity", "accuracy", "ece", "images"]
    assert len(table["data"]) == 10 and table["data"][0][-1] == SUITE_IMAGES
    # generated: every one of the 15 x 5 cells
    generated = [k for k in tested.data.metrics if k.startswith("corruption_acc/")]
    assert len(generated) == 75


def test_bad_input_is_one_line_and_leaves_no_run(
    tracking_store, image_folder, tmp_path, monkeypatch, capsys
):
    batch, layer = _train("batch", image_folder), _train("layer", image_folder)
    wrong_shape = _published(tmp_path / "shape", names=("fog",), extra=())
    np.save(wrong_shape / "fog.npy", np.zeros((100, 32, 32), dtype=np.uint8))
    wrong_dtype = _published(tmp_path / "dtype", names=("fog",), extra=())
    np.save(wrong_dtype / "fog.npy", np.zeros((100, 32, 32, 3), dtype=np.float32))
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # the trainings' output
    cases = [
        (batch, f"--corruptions={tmp_path / 'absent'}", "does not exist"),
        (batch, f"--corruptions={tmp_path / 'empty'}", "holds none of the 15 CIFAR-10-C files"),
        (batch, f"--corruptions={wrong_shape}", "expected uint8 images of shape (N, 32, 32, 3)"),
        (batch, f"--corruptions={wrong_dtype}", "expected uint8 images of shape (N, 32, 32, 3)"),
        (
            batch,
            f"--corruptions={_published(tmp_path / 'short', count=50)}",
            "holds 100 images but labels.npy has 50 labels",
        ),
        (layer, "--bn-stats=test-batch", "bn_stats=test-batch needs a norm with batch statistics"),
    ]
    for run_id, option, message in cases:
        code, stderr = run_in_process(
            monkeypatch,
            capsys,
            "evaluate",
            f"--model-uri=runs:/{run_id}/model",
            f"--data={image_folder}",
            option,
        )
        assert code == 1, option
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    client = MlflowClient()
    assert _evaluations(client) == {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")


def test_evaluate_refuses_a_model_without_a_validation_split(
    tracking_store, image_folder, monkeypatch, capsys
):
    cli.cli.main(
        ["train", "--norm=layer", "--epochs=1", "--batch-size=32", "--val-size=0"]
        + ["--registered-model=", f"--data={image_folder}"],
        standalone_mode=False,
    )
    client = MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    code, stderr = run_in_process(
        monkeypatch,
        capsys,
        "evaluate",
        f"--model-uri=runs:/{run.info.run_id}/model",
        f"--data={image_folder}",
    )
    assert code == 1 and "calibration needs the validation split" in stderr
    assert _evaluations(client) == {}


# --------------------------------------------------------------------------- compare


def _records(seeds=(1, 2, 3)) -> list[RunRecord]:
    """Train and evaluate records of batch and group norm with a suite of two corruptions:
    group norm loses less under corruption, batch norm's test-batch evaluations gain."""
    records = []
    for norm, clean, lost in (("batch", 0.90, 0.30), ("group", 0.88, 0.10)):
        for seed in seeds:
            train_id = f"{norm}-{seed}"
            records.append(
                RunRecord(
                    run_id=train_id,
                    run_name=f"train-{norm}-seed{seed}",
                    params={"norm": norm, "seed": str(seed), "val_digest": "v"},
                    tags={"step": "train"},
                )
            )
            modes = ("running", "test-batch") if norm == "batch" else ("running",)
            for mode in modes:
                drop = lost - (0.15 if mode == "test-batch" else 0) + 0.01 * seed
                cells = {
                    f"corruption_acc/{name}/{severity}": clean - drop * severity / 5
                    for name in ("fog", "snow")
                    for severity in corruptions.SEVERITIES
                }
                metrics = {
                    "test_acc": clean,
                    "corruption_acc": float(np.mean(list(cells.values()))),
                    "corruption_ece": 0.1,
                    "test_ece": 0.05 + 0.01 * seed,
                    "test_ece_calibrated": 0.02,
                    "temperature": 1.5,
                    **cells,
                }
                records.append(
                    RunRecord(
                        run_id=f"{train_id}-{mode}",
                        run_name=f"evaluate-{train_id}",
                        metrics=metrics,
                        tags={
                            "step": "evaluate",
                            "norm": norm,
                            "seed": str(seed),
                            "source_run_id": train_id,
                            "bn_stats": mode,
                        },
                    )
                )
    return records


def test_compare_tabulates_robustness_per_norm_and_test_batch_apart():
    study = build_study(_records(), {})
    table = robustness_table(study)
    assert list(table["label"]) == ["batch", "batch (test-batch stats)", "group"]
    assert list(table["models"]) == [3, 3, 3]
    relative = dict(zip(table["label"], table["relative_corruption_error_mean"], strict=True))
    assert relative["batch"] == pytest.approx(1.0)
    assert relative["group"] < 1 and relative["batch (test-batch stats)"] < 1
    readable = readable_robustness_table(table)
    assert list(readable.columns) == [
        "norm",
        "models",
        "seeds",
        "clean acc %",
        "corruption acc %",
        "ECE % (clean)",
        "ECE % after temperature",
        "ECE % (corrupted)",
        "relative corruption error",
        "temperature",
    ]
    notes = robustness_findings(study)
    assert notes[0].startswith("**group** norm degrades least under corruption")
    assert any("group against batch norm" in n and "passes the adoption rule" in n for n in notes)
    assert any(n.startswith("Test-batch statistics for batch norm") for n in notes)


def test_compare_without_a_suite_has_no_robustness_rows():
    records = [r for r in _records() if not r.run_id.endswith("test-batch")]
    records = [
        RunRecord(r.run_id, r.run_name, params=r.params, tags=r.tags, metrics={"test_acc": 0.9})
        for r in records
    ]
    study = build_study(records, {})
    assert robustness_table(study).empty and robustness_findings(study) == []


# --------------------------------------------------------------------------- main


def test_main_passes_the_evaluation_options_to_its_evaluate_steps(tmp_path):
    """A test-batch evaluation for the batch-statistics norms only; every model a running one;
    the suite and its settings in each step's parameters (what step reuse is keyed on)."""
    published = _published(tmp_path / "c")
    evaluation = workflow.study_evaluation(
        {"corruptions": str(published), "bn_stats": "test-batch", "eval_seed": 3},
        data="data",
        device="cpu",
    )
    steps = {
        step.name: step.parameters
        for norm in ("batch", "layer")
        for step in workflow._evaluate_steps(
            TrainConfig(norm=norm, val_size=VAL_SIZE),
            evaluation,
            model_uri=f"models:/cifar10-{norm}/1",
            run_id="r",
        )
    }
    assert set(steps) == {
        "evaluate-cifar10-batch-v1",
        "evaluate-cifar10-batch-v1-bn-test-batch",
        "evaluate-cifar10-layer-v1",
    }
    assert steps["evaluate-cifar10-batch-v1-bn-test-batch"]["bn_stats"] == "test-batch"
    assert steps["evaluate-cifar10-layer-v1"]["bn_stats"] == "running"
    for parameters in steps.values():
        assert parameters["corruptions"] == str(published) and parameters["eval_seed"] == "3"
        EvalConfig(**{**parameters, "batch_size": 0, "bn_stats_batch": 128, "eval_seed": 3})
    with pytest.raises(Exception, match="does not exist"):
        workflow.study_evaluation(
            {"corruptions": str(tmp_path / "nowhere")}, data="d", device="cpu"
        )


def test_main_has_the_evaluation_options():
    options = {p.name: p.default for p in cli.cli.commands["main"].params}
    assert options["corruptions"] == "none" and options["bn_stats"] == "running"
    assert set(workflow.STUDY_EVALUATION) <= set(options)
