"""Small scripts under scripts/ that read tracked runs."""

from __future__ import annotations

import importlib.util
import sys

from conftest import REPO

from pipeline import tracking
from pipeline.engine import EpochMetrics


def _script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_ceiling_curves_overlay_runs_of_any_length_and_tabulate_their_ends(
    tracking_store, tmp_path, monkeypatch, capsys
):
    run_ids = []
    for epochs, validated in ((2, False), (5, True)):
        with tracking.run(run_name=f"train-{epochs}", tags={"step": "train"}) as run_id:
            tracking.log_params({"norm": "batch", "seed": "1", "epochs": str(epochs)})
            for epoch in range(1, epochs + 1):
                accuracy = 0.5 + 0.05 * epoch
                # Validation peaks at epoch 3, so the best epoch is not the last.
                val = (1.0, 0.9 - 0.01 * abs(epoch - 3)) if validated else (None, None)
                tracking.log_epoch(
                    EpochMetrics(epoch, 1.0, accuracy, 1.0, accuracy, 0.1, 1.0, *val)
                )
        run_ids.append(run_id)
    figure = tmp_path / "curves.png"
    assert _script("ceiling_curves", monkeypatch).main(["--out", str(figure), *run_ids]) == 0
    rows = capsys.readouterr().out.splitlines()
    # A run trained before the split held out validation has no val columns: test stands in.
    assert rows[2].startswith(f"| `{run_ids[0][:8]}` | batch | 1 | 2 | - | - | 60.00 | 60.00 |")
    assert rows[3].startswith(
        f"| `{run_ids[1][:8]}` | batch | 1 | 5 | 88.00 | 90.00 (3) | 75.00 | 75.00 |"
    )
    assert figure.stat().st_size > 10_000
    # A run still training is drawn up to its last epoch; its row says how far it got.
    with tracking.run(run_name="train-running", tags={"step": "train"}) as running:
        tracking.log_params({"norm": "group", "seed": "1", "epochs": "100"})
        tracking.log_epoch(EpochMetrics(1, 1.0, 0.4, 1.0, 0.45, 0.1, 1.0, 1.0, 0.5))
        capsys.readouterr()
        assert _script("ceiling_curves", monkeypatch).main(["--out", str(figure), running]) == 0
    (row,) = capsys.readouterr().out.splitlines()[2:]
    assert row.startswith(f"| `{running[:8]}` | group | 1 | 1 of 100 (running) | 50.00 | 50.00 (1)")
    assert row.endswith(" so far |")
