"""Validation and training accuracy per epoch of `train` runs, overlaid: the 20-epoch
runs of the study against the longer runs that measure the model's bound (docs/history.md).

    python scripts/ceiling_curves.py --out docs/bound.png RUN_ID [RUN_ID ...]

A run still training is drawn up to its last logged epoch, and its row says how far it got.
Each run is labelled by its norm, seed and epochs; the x axis is the epoch, so a 20-epoch run
ends where the longer one's schedule is still at its peak learning rate. The left panel is the
validation split, where choices are made (test, for runs trained before the split held one out);
the right one, training accuracy on augmented batches, tells an optimisation gap from a
generalisation one. Prints a Markdown table of each run's final accuracies, test reported
alongside, never chosen on. Reads the runs from MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import MAX_EPOCHS  # noqa: E402

NORM_COLOURS = {"batch": "C0", "group": "C1", "layer": "C2"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/ceiling_curves.py")
    parser.add_argument("run_ids", nargs="+", help="train runs (finished, or still training)")
    parser.add_argument("--out", required=True, help="the figure's path (PNG)")
    arguments = parser.parse_args(argv)
    client = MlflowClient()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    print(
        "| run | norm | seed | epochs | val acc % | best val acc % (epoch) | test acc % "
        "(reported) | train acc % | minutes |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    all_validated = True
    for run_id in arguments.run_ids:
        run = client.get_run(run_id)
        records = tracking.metric_history(run_id)
        if not records:
            print(f"error: run {run_id} has no per-epoch metrics", file=sys.stderr)
            return 1
        all_validated &= records[-1].val_acc is not None
        print(_plot_run(axes, run, records))
    held_out_axis, train_axis = axes
    title = "Validation accuracy" if all_validated else "Validation accuracy (test where none)"
    held_out_axis.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    train_axis.set(xlabel="epoch", title="Training accuracy (augmented batches)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
        axis.set_ylim(40, 100)
    figure.tight_layout()
    figure.savefig(arguments.out, dpi=110)
    return 0


def _plot_run(axes, run, records) -> str:
    """Draw one run's held-out and training curves; its table row."""
    params = run.data.params
    epochs = [record.epoch for record in records]
    # One colour per norm; the 20-epoch runs dashed, so a norm's pair reads as one family.
    style = {
        "color": NORM_COLOURS.get(params["norm"]),
        "linestyle": "--" if int(params["epochs"]) <= MAX_EPOCHS else "-",
        "label": f"{params['norm']}, seed {params['seed']}, {params['epochs']} epochs",
    }
    validated = records[-1].val_acc is not None
    held_out = [r.val_acc if validated else r.test_acc for r in records]
    axes[0].plot(epochs, [100 * accuracy for accuracy in held_out], **style)
    axes[1].plot(epochs, [100 * r.train_acc for r in records], **style)
    val, best_val = "-", "-"
    if validated:
        best = max(range(len(records)), key=held_out.__getitem__)
        val, best_val = f"{100 * held_out[-1]:.2f}", f"{100 * held_out[best]:.2f} ({epochs[best]})"
    ended = run.info.end_time or time.time() * 1000
    minutes = f"{(ended - run.info.start_time) / 60_000:.0f}"
    epochs_cell = params["epochs"]
    if run.info.end_time is None:  # still training: where it got to, and the time so far
        epochs_cell = f"{epochs[-1]} of {params['epochs']} (running)"
        minutes += " so far"
    return (
        f"| `{run.info.run_id[:8]}` | {params['norm']} | {params['seed']} | {epochs_cell} | "
        f"{val} | {best_val} | {100 * records[-1].test_acc:.2f} | "
        f"{100 * records[-1].train_acc:.2f} | {minutes} |"
    )


if __name__ == "__main__":
    sys.exit(main())
