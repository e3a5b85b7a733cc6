"""Test and train accuracy per epoch of finished `train` runs, overlaid: the 20-epoch runs of
the study against the longer runs that measure the model's ceiling (docs/history.md).

    python scripts/ceiling_curves.py --out docs/ceiling.png RUN_ID [RUN_ID ...]

Each run is labelled by its norm, seed and epochs; the x axis is the epoch, so a 20-epoch run
ends where the longer one's schedule is still at its peak learning rate. Prints a Markdown table
of each run's final accuracies. Reads the runs from MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import MAX_EPOCHS  # noqa: E402

NORM_COLOURS = {"batch": "C0", "group": "C1", "layer": "C2"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/ceiling_curves.py")
    parser.add_argument("run_ids", nargs="+", help="finished train runs")
    parser.add_argument("--out", required=True, help="the figure's path (PNG)")
    arguments = parser.parse_args(argv)
    client = MlflowClient()
    figure, (test_axis, train_axis) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    print("| run | norm | seed | epochs | final test acc % | final train acc % | minutes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for run_id in arguments.run_ids:
        run = client.get_run(run_id)
        params = run.data.params
        records = tracking.metric_history(run_id)
        if not records:
            print(f"error: run {run_id} has no per-epoch metrics", file=sys.stderr)
            return 1
        label = f"{params['norm']}, seed {params['seed']}, {params['epochs']} epochs"
        epochs = [record.epoch for record in records]
        # One colour per norm; the 20-epoch runs dashed, so a norm's pair reads as one family.
        style = {
            "color": NORM_COLOURS.get(params["norm"]),
            "linestyle": "--" if int(params["epochs"]) <= MAX_EPOCHS else "-",
            "label": label,
        }
        test_axis.plot(epochs, [100 * r.test_acc for r in records], **style)
        train_axis.plot(epochs, [100 * r.train_acc for r in records], **style)
        minutes = (run.info.end_time - run.info.start_time) / 60_000
        print(
            f"| `{run_id[:8]}` | {params['norm']} | {params['seed']} | {params['epochs']} | "
            f"{100 * records[-1].test_acc:.2f} | {100 * records[-1].train_acc:.2f} | "
            f"{minutes:.0f} |"
        )
    test_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="Test accuracy (dev split)")
    train_axis.set(xlabel="epoch", title="Training accuracy (augmented batches)")
    for axis in (test_axis, train_axis):
        axis.grid(alpha=0.3)
        axis.legend()
        axis.set_ylim(40, 100)
    figure.tight_layout()
    figure.savefig(arguments.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
