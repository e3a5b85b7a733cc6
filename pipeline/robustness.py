"""Beyond clean accuracy, for one model (no MLflow): its accuracy and calibration on each cell
of a CIFAR-10-C suite, and its calibration on the clean test split before and after a
temperature fitted on the training run's validation split. `evaluation.py` logs what these
return.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import batches, calibration, corruptions, engine
from pipeline import data as datasets
from pipeline.config import GENERATED_CORRUPTIONS, NO_CORRUPTIONS, ConfigError
from pipeline.corruptions import CorruptionSuite
from pipeline.data import DataError

log = logging.getLogger(__name__)

CORRUPTION_PREFIX = "corruption"  # corruption_acc, corruption_ece, corruption_acc/<name>/<s>
EXTRA_PREFIX = "corruption_extra"  # the published set's 4 held-out corruptions, apart


@dataclass(frozen=True)
class Cell:
    """One corruption at one severity: the columns of the evaluate run's corruption table."""

    corruption: str
    severity: int
    accuracy: float
    ece: float  # expected calibration error (15 bins) on the corrupted images
    images: int


@dataclass(frozen=True)
class CalibrationResult:
    """The clean test split's calibration before and after the fitted temperature."""

    before: calibration.Calibration
    after: calibration.Calibration
    diagram: calibration.ReliabilityDiagram
    diagram_calibrated: calibration.ReliabilityDiagram

    def metrics(self) -> dict[str, float]:
        return {
            "test_ece": self.before.expected_calibration_error,
            "test_nll": self.before.negative_log_likelihood,
            "test_brier": self.before.brier_score,
            "temperature": self.after.temperature,
            "test_ece_calibrated": self.after.expected_calibration_error,
        }

    def as_dict(self) -> dict:
        """What evaluation.json holds: the metrics and both reliability diagrams' bins."""
        return {
            **self.metrics(),
            "reliability": dataclasses.asdict(self.diagram),
            "reliability_calibrated": dataclasses.asdict(self.diagram_calibrated),
        }


def load_suite(
    spec: str, *, test_images: np.ndarray, test_labels: np.ndarray, seed: int, classes: int
) -> CorruptionSuite | None:
    """None for `none`; the suite built from the test split for `generated` (cached); else
    the published files in the directory `spec`. Labels outside the model's classes fail."""
    if spec == NO_CORRUPTIONS:
        return None
    if spec == GENERATED_CORRUPTIONS:
        suite = corruptions.generate(test_images, test_labels, seed=seed)
    else:
        suite = corruptions.load_published(spec)
    if len(suite.labels) and (suite.labels.min() < 0 or suite.labels.max() >= classes):
        raise DataError(
            f"{suite.source}: labels.npy holds labels outside 0..{classes - 1} "
            f"(got {int(suite.labels.min())}..{int(suite.labels.max())})"
        )
    return suite


def evaluate_cells(
    model: nn.Module,
    suite: CorruptionSuite,
    *,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int | None,
    tta: str,
    test_batch: engine.TestBatchStatistics | None,
    extra: bool = False,
) -> list[Cell]:
    """Accuracy and ECE of `model` on every (corruption, severity) of `suite`, the 15 held
    ones or (`extra`) the held-out four, in the suite's order; a progress bar over the cells."""
    names = suite.extra if extra else suite.corruptions
    pairs = [(name, severity) for name in names for severity in corruptions.SEVERITIES]
    if not pairs:
        return []
    labels = np.array(suite.labels)  # the files are read-only memory maps: copied for torch
    cells = []
    for name, severity in tqdm(pairs, desc="corruptions", leave=False):
        images = np.array(suite.images(name, severity))
        split = batches.to_device(images, labels, device=device)
        result = engine.evaluate(
            model,
            split,
            normalize=normalize,
            batch_size=batch_size,
            tta=tta,
            test_batch=test_batch,
        )
        ece = calibration.expected_calibration_error(result.logits, result.labels)
        cells.append(Cell(name, severity, result.accuracy, ece, len(split)))
    return cells


def cell_metrics(cells: list[Cell], *, prefix: str = CORRUPTION_PREFIX) -> dict[str, float]:
    """`<prefix>_acc` and `<prefix>_ece`, the means over the cells, and each cell's accuracy
    as `<prefix>_acc/<corruption>/<severity>`."""
    if not cells:
        return {}
    return {
        f"{prefix}_acc": float(np.mean([cell.accuracy for cell in cells])),
        f"{prefix}_ece": float(np.mean([cell.ece for cell in cells])),
        **{f"{prefix}_acc/{cell.corruption}/{cell.severity}": cell.accuracy for cell in cells},
    }


def validation_indices(
    dataset: datasets.ArrayDataset, params: Mapping[str, str], *, run_id: str
) -> np.ndarray:
    """The training images the training run `run_id` validated on, rebuilt from its logged
    `val_size`, `val_seed` and `val_digest` on `dataset`; a ConfigError (one line) where the
    run held none out, and a DataError where `dataset` is not the one it trained on."""
    size, seed = _logged_int(params, "val_size"), _logged_int(params, "val_seed")
    digest = (params.get("val_digest") or "").strip("'\"")
    if not size or seed is None or not digest:
        raise ConfigError(
            f"calibration needs the validation split of training run {run_id}, which logged "
            f"val_size {params.get('val_size', 'none')}, val_digest {digest or 'none'}: its "
            "temperature cannot be fitted (evaluate a model trained with val_size > 0)"
        )
    try:
        split = datasets.validation_split(
            dataset.train_labels,
            size,
            seed=seed,
            dataset_digest=dataset.digest,
            class_names=dataset.classes,
        )
    except DataError as error:
        raise DataError(f"cannot rebuild run {run_id}'s validation split: {error}") from None
    if split.digest != digest:
        raise DataError(
            f"training run {run_id} validated on another dataset than {dataset.source} (its "
            f"val_digest {digest}, rebuilt here {split.digest}): evaluate with the run's data"
        )
    return split.indices


def _logged_int(params: Mapping[str, str], name: str) -> int | None:
    try:
        return int(float(str(params[name]).strip("'\"")))
    except (KeyError, ValueError):
        return None


def calibrate(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
) -> CalibrationResult:
    """ECE, NLL and Brier score of the test logits, and after the temperature that minimises
    the validation logits' NLL (Guo et al., 2017)."""
    temperature = calibration.fit_temperature(val_logits, val_labels)
    return CalibrationResult(
        before=calibration.calibration(test_logits, test_labels),
        after=calibration.calibration(test_logits, test_labels, temperature=temperature),
        diagram=calibration.reliability_diagram(test_logits, test_labels),
        diagram_calibrated=calibration.reliability_diagram(
            test_logits, test_labels, temperature=temperature
        ),
    )
