"""Matplotlib figures from records, arrays and DataFrames (no MLflow: tracking logs what these
return)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files and MLflow artifacts

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.engine import EpochMetrics  # noqa: E402
from pipeline.norms import REGISTRY  # noqa: E402


def image_grid(
    images: np.ndarray,
    titles: Sequence[str],
    *,
    columns: int = 5,
    suptitle: str = "",
    title_colors: Sequence[str] | None = None,
) -> Figure:
    """Images `(N, 32, 32, 3)` uint8 in a grid, drawn large enough to read (2 inches each)."""
    count = len(images)
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.0 * columns, 2.3 * rows + 0.5), squeeze=False
    )
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(images[index], interpolation="nearest")
            color = title_colors[index] if title_colors else "black"
            axis.set_title(titles[index], fontsize=10, color=color)
    if suptitle:
        figure.suptitle(suptitle, fontsize=13)
    figure.tight_layout()
    return figure


def misclassified_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: Sequence[str],
    *,
    count: int = 25,
    title: str = "Misclassified test images",
) -> Figure:
    """Up to `count` misclassified images, taken from every true class in turn (the test split
    is often sorted by class), each titled with its true and predicted class."""
    wrong = _round_robin_by_class(np.flatnonzero(labels != predictions), labels, count=count)
    titles = [f"true: {classes[labels[i]]}\npred: {classes[predictions[i]]}" for i in wrong]
    return image_grid(images[wrong], titles, suptitle=f"{title} ({len(wrong)} shown)")


def _round_robin_by_class(indices: np.ndarray, labels: np.ndarray, *, count: int) -> np.ndarray:
    queues = [list(indices[labels[indices] == c]) for c in np.unique(labels[indices])]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.array(picked, dtype=np.int64)


def class_samples(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, per_class: int = 8
) -> Figure:
    """`per_class` training images of each class, one row per class."""
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(len(classes))]
    figure, axes = plt.subplots(
        len(classes), per_class, figsize=(1.3 * per_class + 1.2, 1.3 * len(classes)), squeeze=False
    )
    for row, (name, index) in enumerate(zip(classes, picks, strict=True)):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(index):
                axis.imshow(images[index[column]], interpolation="nearest")
            if column == 0:
                axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    figure.suptitle("Training images per class", fontsize=13)
    figure.tight_layout()
    return figure


def whole_epochs(axis, epochs: Sequence[int]) -> None:
    """Tick whole epochs only: a short run would otherwise be labelled 0.96, 0.98, ..."""
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    if len(epochs):
        axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)


def training_curves(records: Sequence[EpochMetrics], *, title: str = "") -> Figure:
    """Loss and accuracy per epoch: train, validation (where the run held it out) and test."""
    epochs = [r.epoch for r in records]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    validated = [r for r in records if r.val_loss is not None and r.val_acc is not None]
    loss_axis.plot(epochs, [r.train_loss for r in records], "o-", label="train")
    if validated:
        loss_axis.plot(
            [r.epoch for r in validated], [r.val_loss for r in validated], "o-", label="validation"
        )
    loss_axis.plot(epochs, [r.test_loss for r in records], "o-", label="test")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_axis.plot(epochs, [100 * r.train_acc for r in records], "o-", label="train")
    if validated:
        acc_axis.plot(
            [r.epoch for r in validated],
            [100 * r.val_acc for r in validated],
            "o-",
            label="validation",
        )
    acc_axis.plot(epochs, [100 * r.test_acc for r in records], "o-", label="test")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for axis in (loss_axis, acc_axis):
        whole_epochs(axis, epochs)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], *, title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    figure, axis = plt.subplots(figsize=(8, 7))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(
            column,
            row,
            str(value),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value > threshold else "black",
        )
    figure.tight_layout()
    return figure


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1)
    return np.divide(np.diag(matrix), totals, out=np.zeros(len(matrix)), where=totals > 0)


# --------------------------------------------------------------------------- study figures
# The compare report's figures: a study's epoch histories (one row per run and epoch: norm,
# epoch, train_acc, test_acc, test_loss, ...) and per-norm images, one colour per norm.

NORM_COLORS = {name: entry.color for name, entry in REGISTRY.items()}  # pipeline/norms.py


# A batch-dependence sweep draws a panel per statistics group: rows of four stay readable.
PANELS_PER_ROW = 4


def line_colors(lines: Mapping[str, str]) -> dict[str, object]:
    """A colour per line (`lines`: each line's name -> its norm, in drawing order): the norm's
    registered colour, and for a norm drawn as several lines (a batch-dependence sweep's
    statistics groups, `batch (norm_batch 2)`, ..., `batch (whole batch)`) shades of it,
    lightest first, so that no line takes another norm's colour."""
    by_norm: dict[str, list[str]] = {}
    for line, norm in lines.items():
        by_norm.setdefault(norm, []).append(line)
    colors: dict[str, object] = {}
    for norm, mine in by_norm.items():
        base = NORM_COLORS.get(norm)
        for index, line in enumerate(mine):
            if base is None or len(mine) == 1:
                colors[line] = base
                continue
            white = 0.65 * (len(mine) - 1 - index) / (len(mine) - 1)
            colors[line] = tuple((1 - white) * c + white for c in to_rgb(base))
    return colors


def _band_by_line(history: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per line (`history["label"]`) and epoch: mean, min and max of `metric` over seeds."""
    bands = {}
    for line, rows in history.groupby("label", sort=False):
        bands[line] = rows.groupby("epoch")[metric].agg(["mean", "min", "max"]).sort_index()
    return bands


def _plot_band(axis, band: pd.DataFrame, *, label: str, color, scale: float = 1.0, style="o-"):
    axis.plot(band.index, scale * band["mean"], style, color=color, label=label)
    axis.fill_between(band.index, scale * band["min"], scale * band["max"], color=color, alpha=0.2)


def overlay_figure(history: pd.DataFrame, lines: Mapping[str, str]) -> Figure:
    """Test accuracy and loss per epoch: one line per entry of `lines` (its name -> its norm,
    in drawing order; the report's: a norm, or a norm per statistics group), drawn from the
    rows of `history` whose `label` is its name: the mean, band = min-max over seeds."""
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    accuracy = _band_by_line(history, "test_acc")
    loss = _band_by_line(history, "test_loss")
    colors = line_colors(lines)
    for line in lines:
        if line not in accuracy:
            continue
        color = colors[line]
        _plot_band(acc_axis, accuracy[line], label=line, color=color, scale=100)
        _plot_band(loss_axis, loss[line], label=line, color=color)
    acc_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    loss_axis.set(xlabel="epoch", ylabel="test loss", title="Test loss")
    for axis in (acc_axis, loss_axis):
        whole_epochs(axis, sorted(set(history["epoch"])))
        axis.grid(alpha=0.3)
        axis.legend(title="norm (band: seed min-max)")
    figure.tight_layout()
    return figure


def train_vs_test_figure(
    history: pd.DataFrame, lines: Mapping[str, str], *, titles: Mapping[str, str] | None = None
) -> Figure:
    """Train vs test accuracy per epoch, one panel per entry of `lines` as in overlay_figure
    (up to PANELS_PER_ROW a row), bands over seeds; each panel titled `titles[name]`, or
    "<norm> norm"."""
    drawn = set(history["label"])
    panels = [line for line in lines if line in drawn] or list(lines)
    columns = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False, sharey=True
    )
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    train = _band_by_line(history, "train_acc")
    test = _band_by_line(history, "test_acc")
    colors = line_colors({line: lines[line] for line in panels})
    for axis, line in zip(axes.flat, panels, strict=False):
        if line in train:
            _plot_band(axis, train[line], label="train", color="tab:gray", scale=100, style="s--")
            _plot_band(axis, test[line], label="test", color=colors[line], scale=100)
        title = (titles or {}).get(line, f"{lines[line]} norm")
        axis.set(xlabel="epoch", title=title)
        whole_epochs(axis, sorted(set(history["epoch"])))
        axis.grid(alpha=0.3)
        axis.legend()
    for row in axes:
        row[0].set_ylabel("accuracy (%)")
    figure.tight_layout()
    return figure


def misclassified_figure(grids: Mapping[str, Path], norms: Sequence[str]) -> Figure:
    """Each norm's misclassified-image grid (norm -> PNG of its train run), side by side."""
    panels = [n for n in norms if n in grids]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 8.5), squeeze=False, layout="constrained"
    )
    for axis, norm in zip(axes[0], panels, strict=True):
        axis.imshow(plt.imread(grids[norm]))
        axis.set_title(f"{norm} norm", fontsize=16)
        axis.axis("off")
    return figure


def per_class_figure(table: pd.DataFrame) -> Figure:
    """Grouped bars: test accuracy per class, one bar per norm."""
    figure, axis = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(table.columns))
    positions = np.arange(len(table.index))
    for offset, norm in enumerate(table.columns):
        axis.bar(
            positions + (offset - (len(table.columns) - 1) / 2) * width,
            100 * table[norm].to_numpy(),
            width,
            label=norm,
            color=NORM_COLORS.get(norm),
        )
    axis.set_xticks(positions, table.index, rotation=30, ha="right")
    axis.set(ylabel="test accuracy (%)", title="Per-class test accuracy (mean over seeds)")
    axis.set_ylim(0, 105)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(title="norm")
    figure.tight_layout()
    return figure


def batch_dependence_figure(points: pd.DataFrame, references: pd.DataFrame) -> Figure:
    """Final test accuracy against images per statistics group, the figure of Wu & He's Group
    Normalization (2018) for this model.

    `points`: one row per norm with batch statistics, batch size and images per group: mean,
    min and max of the final test accuracy over its runs (a line with its min-max band).
    `references`: one row per norm without batch statistics: the same over its runs, drawn flat
    (their statistics do not depend on the batch).
    """
    figure, axis = plt.subplots(figsize=(8, 5))
    sizes = sorted({int(size) for size in points["images_per_group"]})
    labelled_batch = points["batch_size"].nunique() > 1
    for (norm, batch_size), rows in points.groupby(["norm", "batch_size"], sort=False):
        rows = rows.sort_values("images_per_group")
        label = f"{norm} (batch {batch_size})" if labelled_batch else norm
        color = NORM_COLORS.get(norm)
        axis.plot(rows["images_per_group"], 100 * rows["mean"], "o-", color=color, label=label)
        axis.fill_between(
            rows["images_per_group"], 100 * rows["min"], 100 * rows["max"], color=color, alpha=0.2
        )
    for row in references.itertuples(index=False):
        color = NORM_COLORS.get(row.norm)
        axis.axhline(100 * row.mean, linestyle="--", color=color, label=f"{row.norm} (no batch)")
        axis.axhspan(100 * row.min, 100 * row.max, color=color, alpha=0.1)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.minorticks_off()
    axis.set(
        xlabel="images per batch-statistics group (norm_batch; the whole batch at the right)",
        ylabel="final test accuracy (%)",
        title="Batch-size dependence of the normalization",
    )
    axis.grid(alpha=0.3)
    axis.legend(title="norm (band: run min-max)")
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------- robustness


def reliability_figure(
    panels: Mapping[str, tuple[Mapping, Mapping | None]], *, title: str = ""
) -> Figure:
    """Reliability diagrams side by side: per panel (its title -> the bins before and, where
    given, after the temperature: dicts of calibration.ReliabilityDiagram's edges, confidence,
    accuracy and count), each bin's accuracy as a bar against the diagonal of perfect
    calibration, the calibrated bins as a line."""
    columns = min(len(panels), PANELS_PER_ROW) or 1
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 4.2 * rows), squeeze=False, sharey=True
    )
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (name, (before, after)) in zip(axes.flat, panels.items(), strict=False):
        edges = np.asarray(before["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        shown = np.asarray(before["count"]) > 0
        axis.bar(
            centres[shown],
            np.asarray(before["accuracy"])[shown],
            width[shown],
            alpha=0.7,
            edgecolor="black",
            label="accuracy per bin",
        )
        if after is not None:
            kept = np.asarray(after["count"]) > 0
            axis.plot(
                np.asarray(after["confidence"])[kept],
                np.asarray(after["accuracy"])[kept],
                "o-",
                color="tab:orange",
                label="after temperature",
            )
        axis.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=name)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    for row in axes:
        row[0].set_ylabel("accuracy")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def severity_figure(points: pd.DataFrame, lines: Mapping[str, str]) -> Figure:
    """Accuracy against corruption severity (0: the clean test split), one line per entry of
    `lines` (its name -> its norm), drawn from the rows of `points` (label, severity, mean,
    min, max: over the corruptions, then the models) whose `label` is its name."""
    figure, axis = plt.subplots(figsize=(8, 5))
    colors = line_colors(lines)
    for line in lines:
        rows = points[points["label"] == line].sort_values("severity")
        if rows.empty:
            continue
        band = rows.set_index("severity")[["mean", "min", "max"]]
        _plot_band(axis, band, label=line, color=colors[line], scale=100)
    axis.set_xticks(range(6), ["clean", "1", "2", "3", "4", "5"])
    axis.set(
        xlabel="corruption severity",
        ylabel="accuracy (%, mean over the corruptions)",
        title="Accuracy under corruption (CIFAR-10-C)",
    )
    axis.grid(alpha=0.3)
    axis.legend(title="norm (band: model min-max)")
    figure.tight_layout()
    return figure
