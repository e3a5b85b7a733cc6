"""The project's files agree with each other: MLproject <-> click options, conda.yaml <->
pyproject.toml."""

import dataclasses
import re
import shlex

import click
import pytest
import tomllib
import yaml
from conftest import REPO

from pipeline.cli import cli
from pipeline.config import TrainConfig

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def _command_name(entry: dict) -> str:
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "pipeline"], entry["command"]
    return words[3]


def _same_default(declared, default) -> bool:
    if isinstance(default, int | float) and not isinstance(default, bool):
        return float(declared) == float(default)
    return str(declared) == str(default)


def _disagreements(entry_point: str) -> list[str]:
    """What an entry point's parameters and its command's click options disagree on: a
    parameter with no option, not passed on, or with another default; an option MLflow could
    not pass an undeclared `-P name=value` to (`--name value`)."""
    entry = ENTRY_POINTS[entry_point]
    command = cli.commands[_command_name(entry)]
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    problems = []
    for name, spec in (entry.get("parameters") or {}).items():
        if name not in options:
            problems.append(f"{entry_point}: parameter {name} is no option of the command")
            continue
        # One spelling everywhere: parameter `learning_rate` is option `--learning-rate`.
        if f"--{name.replace('_', '-')}" not in options[name].opts:
            problems.append(f"{entry_point}: {name} has no option --{name.replace('_', '-')}")
        if f"{{{name}}}" not in entry["command"]:
            problems.append(f"{entry_point}: parameter {name} is not passed on")
        if isinstance(spec, dict) and "default" in spec:
            if not _same_default(spec["default"], options[name].default):
                problems.append(
                    f"{entry_point}: {name} defaults to {spec['default']!r} in MLproject, "
                    f"{options[name].default!r} on the command line"
                )
    for name, option in options.items():
        if f"--{name}" not in option.opts:
            problems.append(f"{entry_point}: an undeclared -P {name}=... finds no --{name}")
    return problems


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_mlproject_parameters_are_the_click_options(entry_point):
    assert _disagreements(entry_point) == []


# The train settings a study or sweep sets itself (each norm, each seed), or names one run.
NOT_PASSED = {"main": {"norm", "seed", "resume"}, "sweep": {"norm", "seed", "resume"}}


@pytest.mark.parametrize("command_name", ["train", "main", "sweep"])
def test_every_train_setting_is_an_option_with_the_config_default(command_name):
    """TrainConfig's fields are the settings: each is an option of `train`, `main` and
    `sweep` (but those they set themselves), with the field's default."""
    options = {p.name: p for p in cli.commands[command_name].params}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    problems = []
    for name, field in fields.items():
        if name in NOT_PASSED.get(command_name, ()):
            continue
        if name not in options:
            problems.append(f"{command_name}: setting {name} has no option")
        elif not (command_name == "sweep" and name == "registered_model"):
            if not _same_default(field.default, options[name].default):
                problems.append(
                    f"{command_name}: {name} defaults to {options[name].default!r}, the "
                    f"config to {field.default!r}"
                )
    if command_name == "train":
        extra = sorted(set(options) - set(fields))
        problems += [f"train: option {name} is no TrainConfig field" for name in extra]
    assert problems == []


def test_the_agreement_tests_name_what_disagrees(monkeypatch):
    """A parameter the command lacks, or one with another default, is named."""
    entry = ENTRY_POINTS["train"]
    parameters = {**entry["parameters"], "lr_typo": {"type": "float", "default": 1}}
    parameters["epochs"] = {"type": "float", "default": 7}
    monkeypatch.setitem(ENTRY_POINTS, "train", {**entry, "parameters": parameters})
    assert _disagreements("train") == [
        "train: epochs defaults to 7 in MLproject, 20 on the command line",
        "train: parameter lr_typo is no option of the command",
    ]


def test_conda_environment_lists_what_the_package_needs():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_names = {re.split(r"[<>=!~ ]", spec)[0].lower() for spec in pip_section}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {re.split(r"[<>=!~ \[]", spec)[0].lower() for spec in project["dependencies"]}
    assert needed <= conda_names, f"missing from conda.yaml: {sorted(needed - conda_names)}"
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.startswith("python=3.1")


def test_mlproject_declares_the_entry_points_and_environment():
    assert {"prepare-stats", "train", "evaluate"} <= set(ENTRY_POINTS)
    assert MLPROJECT["conda_env"] == "conda.yaml"


def _private_mlflow_uses(path) -> list[str]:
    """Imports and attribute chains that reach into MLflow's insides: a module or name with a
    leading underscore under `mlflow`, or `mlflow.projects.utils`."""
    import ast

    found = []

    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        hidden = [part for part in parts if part.startswith("_") and not part.endswith("__")]
        return parts[0] == "mlflow" and (bool(hidden) or dotted.startswith("mlflow.projects.utils"))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [name for name in names if private(name)]
        elif isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                dotted = ".".join([value.id, *reversed(chain)])
                if private(dotted):
                    found.append(dotted)
    return [f"{path.relative_to(REPO)}: {use}" for use in found]


def test_the_project_uses_mlflow_through_its_public_api_only():
    files = [
        *REPO.glob("pipeline/**/*.py"),
        *REPO.glob("scripts/**/*.py"),
        *REPO.glob("tests/*.py"),
    ]
    uses = [use for path in sorted(files) for use in _private_mlflow_uses(path)]
    assert uses == []
    # and the rule itself catches what it must
    probe = REPO / "tests" / "__probe_private_mlflow__.py"
    try:
        probe.write_text(
            "from mlflow.tracking._tracking_service import utils\n"
            "import mlflow.projects.utils\n"
            "mlflow.data.dataset_source_registry._x\n"
        )
        assert len(_private_mlflow_uses(probe)) == 3
    finally:
        probe.unlink()


def test_no_mlflow_plugin_is_registered_by_this_package():
    """Installing the package changes nothing in how other MLflow programs open their stores."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = project.get("entry-points", {})
    assert not [group for group in groups if group.startswith("mlflow.")]


def test_every_module_of_the_package_sits_in_a_declared_layer():
    """`lint-imports` checks only the modules its layers name: a module left out of them could
    import upwards unseen, so every module and subpackage of `pipeline` must be named."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c["layers"] for c in contracts["contracts"] if c["type"] == "layers"]
    declared = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    package = REPO / "pipeline"
    top = {
        f"pipeline.{path.stem if path.is_file() else path.name}"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    assert sorted(top - declared) == []
    assert sorted(declared - top) == []
