"""scripts/benchmark.py runs end to end in --quick mode and reports every measurement."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import device as devices

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


def numbers(row: str) -> list[float]:
    """The numeric cells of a Markdown table row ("1,234" and "+5.0%" included)."""
    cells = [cell.strip().replace(",", "").rstrip("%x") for cell in row.strip("|").split("|")]
    return [float(cell) for cell in cells if re.fullmatch(r"[+-]?\d+(\.\d+)?", cell)]


def test_quick_run_reports_every_measurement(
    benchmark_script,
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
