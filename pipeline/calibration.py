"""How well a classifier's confidence matches its accuracy, from logits and labels (no MLflow).

Expected calibration error is torchmetrics' `multiclass_calibration_error` (15 equal-width bins
of top-1 confidence, L1 norm); the reliability diagram bins the same way, for a plot to draw.
Temperature scaling (Guo et al., 2017) fits one positive scalar T on validation logits by
minimising the NLL of `logits / T`; every metric here takes that `temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

BINS = 15


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per confidence bin: its edges, mean confidence, accuracy and image count (empty bins have
    count 0 and confidence and accuracy 0)."""

    edges: tuple[float, ...]  # BINS + 1 edges from 0 to 1
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]
    count: tuple[int, ...]


@dataclass(frozen=True)
class Calibration:
    """The calibration of one set of predictions, at one temperature."""

    accuracy: float
    expected_calibration_error: float
    negative_log_likelihood: float
    brier_score: float
    temperature: float = 1.0


def _checked(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple:
    """Logits and labels as float64 and int64 on the CPU, after checking their shapes."""
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ConfigError(f"logits must be (N, C) with N >= 1, C >= 2 (got {tuple(logits.shape)})")
    if labels.shape != (logits.shape[0],):
        raise ConfigError(
            f"labels must be ({logits.shape[0]},) to match the logits (got {tuple(labels.shape)})"
        )
    labels = labels.detach().to("cpu", torch.int64)
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ConfigError(f"labels must lie in 0..{logits.shape[1] - 1}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive (got {temperature})")
    return logits.detach().to("cpu", torch.float64) / temperature, labels


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, bins: int = BINS
) -> float:
    """Top-1 ECE over `bins` equal-width confidence bins: sum over bins of
    (bin's share of the images) x |accuracy - mean confidence|."""
    # Imported here, not with the module: importing torchmetrics fixes this process's temporary
    # directory (tempfile.gettempdir), where the registry's lock files go, before a step's
    # TMPDIR can say where (tests/test_study.py: writers on hosts that share no lock).
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = _checked(logits, labels, temperature)
    # Probabilities, not logits: torchmetrics applies softmax only when a value lies outside [0, 1].
    probabilities = logits.softmax(dim=1)
    error = multiclass_calibration_error(
        probabilities, labels, num_classes=logits.shape[1], n_bins=bins, norm="l1"
    )
    return float(error)


def negative_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> float:
    """Mean cross-entropy of the softmax of `logits / temperature`, in nats."""
    logits, labels = _checked(logits, labels, temperature)
    return float(F.cross_entropy(logits, labels))


def brier_score(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> float:
    """Mean over images of the squared error between the softmax and the one-hot label, summed
    over classes (0 is perfect, 2 the worst)."""
    logits, labels = _checked(logits, labels, temperature)
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return float(((logits.softmax(dim=1) - one_hot) ** 2).sum(dim=1).mean())


def reliability_diagram(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, bins: int = BINS
) -> ReliabilityDiagram:
    """Per bin of top-1 confidence, [k/bins, (k+1)/bins) with 1.0 in the last bin: the mean
    confidence, the accuracy and the count."""
    logits, labels = _checked(logits, labels, temperature)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    index = torch.clamp((confidence * bins).floor().long(), max=bins - 1)
    count = torch.bincount(index, minlength=bins)
    total_confidence = torch.bincount(index, weights=confidence, minlength=bins)
    correct = torch.bincount(index, weights=(predicted == labels).double(), minlength=bins)
    safe = count.clamp(min=1)
    return ReliabilityDiagram(
        edges=tuple((torch.arange(bins + 1, dtype=torch.float64) / bins).tolist()),
        confidence=tuple((total_confidence / safe).tolist()),
        accuracy=tuple((correct / safe).tolist()),
        count=tuple(count.tolist()),
    )


def fit_temperature(val_logits: torch.Tensor, val_labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the NLL of `val_logits / T` (LBFGS on log T)."""
    logits, labels = _checked(val_logits, val_labels, 1.0)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=1.0, max_iter=100, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not 0 < temperature < float("inf"):
        raise ConfigError(f"temperature fit diverged (got {temperature}): are the logits finite?")
    return temperature


def calibration(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> Calibration:
    """Accuracy, ECE, NLL and Brier score of one set of predictions at one temperature."""
    _, checked_labels = _checked(logits, labels, temperature)
    accuracy = float((logits.detach().cpu().argmax(dim=1) == checked_labels).double().mean())
    return Calibration(
        accuracy=accuracy,
        expected_calibration_error=expected_calibration_error(
            logits, labels, temperature=temperature
        ),
        negative_log_likelihood=negative_log_likelihood(logits, labels, temperature=temperature),
        brier_score=brier_score(logits, labels, temperature=temperature),
        temperature=temperature,
    )
