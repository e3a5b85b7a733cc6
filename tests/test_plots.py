import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from pipeline import plots
from pipeline.engine import EpochMetrics


def test_misclassified_grid_shows_wrong_predictions_from_every_class():
    labels = np.repeat(np.arange(10), 20)  # sorted by class, like the test split
    predictions = (labels + 1) % 10  # every prediction wrong
    images = np.zeros((len(labels), 32, 32, 3), dtype=np.uint8)
    classes = [f"class{i}" for i in range(10)]
    figure = plots.misclassified_grid(images, labels, predictions, classes, count=20)
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert len(titles) == 20
    shown = {title.split("\n")[0].removeprefix("true: ") for title in titles}
    assert shown == set(classes)
    assert all(
        title.split("\n")[1] == f"pred: class{(int(title.split()[1][5:]) + 1) % 10}"
        for title in titles
    )


def test_confusion_matrix_and_per_class_accuracy_agree():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    matrix = plots.confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    np.testing.assert_allclose(plots.per_class_accuracy(matrix), [0.5, 1.0, 0.5])


def test_training_curves_label_whole_epochs_only():
    for count in (1, 2, 20):
        records = [
            EpochMetrics(
                epoch=epoch,
                train_loss=1.0,
                train_acc=0.5,
                test_loss=1.0,
                test_acc=0.5,
                lr=0.1,
                epoch_seconds=1.0,
            )
            for epoch in range(1, count + 1)
        ]
        figure = plots.training_curves(records)
        for axis in figure.axes:
            low, high = axis.get_xlim()
            shown = [tick for tick in axis.get_xticks() if low <= tick <= high]
            assert shown and all(float(tick).is_integer() for tick in shown), (count, shown)


def test_a_norm_drawn_as_several_lines_takes_shades_of_its_own_colour():
    labels = ["batch (norm_batch 2)", "batch (norm_batch 8)", "batch (whole batch)", "group"]
    colors = plots.line_colors({label: label.split()[0] for label in labels})
    assert colors["group"] == plots.NORM_COLORS["group"]
    batch = to_rgb(plots.NORM_COLORS["batch"])
    assert colors["batch (whole batch)"] == pytest.approx(batch)  # the last: the full colour
    lightest = colors["batch (norm_batch 2)"]
    assert lightest == pytest.approx([0.35 * c + 0.65 for c in batch])
    assert len({tuple(c) for c in colors.values()}) == 4  # no line shares a colour


def test_a_lines_norm_is_given_never_read_from_its_name():
    colors = plots.line_colors({"small groups": "batch", "group (as named)": "layer"})
    assert colors["small groups"] == plots.NORM_COLORS["batch"]
    assert colors["group (as named)"] == plots.NORM_COLORS["layer"]


def test_train_vs_test_wraps_its_panels_into_rows_of_four():
    labels = [f"batch (norm_batch {size})" for size in (2, 4, 8, 16, 32)] + ["group"]
    lines = {label: label.split()[0] for label in labels}
    rows = [
        {"label": label, "epoch": epoch, "train_acc": 0.5, "test_acc": 0.6}
        for label in labels
        for epoch in (1, 2)
    ]
    titles = {label: label.replace(" (", " norm (") for label in labels[:-1]}
    figure = plots.train_vs_test_figure(pd.DataFrame(rows), lines, titles=titles)
    shown = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in shown] == [
        "batch norm (norm_batch 2)",
        "batch norm (norm_batch 4)",
        "batch norm (norm_batch 8)",
        "batch norm (norm_batch 16)",
        "batch norm (norm_batch 32)",
        "group norm",  # no title given: the norm's
    ]
    assert len(figure.axes) == 8 and figure.get_size_inches()[1] == pytest.approx(8)
