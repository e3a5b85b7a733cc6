"""Every entry point end to end through `mlflow run . --env-manager local`, asserting what
was logged; and bad input: one line, non-zero exit, no run left RUNNING."""

import json

import mlflow.pytorch
import pytest
import torch
from conftest import VAL_SIZE, mlflow_run, run_cli, run_in_process
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.config import DEFAULT_EXPERIMENT, ConfigError, EvalConfig
from pipeline.engine import EpochMetrics

EPOCH_METRICS = [name for name in EpochMetrics.__dataclass_fields__ if name != "epoch"]


def _runs(client):
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


def _artifacts(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_train_and_evaluate_end_to_end_through_mlflow_run(tracking_store, image_folder):
    client = MlflowClient()

    # prepare-stats runs through `mlflow run` in every `main` study (tests/test_study.py);
    # here, in this process, to save an interpreter start.
    cli.cli.main(["prepare-stats", f"--data={image_folder}"], standalone_mode=False)
    (stats_run,) = _runs(client)
    assert stats_run.info.status == "FINISHED"
    assert len(stats_run.data.params["mean"].split(",")) == 3
    assert {"stats.json", "samples/train_per_class.png"} <= set(
        _artifacts(client, stats_run.info.run_id)
    )

    trained = mlflow_run(
        "train",
        {
            "norm": "layer",
            "epochs": 2,
            "batch_size": 32,
            "data": image_folder,
            "seed": 5,
            "val_size": VAL_SIZE,
        },
    )
    _assert_ok(trained)
    train_run = next(r for r in _runs(client) if r.data.tags.get("step") == "train")
    run_id = train_run.info.run_id
    assert train_run.info.status == "FINISHED"
    assert train_run.data.tags["mlflow.runName"] == "train-layer-seed5"
    assert train_run.data.tags["norm"] == "layer"
    params = train_run.data.params
    assert params["norm"] == "layer" and params["epochs"] == "2" and params["seed"] == "5"
    assert 40_000 < int(params["num_params"]) <= 50_000
    assert int(params["receptive_field"]) > 30
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    accuracies = [m.value for m in client.get_metric_history(run_id, "test_acc")]
    assert all(0.0 <= value <= 1.0 for value in accuracies)
    artifacts = set(_artifacts(client, run_id))
    assert {
        "plots/misclassified.png",
        "plots/curves.png",
        "model_summary.txt",
        "receptive_field.json",
        "stats.json",
        "checkpoint/last.pt",
    } <= artifacts
    assert train_run.inputs.dataset_inputs, "the dataset was not logged"

    (version,) = client.search_model_versions("name = 'cifar10-layer'")
    assert version.run_id == run_id and str(version.version) == "1"
    assert version.tags["norm"] == "layer" and version.tags["seed"] == "5"
    final_acc = train_run.data.metrics["test_acc"]
    assert float(version.tags["test_acc"]) == pytest.approx(final_acc, abs=1e-4)
    assert str(client.get_model_version_by_alias("cifar10-layer", "champion").version) == "1"

    evaluated = mlflow_run(
        "evaluate", {"model_uri": "models:/cifar10-layer/1", "data": image_folder}
    )
    _assert_ok(evaluated)
    # The run's own model, in this process (`@champion` is evaluated in tests/test_study.py).
    cli.cli.main(
        ["evaluate", f"--model-uri=runs:/{run_id}/model", f"--data={image_folder}"],
        standalone_mode=False,
    )
    evaluations = [r for r in _runs(client) if r.data.tags.get("step") == "evaluate"]
    assert len(evaluations) == 2
    for evaluation in evaluations:
        assert evaluation.info.status == "FINISHED"
        assert evaluation.data.tags["source_run_id"] == run_id
        # The same model on the same data: evaluate reproduces the training run's figure.
        assert evaluation.data.metrics["test_acc"] == pytest.approx(final_acc, abs=1e-6)
        assert len([k for k in evaluation.data.metrics if k.startswith("class_acc/")]) == 10
        files = set(_artifacts(client, evaluation.info.run_id))
        assert {"plots/confusion_matrix.png", "plots/misclassified.png", "evaluation.json"} <= files
    registered = next(e for e in evaluations if e.data.tags.get("model_version") == "1")
    assert registered.data.tags["model_name"] == "cifar10-layer"
    report = json.loads(
        open(client.download_artifacts(registered.info.run_id, "evaluation.json")).read()
    )
    assert sum(map(sum, report["confusion_matrix"])) == 60

    # Another test-time augmentation than the training run's: named so in the run list.
    cli.cli.main(
        ["evaluate", "--model-uri=models:/cifar10-layer/1", "--tta=none", f"--data={image_folder}"],
        standalone_mode=False,
    )
    (plain,) = [r for r in _runs(client) if r.data.params.get("tta") == "none"]
    assert plain.data.tags["mlflow.runName"] == "evaluate-cifar10-layer-v1-tta-none"
    assert registered.data.tags["mlflow.runName"] == "evaluate-cifar10-layer-v1"


@pytest.mark.slow
def test_train_compiled_from_cifar_pickles_without_registration(tracking_store, cifar_pickles):
    result = run_cli(
        "train",
        "--norm=group",
        "--groups=2",
        "--epochs=1",
        "--batch-size=32",
        f"--data={cifar_pickles}",
        "--registered-model=",
        "--compile=on",
        "--tta=none",
        f"--val-size={VAL_SIZE}",
    )
    _assert_ok(result)
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "FINISHED" and run.data.params["groups"] == "2"
    assert run.data.params["compile"] == "on"
    assert client.search_registered_models() == []
    # the compiled model is logged as a plain one, which loads and predicts like any other
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the model is logged in NCHW: a channels_last one makes torch.export's writer warn
    assert "No complete tensor" not in result.stderr


BAD_TRAIN = [
    (["--norm=weight"], "norm must be one of batch, group, layer, instance, none, frn (got 'we"),
    (["--norm-batch=-1"], "norm_batch must be 0 (the whole batch) or between 1 and 8192 (got -1)"),
    (["--norm-batch=48"], "norm_batch must divide batch_size 128 into equal groups (got 48)"),
    (["--norm=layer", "--norm-batch=4"], "norm_batch needs a norm with batch statistics (batch)"),
    (["--norm=group", "--groups=5"], "groups must divide the channels"),
    (["--norm=group", "--groups=0"], "groups must be >= 1 (got 0)"),
    (["--epochs=abc"], "'abc' is not a valid integer"),
    (["--epochs=0"], "epochs must be between 1 and 200 (got 0)"),
    (["--epochs=201"], "epochs must be between 1 and 200 (got 201)"),
    (["--batch-size=1"], "batch_size must be 0 (the norm's recipe) or between 2 and 8192 (got 1)"),
    (["--batch-size=4096"], "batch_size must be at most the training split's 200 images"),
    (["--val-size=200"], "val_size 200 leaves too few training images: class airplane would"),
    (["--learning-rate=-1"], "learning_rate must be 0 (the norm's recipe) or in (0, 10]"),
    (["--learning-rate=fast"], "'fast' is not a valid float"),
    (["--device=tpu"], "device must be one of auto, cpu, cuda, mps (got 'tpu')"),
    (["--translate=-2"], "translate must be -1 (the norm's recipe) or between 0 and 16 (got -2)"),
    (["--whiten=maybe"], "'maybe' is not a valid boolean"),
    (["--tta=mirror"], "tta must be one of none, flip, flip-translate (got 'mirror')"),
    (["--optimizer=adam"], "'adam' is not one of 'auto', 'sgd', 'muon'"),
    (["--activation=tanh"], "'tanh' is not one of 'auto', 'relu', 'silu', 'gelu', 'mish'"),
    (["--pool=min"], "'min' is not one of 'auto', 'max', 'avg'"),
    (["--muon-lr=0"], "muon_lr must be in (0, 10] (got 0)"),
    (["--muon-momentum=1"], "muon_momentum must be in [0, 1) (got 1)"),
    (["--data=/nonexistent/cifar"], "data path '/nonexistent/cifar' does not exist"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_TRAIN, ids=lambda v: str(v)[:40])
def test_bad_train_input_is_one_line_and_leaves_no_running_run(
    tracking_store, image_folder, arguments, message, monkeypatch, capsys
):
    code, stderr = run_in_process(
        monkeypatch,
        capsys,
        "train",
        "--epochs=1",
        f"--data={image_folder}",
        f"--val-size={VAL_SIZE}",
        *arguments,
    )
    assert code in (1, 2)
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr[-2000:]
    assert "Traceback" not in stderr
    assert all(r.info.status != "RUNNING" for r in _runs(MlflowClient()))
    assert MlflowClient().search_registered_models() == []


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_a_training_run_samples_system_metrics_unless_switched_off(
    tracking_store, image_folder, enabled, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", enabled)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    arguments = ["--epochs=2", "--batch-size=32", f"--val-size={VAL_SIZE}", "--registered-model="]
    cli.cli.main(["train", *arguments, f"--data={image_folder}"], standalone_mode=False)
    client = MlflowClient()
    (run,) = _runs(client)
    system = {key for key in run.data.metrics if key.startswith("system/")}
    if enabled == "false":
        assert system == set()
        return
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    samples = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(samples) >= 2


def test_runs_go_to_the_named_experiment_and_the_registry_describes_each_model(
    tracking_store, image_folder, monkeypatch
):
    arguments = ["train", "--epochs=1", "--batch-size=32", f"--val-size={VAL_SIZE}"]
    cli.cli.main([*arguments, f"--data={image_folder}"], standalone_mode=False)
    client = MlflowClient()
    (run,) = _runs(client)
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    model = client.get_registered_model("cifar10-batch")
    assert model.description.startswith("CIFAR-10 classifier with batch normalization")
    assert "uint8 RGB images N x 3 x 32 x 32" in model.description
    version = client.get_model_version("cifar10-batch", "1")
    assert version.description.startswith("Accuracy after its 1 epochs: validation ")
    assert run.info.run_id in version.description
    # MLFLOW_EXPERIMENT_NAME, as MLflow's own programs take it, names another one.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")
    arguments.append("--registered-model=")
    cli.cli.main([*arguments, f"--data={image_folder}"], standalone_mode=False)
    elsewhere = client.get_experiment_by_name("elsewhere")
    assert len(client.search_runs([elsewhere.experiment_id])) == 1


@pytest.mark.parametrize(
    ("arguments", "header"),
    [
        (["--norm=layer"], "layer norm, relu, avg pooling at P1 and P2"),  # its recipe's pool
        (["--norm=layer", "--pool=max"], "layer norm, relu, max pooling at P1 and P2"),
        (["--norm=group", "--activation=silu"], "group norm (4 groups), silu, avg pooling"),
        (["--norm=frn"], "frn norm, its own activation, max pooling at P1 and P2"),
    ],
)
def test_summary_names_the_blocks_it_resolved_before_the_layers(arguments, header, capsys):
    cli.cli.main(["summary", *arguments], standalone_mode=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(header) and lines[1].startswith("layer")
    assert lines[-1].split()[-1] in ("48,250", "48,506")


def test_evaluate_checks_its_tta_before_touching_the_store():
    with pytest.raises(ConfigError, match="tta must be one of none, flip, flip-translate"):
        EvalConfig(model_uri="models:/cifar10-batch/1", tta="mirror")
    assert EvalConfig(model_uri="models:/cifar10-batch/1").tta == ""  # the training run's


def test_bad_model_uris_name_the_uri(tracking_store, image_folder, monkeypatch, capsys):
    for uri, message in [
        ("models:/cifar10-batch/7", "does not resolve"),
        ("models:/cifar10-batch@champion", "does not resolve"),
        ("runs:/0123456789abcdef/model", "does not resolve"),
        ("cifar10-batch", "model_uri must look like"),
    ]:
        code, stderr = run_in_process(
            monkeypatch, capsys, "evaluate", f"--model-uri={uri}", f"--data={image_folder}"
        )
        assert code == 1
        assert stderr.strip().splitlines()[-1].startswith("error: "), stderr
        assert message in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_failure_under_mlflow_run_ends_the_run_failed(tracking_store, image_folder):
    result = mlflow_run("train", {"norm": "weight", "data": image_folder})
    assert result.returncode != 0
    assert "norm must be one of batch, group, layer, instance, none, frn (got 'weight')" in (
        result.stderr
    )
    (run,) = _runs(MlflowClient())
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_naming_it(image_folder):
    result = run_cli(
        "train", f"--data={image_folder}", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    )
    assert result.returncode != 0
    assert "cannot reach the MLflow tracking store at http://127.0.0.1:9" in result.stderr


def test_a_diverged_training_is_one_line_tagged_and_named_by_compare(
    tracking_store, image_folder, monkeypatch, capsys
):
    from pipeline import training

    def diverge(*_args, **_options):
        raise FloatingPointError("training diverged at epoch 1 (loss nan); lower learning_rate")

    monkeypatch.setattr(training, "fit", diverge)
    code, stderr = run_in_process(
        monkeypatch,
        capsys,
        "train",
        "--norm=none",
        "--epochs=1",
        f"--data={image_folder}",
        f"--val-size={VAL_SIZE}",
    )
    assert code == 1 and stderr.strip().splitlines()[-1] == (
        "error: training diverged at epoch 1 (loss nan); lower learning_rate"
    )
    [run] = _runs(MlflowClient())
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged"].startswith("training diverged at epoch 1")
    code, stderr = run_in_process(
        monkeypatch, capsys, "compare", f"--experiment-name={DEFAULT_EXPERIMENT}"
    )
    assert code == 1 and "no finished train runs to compare" in stderr
    assert "(1 diverged)" in stderr


def test_a_training_logs_its_resolved_recipe_and_resume_takes_the_runs_own_settings(
    tracking_store, image_folder, monkeypatch, capsys
):
    """`resolved.<name>` params say what "auto" and 0 became; `--resume` alone continues the
    run with its logged settings (its data, not the default path), and a setting given as
    well that differs from the run's is refused in one line."""
    arguments = ["--epochs=1", "--batch-size=32", f"--val-size={VAL_SIZE}", "--registered-model="]
    cli.cli.main(["train", *arguments, f"--data={image_folder}"], standalone_mode=False)
    client = MlflowClient()
    (run,) = _runs(client)
    params = run.data.params
    assert params["optimizer"] == "muon"  # logged resolved where no `mlflow run` logged it
    resolved = {key: value for key, value in params.items() if key.startswith("resolved.")}
    assert resolved == {
        "resolved.optimizer": "muon",
        "resolved.activation": "silu",
        "resolved.pool": "avg",
        "resolved.batch_size": "32",
        "resolved.learning_rate": params["learning_rate"],
        "resolved.muon_lr": "0.03",
        "resolved.translate": "4",
        "resolved.precision": resolved["resolved.precision"],
        "resolved.device": "cpu",
    }
    assert resolved["resolved.precision"] in ("fp32", "bf16")
    run_id = run.info.run_id

    code, stderr = run_in_process(monkeypatch, capsys, "train", f"--resume={run_id}", "--epochs=3")
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"error: resume {run_id} continues with the run's own settings; given otherwise: "
        "epochs=3 (the run's: 1)"
    )
    assert client.get_run(run_id).info.status == "FINISHED"

    # the same values given again, or none at all: the run's settings, its data included
    cli.cli.main(
        ["train", f"--resume={run_id}", "--batch-size=32", "--optimizer=auto"],
        standalone_mode=False,
    )
    assert [r.info.run_id for r in _runs(client)] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
