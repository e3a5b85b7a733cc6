"""scripts/benchmark.py runs end to end in --quick mode and reports every measurement, and every
step, epoch and evaluation it times is the norm's recipe as `train` builds it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_split_arrays
from PIL import Image
from torch import nn

from pipeline import batches, data, optim, training
from pipeline import device as devices
from pipeline.config import TTA_MODES, TrainConfig
from pipeline.norms import GhostBatchNorm2d

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
CLASSES = tuple(f"class{index}" for index in range(10))


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """train/<class>/*.png (20 a class) and test/<class>/*.png (5 a class), 32x32 RGB."""
    generator = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 20), ("test", 5)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                # A class-dependent tint, so the images are not pure noise.
                pixels = generator.integers(0, 128, (32, 32, 3)) + 12 * label
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(folder / f"{index}.png")
    return root


@pytest.fixture
def benchmark_script(monkeypatch: pytest.MonkeyPatch):
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    monkeypatch.setitem(sys.modules, "benchmark", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def built_trainings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TrainConfig, object]]:
    """Every `training.build_training` call from here on: (its recipe, the `engine.Training`)."""
    calls = []
    build_training = training.build_training

    def spy(model, recipe, **options):
        built = build_training(model, recipe, **options)
        calls.append((recipe, built))
        return built

    monkeypatch.setattr(training, "build_training", spy)
    return calls


@pytest.fixture
def tiny_splits():
    """(train split, test split, stats) of 240 / 60 synthetic images on the CPU."""
    arrays = make_split_arrays()
    cpu = torch.device("cpu")
    train = batches.to_device(arrays["train_images"], arrays["train_labels"], device=cpu)
    test = batches.to_device(arrays["test_images"], arrays["test_labels"], device=cpu)
    return train, test, data.compute_stats(arrays["train_images"])


def layer_types(model: nn.Module) -> set[type]:
    return {type(module) for module in model.modules()}


def numbers(row: str) -> list[float]:
    """The numeric cells of a Markdown table row ("1,234" and "+5.0%" included)."""
    cells = [cell.strip().replace(",", "").rstrip("%x") for cell in row.strip("|").split("|")]
    return [float(cell) for cell in cells if re.fullmatch(r"[+-]?\d+(\.\d+)?", cell)]


def test_quick_run_reports_every_measurement(
    benchmark_script,
    built_trainings,
    tiny_image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # One norm keeps the test fast: every norm runs the same code, only its default layout differs.
    norm = "group"
    arguments = ["--quick", "--data", str(tiny_image_folder), "--norms", norm]
    arguments += ["--batch-size", "16", "--workers", "1"]

    assert benchmark_script.main(arguments) == 0

    report = capsys.readouterr().out
    rows = report.splitlines()
    assert f"python scripts/benchmark.py {' '.join(arguments)}" in report
    assert "cached dataset load" in report
    for path in ("reference (1 worker)", "pipeline", "ceiling"):
        found = [line for line in rows if line.startswith(f"| {norm} | {path} |")]
        # the pipeline twice where the CPU has native bf16: in fp32 and in bf16 autocast
        assert 1 <= len(found) <= (2 if path == "pipeline" else 1), found
        assert all(numbers(row)[-1] > 0 for row in found), found  # images/s
    [ratios] = [line for line in rows if re.match(rf"\| {norm} \| [\d.]+x \|", line)]
    cells = [cell.strip() for cell in ratios.strip("|").split("|")]
    pipeline_per_reference, pipeline_per_ceiling = float(cells[1].rstrip("x")), float(cells[3])
    assert pipeline_per_reference > 0 and pipeline_per_ceiling > 0, ratios
    assert "%" in ratios  # the tracking overhead
    [tracking] = [line for line in rows if re.match(rf"\| {norm} \| [\d.]+ \| [\d.]+ \|", line)]
    untracked_seconds, epoch_logged_seconds, tracked_seconds = numbers(tracking)[:3]
    assert min(untracked_seconds, epoch_logged_seconds, tracked_seconds) > 0, tracking
    for layout in ("NCHW", "channels_last"):
        for precision in ("fp32", "bf16 autocast"):
            [row] = [
                line for line in rows if line.startswith(f"| {norm} | {layout} | {precision} |")
            ]
            assert numbers(row)[0] > 0, row  # ceiling images/s
    [kernel] = [line for line in rows if line.startswith("| FloatGroupNorm(4) | channels_last |")]
    assert numbers(kernel)[-1] > 0, kernel  # ms per step
    layer_header = rows.index("| layer | statistics over | ms per step | x whole batch |")
    step_header = rows.index("| kernel | statistics over | ms per step | x whole batch |")
    layer_rows = rows[layer_header:step_header]
    [whole] = [line for line in layer_rows if line.startswith("| BatchNorm2d | whole batch |")]
    assert numbers(whole)[-1] == 1.0, whole  # the ratio's unit
    for layer in ("GhostBatchNorm2d", "side by side", "separate ops"):
        for norm_batch in (2, 8, 32):
            [row] = [
                line
                for line in layer_rows
                if line.startswith(f"| {layer} | norm_batch {norm_batch} |")
            ]
            assert min(numbers(row)[-2:]) > 0, row  # ms per step, ratio to the whole batch
    # The training step at the benchmark's batch of 16: the norm_batch values that divide it.
    step_rows = rows[step_header:]
    [whole_step] = [line for line in step_rows if line.startswith("| BatchNorm2d | whole batch |")]
    assert numbers(whole_step)[-1] == 1.0, whole_step
    for kernel in ("GhostBatchNorm2d", "side by side"):
        found = [line for line in step_rows if line.startswith(f"| {kernel} | norm_batch ")]
        assert [row.split("|")[2].strip() for row in found] == ["norm_batch 2", "norm_batch 8"]
        assert all(min(numbers(row)[-2:]) > 0 for row in found), found
    [reference] = [line for line in rows if line.startswith("| BatchNorm2d + ReLU |")]
    assert numbers(reference)[-1] == 1.0, reference
    for layer in ("FilterResponseNorm2d", "torch.maximum TLU"):
        [row] = [line for line in rows if line.startswith(f"| {layer} |")]
        assert min(numbers(row)[-2:]) > 0, row  # ms per step, ratio to batch norm + ReLU
    defaults = 0
    for tta, passes in (("none", 1), ("flip", 2), ("flip-translate", 6)):
        for batch in (128, 1024):  # the CPU's evaluation batch, and the GPU's beside it
            [row] = [line for line in rows if line.startswith(f"| {norm} | {tta} | {batch} |")]
            forward_passes, seconds, per_default, share = numbers(row)[1:]
            assert forward_passes == passes and seconds > 0 and per_default > 0, row
            assert 0 < share < 100, row
            if row.endswith("| yes |"):
                defaults += 1
                assert per_default == 1.0 and (tta, batch) == ("flip-translate", 128), row
    assert defaults == 1
    # Every timed step, epoch and evaluation was built by train's builder from a norm's recipe,
    # overriding only what each question varies: the recipe's Muon, whatever the question.
    recipes = [recipe for recipe, _ in built_trainings]
    assert {recipe.norm for recipe in recipes} == {norm, "batch"}  # batch: the ghost steps
    assert all(recipe.optimizer == "muon" and recipe.activation == "silu" for recipe in recipes)
    assert all(isinstance(built.step.optimizer, optim.MuonSGD) for _, built in built_trainings)
    ours = [recipe for recipe in recipes if recipe.norm == norm]
    assert {recipe.precision for recipe in ours} == {"auto", "fp32", "bf16"}  # pipeline, layouts
    assert {recipe.tta for recipe in ours} == set(TTA_MODES)  # the evaluations
    assert {recipe.norm_batch for recipe in recipes if recipe.norm == "batch"} == {0, 2, 8}
    tracked = [recipe for recipe in ours if recipe.data != TrainConfig().data]
    assert len(tracked) >= 4 and all(recipe.epochs == 1 for recipe in tracked)  # tracking


@pytest.mark.parametrize(
    "norm, activation, pool", [("batch", nn.SiLU, nn.AvgPool2d), ("layer", nn.ReLU, nn.AvgPool2d)]
)
def test_the_timed_step_is_the_recipes_as_train_builds_it(
    benchmark_script, built_trainings, tiny_splits, norm, activation, pool
) -> None:
    from benchmarks import throughput

    train, _, stats = tiny_splits
    config = TrainConfig(norm=norm, batch_size=16)  # the benchmark varies the batch only
    result = throughput.measure_training(
        train, stats, config, path="pipeline", steps=2, warmup_steps=1
    )

    [(recipe, built)] = built_trainings
    assert recipe is config and result.batch_size == 16 and result.images == 32
    model = built.step.model
    assert str(model) == str(training.build_model(config))  # the one model factory's model
    assert {activation, pool} <= layer_types(model)
    assert model.C1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = built.step.optimizer
    assert isinstance(optimizer, optim.MuonSGD)  # the recipe's, not the SGD it once built
    [filters] = [group["params"] for group in optimizer.param_groups if group["muon"]]
    assert filters and all(param.ndim == 4 for param in filters)
    assert all("momentum_buffer" in optimizer.state[param] for param in filters)  # it stepped
    assert built.scheduler.last_epoch == 3  # warm-up and timed steps, each on the schedule
    assert built.step.loss_fn.label_smoothing == config.label_smoothing
    autocast = devices.resolve_precision("auto", torch.device("cpu"), norm=norm)
    assert built.step.autocast_dtype == autocast


def test_ghost_steps_and_evaluations_are_built_from_the_recipe(
    benchmark_script, built_trainings, tiny_splits
) -> None:
    from benchmarks import evaluation, norm_kernels

    steps = norm_kernels.ghost_steps(batch_size=16, train_images=240)
    assert [over for _, over in steps] == [
        "whole batch",
        *["norm_batch 2"] * 2,
        *["norm_batch 8"] * 2,
    ]
    for (kernel, over), built in steps.items():
        assert built.config.norm == "batch" and built.config.batch_size == 16
        assert isinstance(built.training.step.optimizer, optim.MuonSGD)
        assert nn.SiLU in layer_types(built.model)
        norms = [m for m in built.model.modules() if isinstance(m, nn.BatchNorm2d)]
        if over == "whole batch":
            assert all(type(layer) is nn.BatchNorm2d for layer in norms)
        else:
            assert all(layer.norm_batch == int(over.split()[-1]) for layer in norms)
            assert all(isinstance(layer, GhostBatchNorm2d) for layer in norms)
            assert (type(norms[0]) is GhostBatchNorm2d) == (kernel == "GhostBatchNorm2d")
    assert len(built_trainings) == len(steps)

    _, test, stats = tiny_splits
    config = TrainConfig(norm="group", tta="flip")
    cost = evaluation.measure_evaluation(test, stats, config, batch_size=32, train_images=512)
    recipe, built = built_trainings[-1]
    assert recipe is config and built.eval_batch_size == 32
    assert str(built.evaluated) == str(training.build_model(config))
    assert cost.passes == 2 and cost.images == len(test) and cost.seconds > 0


def test_reports_compare_with_fp32_and_with_torch_compile(benchmark_script) -> None:
    from benchmarks import compiled, throughput

    def measured(precision: str, images_per_second: float, warmup: float = 1.0):
        return throughput.Measurement(
            "batch", "ceiling", 256, "channels_last", precision, int(images_per_second), 1.0, warmup
        )

    rates = {
        ("batch", "reference"): 500.0,
        ("batch", "pipeline"): 1500.0,
        ("batch", "pipeline fp32"): 1000.0,
        ("batch", "ceiling"): 1600.0,
    }
    [row] = throughput.ratio_table(["batch"], rates, {})[2:]
    assert numbers(row)[:3] == [3.0, 1.5, 0.94], row
    rates = {**rates, ("batch", "pipeline"): 1000.0, ("batch", "pipeline bf16"): 1500.0}
    del rates["batch", "pipeline fp32"]
    [row] = throughput.ratio_table(["batch"], rates, {})[2:]  # the default is fp32
    assert numbers(row)[:3] == [2.0, 1.5, 0.62], row
    cost = compiled.CompileCost(
        "batch", measured("bf16 autocast", 1500), measured("bf16 autocast", 1800, warmup=90)
    )
    [row] = compiled.report([cost], train_count=45_000, warmup_steps=3)[-1:]
    # 20 epochs x 45,000 images: 600 s eager (+1 s warm-up), 500 s compiled + 90 s compiling
    assert row == "| batch | bf16 autocast | 1,500 | 1,800 | 1.20x | 90 s | 10.0 min | 9.8 min |"
    machine = benchmark_script.machine_description(torch.device("cpu"))
    assert devices.cpu_capability() in machine and "native bf16" in machine
