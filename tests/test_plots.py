import numpy as np

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
