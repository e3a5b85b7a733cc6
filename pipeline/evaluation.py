"""What an `evaluate` run does: a logged or registered model on the clean test split (accuracy,
per class, calibration before and after a temperature fitted on its training run's validation
split), and, when asked, on a CIFAR-10-C suite, with batch norm's running or test-batch
statistics; everything logged to its own run through tracking.py.

Everything a user can get wrong (the model URI, the suite's files, test-batch statistics for a
norm without batch statistics, a validation split that cannot be rebuilt) is checked before
the run starts, so a refusal leaves no run behind.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from pipeline import batches, engine, plots, robustness, tracking, training
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import (
    BATCH_STATISTICS_NORMS,
    TTA_BEFORE_PARAM,
    ConfigError,
    EvalConfig,
    model_label,
)
from pipeline.corruptions import CorruptionSuite
from pipeline.data import DatasetStats
from pipeline.norms import REGISTRY

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


def load_stats(spec: str, dataset: datasets.ArrayDataset) -> DatasetStats:
    """Stats from a path, from a run's artifact (runs:/<id>/stats.json) or computed."""
    if spec.startswith("runs:/"):
        return training.load_local_stats(str(tracking.download_artifact(spec)), dataset)
    return training.load_local_stats(spec, dataset)


def norm_tags(norm: str, groups: str) -> dict[str, str]:
    """Run and registry tags naming the norm; `groups` only means something for group norm,
    so only there is it tagged (the param is always logged)."""
    tags = {"norm": norm}
    if norm in REGISTRY and REGISTRY[norm].groups and groups:
        tags["groups"] = groups
    return tags


def evaluate_run_name(label: str, *, tta_differs: str = "", bn_stats: str = "running") -> str:
    """`evaluate-cifar10-layer-v3`; `-tta-none` where it evaluates with another tta than its
    training did, `-bn-test-batch` with test-batch statistics: the one place an evaluate run's
    name is made (the UI's run list tells one model's evaluations apart by it)."""
    name = f"evaluate-{label}" + (f"-tta-{tta_differs}" if tta_differs else "")
    return name + ("" if bn_stats == "running" else f"-bn-{bn_stats}")


def check_bn_stats(bn_stats: str, *, norm: str | None, run_id: str) -> None:
    """Test-batch statistics only for a model whose norm has batch statistics."""
    if bn_stats == "running" or norm in BATCH_STATISTICS_NORMS:
        return
    raise ConfigError(
        f"bn_stats=test-batch needs a norm with batch statistics "
        f"({', '.join(BATCH_STATISTICS_NORMS)}); training run {run_id} has norm={norm}"
        + (" (none logged)" if norm is None else "")
    )


def _raw_images(images: torch.Tensor) -> torch.Tensor:
    return images  # uint8 (B, 3, H, W), as a served model takes them


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What an evaluation reads, all checked before its run starts."""

    dataset: datasets.ArrayDataset
    validation: np.ndarray  # the indices of the training run's validation images
    suite: CorruptionSuite | None
    model: torch.nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor]


def _inputs(config: EvalConfig, source, params: dict, *, device) -> _Inputs:
    dataset = datasets.load_dataset(config.data)
    validation = robustness.validation_indices(dataset, params, run_id=source.run_id)
    suite = robustness.load_suite(
        config.corruptions,
        test_images=dataset.test_images,
        test_labels=dataset.test_labels,
        seed=config.eval_seed,
        classes=len(dataset.classes),
    )
    model = tracking.load_model(config.model_uri, device=str(device))
    if getattr(model, "takes_raw_images", False):
        normalize = _raw_images  # it normalises inside, as it was trained
    else:  # a model logged before the models took raw images wants them normalised
        stats = load_stats(config.stats or f"runs:/{source.run_id}/stats.json", dataset)
        normalize = batches.Normalizer(stats, device=device, memory_format=torch.contiguous_format)
    return _Inputs(dataset, validation, suite, model, normalize)


def evaluate_model(config: EvalConfig, *, echo: Echo = log.info) -> str:
    """Evaluate a logged or registered model in its own run; returns the run's id."""
    device = devices.resolve_device(config.device)
    tracking.check_store()
    source = tracking.resolve_model_uri(config.model_uri)
    params = tracking.run_params(source.run_id)
    check_bn_stats(config.bn_stats, norm=params.get("norm"), run_id=source.run_id)
    inputs = _inputs(config, source, params, device=device)
    label = model_label(run_id=source.run_id, name=source.name, version=source.version)
    trained_tta = params.get("tta", TTA_BEFORE_PARAM)
    config = dataclasses.replace(config, tta=config.tta or trained_tta)
    run_name = evaluate_run_name(
        label,
        tta_differs="" if config.tta == trained_tta else config.tta,
        bn_stats=config.bn_stats,
    )
    tags = _evaluate_tags(config, source, params, device=device, suite=inputs.suite)
    with tracking.run(run_name=run_name, tags=tags) as run_id:
        tracking.log_params(config.as_params())
        dataset = inputs.dataset
        tracking.log_dataset(
            name=dataset.name,
            source=dataset.source,
            digest=dataset.digest,
            context="test",
            images=dataset.test_images,
            labels=dataset.test_labels,
        )
        result, calibrated, cells = _evaluate(config, inputs, device=device)
        per_class = _log_evaluation(result, calibrated, dataset, label=run_name)
        if inputs.suite is not None:
            _log_corruptions(*cells, run_id=run_id)
    _echo_results(result, calibrated, per_class, dataset.classes, run_id=run_id, echo=echo)
    if inputs.suite is not None:
        _echo_corruptions(inputs.suite, *cells, echo=echo)
    return run_id


def _evaluate(config: EvalConfig, inputs: _Inputs, *, device: torch.device):
    """The clean test split's evaluation, its calibration (the temperature fitted on the
    validation images, evaluated the same way) and the suite's cells (the 15, the extras)."""
    test_batch = None
    if config.bn_stats == "test-batch":
        test_batch = engine.TestBatchStatistics(config.bn_stats_batch, config.eval_seed)
    evaluate = functools.partial(
        engine.evaluate,
        inputs.model,
        normalize=inputs.normalize,
        batch_size=config.batch_size or None,
        test_batch=test_batch,
    )
    dataset, held = inputs.dataset, inputs.validation
    result = evaluate(
        batches.to_device(dataset.test_images, dataset.test_labels, device=device),
        tta=config.tta,
    )
    validation = evaluate(
        batches.to_device(dataset.train_images[held], dataset.train_labels[held], device=device),
        tta=config.tta,
    )
    calibrated = robustness.calibrate(
        result.logits, result.labels, val_logits=validation.logits, val_labels=validation.labels
    )
    if inputs.suite is None:
        return result, calibrated, ([], [])
    cells = tuple(
        robustness.evaluate_cells(
            inputs.model,
            inputs.suite,
            normalize=inputs.normalize,
            device=device,
            batch_size=config.batch_size or None,
            tta=config.corruption_tta,
            test_batch=test_batch,
            extra=extra,
        )
        for extra in (False, True)
    )
    return result, calibrated, cells


def _evaluate_tags(config: EvalConfig, source, params: dict, *, device, suite) -> dict[str, str]:
    """The evaluation's tags: what it evaluates, how (bn_stats), the training's norm and seed,
    and the corruptions a published suite lacks."""
    tags = {
        "step": "evaluate",
        "source_run_id": source.run_id,
        "model_uri": config.model_uri,
        "bn_stats": config.bn_stats,
    }
    if device.type == "cuda":
        # torch.export's program is run as loaded; only train's own model is captured.
        tags["cuda_graphs_note"] = "an exported model is not captured; it runs eagerly"
    if source.version:
        tags.update({"model_name": source.name or "", "model_version": source.version})
    if "norm" in params:
        tags.update(norm_tags(params["norm"], params.get("groups", "")))
    if "seed" in params:
        tags["seed"] = params["seed"]
    if suite is not None:
        tags["corruptions_source"] = suite.source
        if suite.missing:
            tags["corruptions_missing"] = ",".join(suite.missing)
    return tags


def _log_evaluation(result, calibrated, dataset: datasets.ArrayDataset, *, label: str):
    """Metrics, evaluation.json and the figures of the clean evaluation; returns per-class
    accuracy."""
    labels, predictions = result.labels.numpy(), result.predictions.numpy()
    matrix = plots.confusion_matrix(labels, predictions, len(dataset.classes))
    per_class = plots.per_class_accuracy(matrix)
    by_class = dict(zip(dataset.classes, map(float, per_class), strict=True))
    tracking.log_metrics(
        {
            "test_acc": result.accuracy,
            "test_loss": result.loss,
            **calibrated.metrics(),
            **{f"class_acc/{name}": accuracy for name, accuracy in by_class.items()},
        }
    )
    tracking.log_dict(
        {
            "test_acc": result.accuracy,
            "test_loss": result.loss,
            "per_class_accuracy": by_class,
            "confusion_matrix": matrix.tolist(),
            "classes": list(dataset.classes),
            "calibration": calibrated.as_dict(),
        },
        "evaluation.json",
    )
    tracking.log_figure(
        plots.confusion_matrix_figure(matrix, dataset.classes, title=f"{label}: confusion matrix"),
        "plots/confusion_matrix.png",
    )
    tracking.log_figure(
        plots.misclassified_grid(
            dataset.test_images,
            labels,
            predictions,
            dataset.classes,
            title=f"{label}: misclassified test images",
        ),
        "plots/misclassified.png",
    )
    diagrams = calibrated.as_dict()
    tracking.log_figure(
        plots.reliability_figure(
            {label: (diagrams["reliability"], diagrams["reliability_calibrated"])},
            title=f"test ECE {calibrated.before.expected_calibration_error:.3f}, after "
            f"temperature {calibrated.after.temperature:.2f}: "
            f"{calibrated.after.expected_calibration_error:.3f}",
        ),
        "plots/reliability.png",
    )
    return per_class


def _log_corruptions(cells: list, extra: list, *, run_id: str) -> None:
    """The suite's metrics and one table per set of corruptions (every cell a row)."""
    tracking.log_metrics(
        {
            **robustness.cell_metrics(cells),
            **robustness.cell_metrics(extra, prefix=robustness.EXTRA_PREFIX),
        }
    )
    for rows, name in ((cells, "corruptions.json"), (extra, "corruptions_extra.json")):
        if rows:
            frame = pd.DataFrame([dataclasses.asdict(cell) for cell in rows])
            tracking.log_table(frame, name, run_id=run_id)


def _echo_results(result, calibrated, per_class, classes, *, run_id: str, echo: Echo) -> None:
    echo(f"test accuracy {100 * result.accuracy:.2f}%  loss {result.loss:.4f} (run {run_id})")
    for name, accuracy in zip(classes, per_class, strict=True):
        echo(f"  {name:<12} {100 * accuracy:6.2f}%")
    metrics = calibrated.metrics()
    echo(
        f"calibration: ECE {metrics['test_ece']:.4f}, NLL {metrics['test_nll']:.4f}, Brier "
        f"{metrics['test_brier']:.4f}; temperature {metrics['temperature']:.3f} (fitted on "
        f"validation) -> ECE {metrics['test_ece_calibrated']:.4f}"
    )


def _echo_corruptions(suite, cells: list, extra: list, *, echo: Echo) -> None:
    metrics = robustness.cell_metrics(cells)
    if metrics:
        echo(
            f"corruptions ({suite.source}): accuracy {100 * metrics['corruption_acc']:.2f}% "
            f"over {len(suite.corruptions)} corruptions x 5 severities, ECE "
            f"{metrics['corruption_ece']:.4f}"
        )
    if extra:
        mean = robustness.cell_metrics(extra, prefix=robustness.EXTRA_PREFIX)
        echo(
            f"  held-out extras ({', '.join(suite.extra)}): accuracy "
            f"{100 * mean['corruption_extra_acc']:.2f}%"
        )
    if suite.missing:
        echo(f"  missing from {suite.source}: {', '.join(suite.missing)}")
