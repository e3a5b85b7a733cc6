"""The project's files agree with each other: MLproject <-> click options, conda.yaml <->
pyproject.toml."""

import re
import shlex

import click
import pytest
import tomllib
import yaml
from conftest import REPO

from pipeline.cli import cli

MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def _command_name(entry: dict) -> str:
    words = shlex.split(entry["command"])
    assert words[:3] == ["python", "-m", "pipeline"], entry["command"]
    return words[3]


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_mlproject_parameters_are_the_click_options(entry_point):
    entry = ENTRY_POINTS[entry_point]
    command = cli.commands[_command_name(entry)]
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    parameters = entry.get("parameters", {})
    assert set(parameters) == set(options), "MLproject and CLI disagree on names"
    for name, spec in parameters.items():
        # One spelling everywhere: parameter `learning_rate` is option `--learning-rate`.
        assert f"--{name.replace('_', '-')}" in options[name].opts
        assert f"{{{name}}}" in entry["command"], f"{name} is not passed on"
        if isinstance(spec, dict) and "default" in spec:
            default = options[name].default
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert float(spec["default"]) == float(default), name
            else:
                assert str(spec["default"]) == str(default), name


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
