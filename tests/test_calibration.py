"""Calibration metrics against hand-worked cases, and the temperature fit recovering a known T."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.calibration import (
    brier_score,
    calibration,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_diagram,
)
from pipeline.errors import ConfigError


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly `probabilities` (log p, up to a constant)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# Four images, two classes. Top-1 confidences 0.9, 0.8, 0.6, 0.7; predictions 0, 0, 1, 1.
PROBABILITIES = [[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]
LABELS = torch.tensor([0, 1, 1, 0])  # right, wrong, right, wrong


def test_expected_calibration_error_matches_the_hand_worked_case():
    # 15 bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 12, 0.6 -> bin 9, 0.7 -> bin 10, one each.
    # ECE = 1/4 (|1 - 0.9| + |0 - 0.8| + |1 - 0.6| + |0 - 0.7|) = 2.0 / 4 = 0.5
    ece = expected_calibration_error(logits_for(PROBABILITIES), LABELS)
    assert ece == pytest.approx(0.5, abs=1e-6)


def test_expected_calibration_error_pools_images_that_share_a_bin():
    # Confidences 0.61 and 0.63 share bin 9 (0.600-0.667): mean confidence 0.62, accuracy 1/2;
    # 0.95 sits alone in bin 14, right. ECE = 2/3 |0.5 - 0.62| + 1/3 |1 - 0.95| = 0.08 + 0.01667
    probabilities = [[0.61, 0.39], [0.37, 0.63], [0.95, 0.05]]
    labels = torch.tensor([0, 0, 0])
    expected = 2 / 3 * 0.12 + 1 / 3 * 0.05
    assert expected_calibration_error(logits_for(probabilities), labels) == pytest.approx(
        expected, abs=1e-6
    )
    diagram = reliability_diagram(logits_for(probabilities), labels)
    assert diagram.count[9] == 2 and diagram.count[14] == 1 and sum(diagram.count) == 3
    assert diagram.confidence[9] == pytest.approx(0.62)
    assert diagram.accuracy[9] == pytest.approx(0.5)
    assert diagram.accuracy[14] == 1.0
    assert len(diagram.edges) == 16 and diagram.edges[0] == 0 and diagram.edges[-1] == 1


def test_reliability_diagram_gives_the_same_ece_as_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (500,), generator=generator)
    diagram = reliability_diagram(logits, labels)
    from_bins = sum(
        count / 500 * abs(accuracy - confidence)
        for count, accuracy, confidence in zip(
            diagram.count, diagram.accuracy, diagram.confidence, strict=True
        )
    )
    # torchmetrics answers in float32
    assert from_bins == pytest.approx(expected_calibration_error(logits, labels), abs=1e-6)


def test_softmax_is_applied_even_to_logits_inside_zero_one():
    # torchmetrics would read logits within [0, 1] as probabilities; ours are always logits.
    logits = torch.tensor([[0.2, 0.9], [0.1, 0.3]])
    confidence = torch.softmax(logits.double(), dim=1).max(dim=1).values  # 0.668, 0.550
    labels = torch.tensor([1, 1])  # both right
    expected = float((1 - confidence).mean())
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)


def test_negative_log_likelihood_and_brier_score_match_the_hand_worked_case():
    logits = logits_for(PROBABILITIES)
    # NLL = -1/4 (ln 0.9 + ln 0.2 + ln 0.6 + ln 0.3)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.3)) / 4
    assert negative_log_likelihood(logits, LABELS) == pytest.approx(nll)
    # Brier per image, two classes: 2 (1 - p_true)^2 -> 2 (0.01 + 0.64 + 0.16 + 0.49) / 4
    assert brier_score(logits, LABELS) == pytest.approx(2 * 1.30 / 4)


def test_temperature_divides_the_logits():
    logits = logits_for(PROBABILITIES)
    assert negative_log_likelihood(logits, LABELS, temperature=2.0) == pytest.approx(
        negative_log_likelihood(logits / 2, LABELS)
    )
    summary = calibration(logits, LABELS)
    assert summary.accuracy == 0.5
    assert summary.brier_score == pytest.approx(0.65)
    assert summary.temperature == 1.0


def test_fit_temperature_recovers_a_known_temperature():
    # Labels drawn from softmax(z) are calibrated for z; a model reporting 2.5 z is overconfident
    # by T = 2.5, which the fit must find (to sampling error on 4,000 images).
    generator = torch.Generator().manual_seed(1)
    calibrated = torch.randn(4000, 10, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(calibrated.softmax(dim=1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(calibrated * 2.5, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    before = expected_calibration_error(calibrated * 2.5, labels)
    after = expected_calibration_error(calibrated * 2.5, labels, temperature=temperature)
    assert after < before / 3
    underconfident = fit_temperature(calibrated * 0.5, labels)
    assert underconfident == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize(
    ("logits", "labels", "temperature", "message"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), 1.0, "logits must be (N, C)"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 1.0, "labels must be (4,)"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), 1.0, "labels must lie in 0..2"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), 0.0, "temperature must be positive"),
    ],
)
def test_bad_input_names_the_value(logits, labels, temperature, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        negative_log_likelihood(logits, labels, temperature=temperature)
