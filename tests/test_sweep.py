"""Sweeps: trials from a grid string or file in both modes, the model-shape levers, bad grids
(one line, no run), and a real sweep through `mlflow run -e sweep` that reuses its trials."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from conftest import REPO, VAL_SIZE, mlflow_run, run_in_process
from mlflow.tracking import MlflowClient

from pipeline import config, workflow
from pipeline.cli import cli
from pipeline.config import ConfigError, TrainConfig
from pipeline.model import MAX_PARAMETERS, count_parameters
from pipeline.sweep import parse_grid, trials
from pipeline.training import build_model


def _names(found) -> list[str]:
    return [trial.name for trial in found]


def test_grid_mode_trains_every_combination_for_every_norm_and_seed():
    found, swept = trials(
        "learning_rate=0.1,0.4;label_smoothing=0,0.1", norms=["batch", "layer"], seeds=2
    )
    assert swept == ["learning_rate", "label_smoothing"]
    assert len(found) == 2 * 2 * 2 * 2  # lr x smoothing x norms x seeds
    assert "train-layer-seed2-learning_rate=0.4,label_smoothing=0" in _names(found)
    trial = next(
        t for t in found if t.name == "train-layer-seed2-learning_rate=0.4,label_smoothing=0"
    )
    assert (trial.config.learning_rate, trial.config.label_smoothing) == (0.4, 0.0)
    assert (trial.config.norm, trial.config.seed) == ("layer", 2)


def test_one_at_a_time_trains_the_defaults_and_each_value_alone():
    found, _ = trials(
        "learning_rate=0.1,0.2,0.4;label_smoothing=0", norms=["group"], seeds=1,
        mode="one-at-a-time",
    )  # fmt: skip
    # learning_rate=0.2 is the default: that trial is the baseline, trained once.
    assert _names(found) == [
        "train-group-seed1",
        "train-group-seed1-learning_rate=0.1",
        "train-group-seed1-learning_rate=0.4",
        "train-group-seed1-label_smoothing=0",
    ]
    assert found[0].config == TrainConfig(norm="group", seed=1)


def test_the_sweeps_recipe_is_what_each_trial_overrides():
    found, _ = trials("ema=0.99", norms=["batch"], seeds=1, mode="one-at-a-time", epochs=3)
    assert [t.config.epochs for t in found] == [3, 3]
    assert [t.config.ema for t in found] == [0.0, 0.99]


def test_a_value_holding_commas_is_separated_by_bars():
    assert parse_grid("widths=C2=24,C7=24|C1=8;order=act-norm") == {
        "widths": ["C2=24,C7=24", "C1=8"],
        "order": ["act-norm"],
    }


def test_grid_file_adds_values_per_norm(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "grid:\n  whiten: [true]\nnorms:\n  group:\n    groups: [2, 8]\n"
        "  batch:\n    standardize: [true]\n"
    )
    found, swept = trials(str(grid), norms=["batch", "group"], seeds=1, mode="one-at-a-time")
    assert swept == ["whiten", "standardize", "groups"]
    assert _names(found) == [
        "train-batch-seed1",
        "train-batch-seed1-whiten=true",
        "train-batch-seed1-standardize=true",
        "train-group-seed1",
        "train-group-seed1-whiten=true",
        "train-group-seed1-groups=2",
        "train-group-seed1-groups=8",
    ]
    assert found[1].config.whiten is True and found[2].config.standardize == "true"


SWEEP_FILES = {
    "levers.yaml": {"widths", "order", "standardize", "groups", "learning_rate"},
    "round2.yaml": {"residual", "conv_groups", "widths", "groups", "learning_rate", "ema"},
    "round3.yaml": {"optimizer", "muon_lr", "muon_momentum", "activation", "pool"},
    "batch-dependence.yaml": {"norm_batch"},
    "none-recipe.yaml": {"learning_rate"},
    "round4-pool.yaml": {"pool"},
    "round4-steps.yaml": {"batch_size", "learning_rate", "muon_lr"},
    "round4-average.yaml": {"ema"},
    "round4-augment.yaml": {"translate", "cutout", "label_smoothing"},
    "round4-muon.yaml": {"muon_ns_steps", "muon_pointwise"},
    "round4-last.yaml": {
        "muon_lr",
        "batch_size",
        "label_smoothing",
        "activation",
        "standardize",
        "residual",
    },
}


@pytest.mark.parametrize("name", sorted(SWEEP_FILES))
@pytest.mark.parametrize("mode", ["one-at-a-time", "grid"])
def test_every_trial_of_the_sweep_files_builds_within_the_budget(name, mode):
    assert sorted(path.name for path in (REPO / "sweeps").glob("*.yaml")) == sorted(SWEEP_FILES)
    found, swept = trials(
        str(REPO / "sweeps" / name),
        norms=["batch", "group", "layer"],
        seeds=1,
        mode=mode,
        max_trials=100_000,
    )
    assert SWEEP_FILES[name] <= set(swept)
    for trial in found:
        parameters = count_parameters(build_model(trial.config))
        assert parameters <= MAX_PARAMETERS, trial.name


BAD_GRIDS = [
    ("", "grid is empty"),
    (";", "grid is empty"),
    ("lr=0.1", "grid: 'lr' is not a train parameter"),
    ("seed=1,2", "grid: 'seed' is not a train parameter"),
    ("learning_rate=", "grid entries are key=value,value,... (got 'learning_rate=')"),
    ("learning_rate=0.1,fast", "grid: learning_rate takes float values (got 'fast')"),
    (
        "learning_rate=0.1,20",
        "grid: learning_rate=20: learning_rate must be 0 (the norm's recipe) or in (0, 10] "
        "(got 20)",
    ),
    ("order=sideways", "grid: order=sideways: order must be one of norm-act, act-norm"),
    ("whiten=maybe", "grid: whiten takes bool values (got 'maybe')"),
    ("widths=C2=64", "the model has 54,730 parameters; the limit is 50,000 (widths C2=64)"),
    ("widths=C11=8", "widths: C11 is not a conv layer whose width can change"),
    ("groups=3", "groups must divide the channels of every layer: C1 has 16 channels"),
    ("conv_groups=3", "conv_groups must divide the input and output channels of C2..C9"),
    ("residual=maybe", "grid: residual takes bool values (got 'maybe')"),
    ("missing.yaml", "grid file 'missing.yaml' does not exist"),
    (
        "learning_rate=0.1,0.2,0.3,0.4,0.5;label_smoothing=0,0.05,0.1,0.15,0.2",
        "the sweep has 50 trials, more than max_trials=40",
    ),
]


@pytest.mark.parametrize(("grid", "message"), BAD_GRIDS, ids=[g or "empty" for g, _ in BAD_GRIDS])
def test_bad_grids_are_one_line_and_create_no_run(
    tracking_store, image_folder, grid, message, monkeypatch, capsys
):
    code, stderr = run_in_process(
        monkeypatch, capsys, "sweep", "--grid", grid, "--norm", "group,layer", "--seeds", "1",
        "--max-trials", "40", "--data", str(image_folder),
    )  # fmt: skip
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_per_norm_values_for_a_norm_not_swept_are_refused(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  ema: [0.99]\nnorms:\n  group:\n    groups: [8]\n")
    with pytest.raises(ConfigError, match="per-norm values for group, which this sweep does not"):
        trials(str(grid), norms=["batch"], seeds=1)


def test_a_model_over_the_budget_fails_a_study_before_any_run(tracking_store, monkeypatch, capsys):
    code, stderr = run_in_process(monkeypatch, capsys, "main", "--widths", "C8=64,C9=64")
    assert code == 1
    assert "the model has" in stderr and "the limit is 50,000 (widths C8=64,C9=64)" in stderr
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_model_shape_levers_reach_the_model():
    config = TrainConfig(
        norm="layer", widths=" C2=24 , C7=24", order="act-norm", standardize="FALSE"
    )
    assert config.widths == "C2=24,C7=24" and config.standardize == "false"
    model = build_model(config)
    parameters = count_parameters(model)
    assert model.C2.conv.out_channels == 24 and model.C7.conv.out_channels == 24
    assert type(model.C2.conv).__name__ == "Conv2d"  # standardize=false: no WSConv2d
    assert list(dict(model.C2.named_children())) == ["conv", "relu", "norm"]  # act-norm
    assert parameters < MAX_PARAMETERS
    assert type(build_model(TrainConfig(norm="layer")).C2.conv).__name__ == "WSConv2d"
    with pytest.raises(ConfigError, match="widths are LAYER=CHANNELS pairs"):
        TrainConfig(widths="C2:24")


def test_relative_data_reaches_the_steps_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert workflow.step_data("data") == str(tmp_path / "data")
    assert workflow.step_data("~/.cache/not-there") == "~/.cache/not-there"


# --------------------------------------------------------------------------- a real sweep

SWEEP = {
    "grid": "learning_rate=0.4;label_smoothing=0",
    "mode": "one-at-a-time",
    "norm": "batch",
    "epochs": 1,
    "warmup_epochs": 0.5,
    "batch_size": 32,
    "val_size": VAL_SIZE,
    "parallel": 2,
}


@pytest.mark.slow
def test_sweep_nests_a_train_run_per_trial_reports_levers_and_reuses_finished_trials(
    tracking_store, image_folder
):
    first = mlflow_run("sweep", {**SWEEP, "seeds": 1, "data": image_folder})
    assert first.returncode == 0, first.stderr[-3000:]
    second = mlflow_run("sweep", {**SWEEP, "seeds": 2, "data": image_folder})  # one more seed
    assert second.returncode == 0, second.stderr[-3000:]

    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time ASC"])
    parents = runs[runs["tags.mlflow.runName"] == "sweep"].reset_index(drop=True)
    assert len(parents) == 2 and set(parents["status"]) == {"FINISHED"}
    children = runs[runs["tags.mlflow.parentRunId"] == parents.loc[1, "run_id"]]
    names = set(children["tags.mlflow.runName"])
    trained = {
        f"train-batch-seed{seed}{suffix}"
        for seed in (1, 2)
        for suffix in ("", "-learning_rate=0.4", "-label_smoothing=0")
    }
    assert names == {"prepare-stats", "compare", *trained}
    assert set(runs["status"]) == {"FINISHED"}
    # seed 1's trials (and prepare-stats) come from the first sweep; seed 2's are new
    reused = children.set_index("tags.mlflow.runName")["tags.reused_run_id"].fillna("")
    assert {name for name in names if reused[name]} == {
        "prepare-stats",
        *(name for name in trained if "seed1" in name),
    }
    assert "reusing finished run" in second.stdout
    # trials are plain train runs, not registered
    assert client.search_registered_models() == []
    lr_runs = runs[runs["params.learning_rate"] == "0.4"]
    assert len(lr_runs) == 2 and set(lr_runs["tags.step"]) == {"train"}
    # the report is the lever table over the swept parameters, gains paired by seed
    report = Path(
        mlflow.artifacts.download_artifacts(f"runs:/{parents.loc[1, 'run_id']}/comparison")
    )
    text = (report / "report.md").read_text()
    assert "| norm | learning_rate | label_smoothing |" in text
    assert "(2 seeds)" in text
    assert (report / "report.html").is_file()


def test_variants_set_levers_together_in_one_trial(tmp_path):
    spec = tmp_path / "together.yaml"
    spec.write_text(
        "grid:\n  residual: [true]\n"
        "variants:\n  - {conv_groups: 2, widths: 'C4=48,C5=48'}\n"
        "norms:\n  group:\n    variants:\n      - {groups: 8, label_smoothing: 0}\n"
    )
    found, swept = trials(str(spec), norms=["batch", "group"], seeds=1, mode="one-at-a-time")
    assert swept == ["residual", "conv_groups", "widths", "groups", "label_smoothing"]
    names = [trial.name for trial in found]
    assert names == [
        "train-batch-seed1",
        "train-batch-seed1-residual=true",
        "train-batch-seed1-conv_groups=2,widths=C4=48,C5=48",
        "train-group-seed1",
        "train-group-seed1-residual=true",
        "train-group-seed1-conv_groups=2,widths=C4=48,C5=48",
        "train-group-seed1-groups=8,label_smoothing=0",
    ]
    grouped = found[2].config
    assert grouped.conv_groups == 2 and grouped.widths == "C4=48,C5=48"
    assert found[6].config.groups == 8 and found[6].config.label_smoothing == 0
    spec.write_text("variants:\n  - {conv_groups: 3}\n")
    found, _ = trials(str(spec), norms=["batch"], seeds=1)
    with pytest.raises(ConfigError, match="conv_groups must divide .* C2 has 16 in, 24 out"):
        workflow.check_models([trial.config for trial in found])  # before any run starts


# --------------------------------------------------------------------------- per-norm recipe


def test_batch_size_zero_is_the_norms_recipe_and_runs_log_the_value_they_train_with():
    for norm, recipe in config.RECIPES.items():
        trained = TrainConfig(norm=norm)
        assert trained.batch_size == recipe["batch_size"]
        assert trained.as_params()["batch_size"] == str(recipe["batch_size"])
    assert TrainConfig(norm="layer").batch_size == 128
    assert TrainConfig(norm="layer", batch_size=64).batch_size == 64  # an explicit value wins
    with pytest.raises(ConfigError, match=r"batch_size must be 0 \(the norm's recipe\) or"):
        TrainConfig(batch_size=1)


def test_optimizer_auto_is_the_norms_recipe_and_runs_log_the_optimizer_they_train_with():
    for norm, recipe in config.RECIPES.items():
        trained = TrainConfig(norm=norm)
        assert trained.optimizer == recipe["optimizer"] in config.OPTIMIZERS
        assert trained.as_params()["optimizer"] == recipe["optimizer"]
    # chosen on the validation split; a norm without a sweep of its own takes the shared sgd
    assert [TrainConfig(norm=norm).optimizer for norm in config.STUDY_NORMS] == ["muon"] * 3
    assert TrainConfig(norm="instance").optimizer == "sgd"
    assert TrainConfig(norm="batch", optimizer="sgd").optimizer == "sgd"  # explicit wins
    found, _ = trials("optimizer=sgd", norms=("batch", "instance"), seeds=1, mode="one-at-a-time")
    # sgd is a lever for batch norm (its recipe is muon) and instance norm's default trial
    assert [(trial.name, trial.config.optimizer) for trial in found] == [
        ("train-batch-seed1", "muon"),
        ("train-batch-seed1-optimizer=sgd", "sgd"),
        ("train-instance-seed1", "sgd"),
    ]


def test_pool_auto_is_the_norms_recipe_and_a_sweep_pairs_against_it():
    for norm, recipe in config.RECIPES.items():
        trained = TrainConfig(norm=norm)
        assert trained.pool == recipe["pool"] in config.POOLS
        assert trained.as_params()["pool"] == recipe["pool"]
    # average pooling was adopted for all three study norms on the validation split
    assert [TrainConfig(norm=norm).pool for norm in config.STUDY_NORMS] == ["avg", "avg", "avg"]
    assert TrainConfig(norm="layer", pool="max").pool == "max"  # an explicit value wins
    assert type(build_model(TrainConfig(norm="layer")).P1).__name__ == "AvgPool2d"
    found, _ = trials("pool=max", norms=("instance", "layer"), seeds=1, mode="one-at-a-time")
    # max is instance norm's default trial and a lever for layer norm (its recipe is avg)
    assert [(trial.name, trial.config.pool) for trial in found] == [
        ("train-instance-seed1", "max"),
        ("train-layer-seed1", "avg"),
        ("train-layer-seed1-pool=max", "max"),
    ]


def test_activation_auto_is_the_norms_recipe_and_a_sweep_pairs_against_it():
    for norm, recipe in config.RECIPES.items():
        trained = TrainConfig(norm=norm)
        assert trained.activation == recipe["activation"] in config.ACTIVATIONS
        assert trained.as_params()["activation"] == recipe["activation"]
    # SiLU was adopted for batch and group norm on the validation split; the rest keep ReLU
    assert [TrainConfig(norm=norm).activation for norm in config.STUDY_NORMS] == [
        "silu",
        "silu",
        "relu",
    ]
    assert TrainConfig(norm="batch", activation="relu").activation == "relu"  # explicit wins
    assert type(build_model(TrainConfig(norm="batch")).C1.silu).__name__ == "SiLU"
    found, _ = trials("activation=relu", norms=("batch", "layer"), seeds=1, mode="one-at-a-time")
    # relu is a lever for batch norm (its recipe is silu) and layer norm's default trial
    assert [(trial.name, trial.config.activation) for trial in found] == [
        ("train-batch-seed1", "silu"),
        ("train-batch-seed1-activation=relu", "relu"),
        ("train-layer-seed1", "relu"),
    ]


def test_learning_rate_zero_is_the_norms_recipe_and_a_sweep_pairs_against_it():
    """A norm whose recipe holds a peak learning rate (none: 0.05) trains with it when
    learning_rate is left at 0; the grid's shared 0.2 is then a lever for it and the other
    norm's default trial."""
    rates = {norm: TrainConfig(norm=norm).learning_rate for norm in config.NORMS}
    assert rates == {**dict.fromkeys(config.NORMS, 0.2), "none": 0.05}
    trained = TrainConfig(norm="none")
    assert trained.learning_rate == 0.05 and trained.as_params()["learning_rate"] == "0.05"
    assert TrainConfig(norm="none", learning_rate=0).learning_rate == 0.05  # 0 as an int too
    assert TrainConfig(norm="none", learning_rate=0.1).learning_rate == 0.1  # explicit wins
    found, _ = trials("learning_rate=0.2", norms=("none", "batch"), seeds=1, mode="one-at-a-time")
    assert [(trial.name, trial.config.learning_rate) for trial in found] == [
        ("train-none-seed1", 0.05),
        ("train-none-seed1-learning_rate=0.2", 0.2),
        ("train-batch-seed1", 0.2),
    ]
    with pytest.raises(ConfigError, match=r"^learning_rate must be 0 \(the norm's recipe\) or in"):
        TrainConfig(learning_rate=-0.1)
    with pytest.raises(ConfigError, match=r"^learning_rate must be a number \(got True\)$"):
        TrainConfig(learning_rate=True)


def test_a_sweep_over_batch_size_keeps_each_norms_default_once(monkeypatch):
    """With batch norm's recipe at batch 256 and layer norm's at 128, the grid's 128 is a lever
    for batch norm and layer norm's default trial."""
    monkeypatch.setitem(config.RECIPES, "batch", {**config.RECIPES["batch"], "batch_size": 256})
    found, _ = trials("batch_size=128", norms=("batch", "layer"), seeds=1, mode="one-at-a-time")
    names = [trial.name for trial in found]
    assert names == ["train-batch-seed1", "train-batch-seed1-batch_size=128", "train-layer-seed1"]
    assert [trial.config.batch_size for trial in found] == [256, 128, 128]


def test_train_help_names_each_norms_batch_size():
    result = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    recipes = ", ".join(f"{norm} {recipe['batch_size']}" for norm, recipe in config.RECIPES.items())
    assert recipes.startswith("batch 128, group 256, layer 128, instance 128")
    assert f"0: the norm's recipe ({recipes})." in " ".join(result.output.split())
    rates = ", ".join(f"{norm} {0.05 if norm == 'none' else 0.2}" for norm in config.RECIPES)
    assert f"schedule; 0: the norm's recipe ({rates})." in " ".join(result.output.split())


def test_the_batch_dependence_sweep_varies_batch_norms_statistics_only():
    found, swept = trials(
        str(REPO / "sweeps" / "batch-dependence.yaml"),
        norms=("batch", "group", "layer"),
        seeds=3,
    )
    assert swept == ["norm_batch"] and len(found) == 6 * 3 + 3 + 3
    batch = [trial.config for trial in found if trial.config.norm == "batch"]
    assert sorted({c.norm_batch for c in batch}) == [0, 2, 4, 8, 16, 32]
    # The optimizer batch, the schedule and the steps stay the recipe's.
    assert {(c.batch_size, c.epochs, c.learning_rate) for c in batch} == {(128, 20, 0.2)}
    others = [trial for trial in found if trial.config.norm != "batch"]
    assert {t.name for t in others} == {
        f"train-{norm}-seed{seed}" for norm in ("group", "layer") for seed in (1, 2, 3)
    }
    assert all(t.config.norm_batch == 0 for t in others)
