import math

import pytest
import torch

from balpoe_hf.models.balpoe.calibration import apply_calibration, fit_bcts, fit_temperature, validate_logits

NUM_SAMPLES, NUM_CLASSES = 20000, 5
TEMPERATURE = 2.5
BIAS = torch.tensor([0.8, -0.3, 0.0, 0.4, -0.9], dtype=torch.float64)
BIAS = BIAS - BIAS.mean()  # the representative fit_bcts reports
LOG_PRIOR = torch.tensor([0.5, 0.25, 0.13, 0.08, 0.04], dtype=torch.float64).log()


def _logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=generator, dtype=torch.float64)


def _labels(calibrated_logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Labels drawn from softmax(calibrated_logits): the model is exactly right after calibration."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(calibrated_logits, dim=1), 1, generator=generator).squeeze(1)


def _fisher_standard_errors(z, temperature, bias, offset):
    """Asymptotic standard errors of ``(T, b)`` for labels drawn from ``softmax(z / T + b + offset)``.

    The model is linear in ``a = 1/T`` and ``b`` (logit ``c`` has gradient ``z_c`` in ``a`` and ``e_c``
    in ``b``), so the expected information is ``sum_i J_i^T (diag p_i - p_i p_i^T) J_i``, ``J_i = [z_i | I]``.
    Softmax ignores a constant added to ``b``; the pseudo-inverse gives the covariance of the mean-zero
    representative. The delta method turns ``se(a)`` into ``se(T) = T^2 se(a)``.
    """
    p = torch.softmax(z / temperature + bias + offset, dim=1)
    centred = z - (p * z).sum(dim=1, keepdim=True)
    info = torch.zeros(NUM_CLASSES + 1, NUM_CLASSES + 1, dtype=torch.float64)
    info[0, 0] = (p * centred**2).sum()
    info[0, 1:] = info[1:, 0] = (p * centred).sum(dim=0)
    info[1:, 1:] = torch.diag(p.sum(dim=0)) - p.T @ p
    se = torch.linalg.pinv(info, hermitian=True).diagonal().sqrt()
    return temperature**2 * float(se[0]), se[1:]


def test_apply_calibration_hand_example():
    logits = torch.tensor([[2.0, 4.0]])
    calibrated = apply_calibration(logits, 2.0, [0.5, -0.5])
    assert calibrated.dtype == torch.float32
    assert calibrated.tolist() == [[1.5, 1.5]]
    assert apply_calibration(logits, 2.0).tolist() == [[1.0, 2.0]]


def test_fit_temperature_recovers_a_known_temperature():
    z = _logits()
    fitted = fit_temperature(z, _labels(z / TEMPERATURE))
    se, _ = _fisher_standard_errors(z, TEMPERATURE, torch.zeros(NUM_CLASSES), torch.zeros(NUM_CLASSES))
    assert se < 0.05  # 20000 samples pin T down; the bound keeps the test meaningful
    assert abs(fitted - TEMPERATURE) < 5 * se


def test_fit_bcts_recovers_a_known_temperature_and_bias_with_a_prior_offset():
    # Held-out labels follow a long-tailed prior: softmax(z / T + b + log pi).
    z = _logits()
    labels = _labels(z / TEMPERATURE + BIAS + LOG_PRIOR)
    temperature, bias = fit_bcts(z, labels, offset=LOG_PRIOR)
    se_temperature, se_bias = _fisher_standard_errors(z, TEMPERATURE, BIAS, LOG_PRIOR)
    assert abs(temperature - TEMPERATURE) < 5 * se_temperature
    assert bias.dtype == torch.float64
    assert bias.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert ((bias - BIAS).abs() < 5 * se_bias).all(), (bias, BIAS, se_bias)
    # Without the offset the same fit must absorb log pi into the bias: z / T + (b + log pi).
    temperature_plain, bias_plain = fit_bcts(z, labels)
    assert temperature_plain == pytest.approx(temperature, rel=1e-6)
    shifted = BIAS + LOG_PRIOR
    assert torch.allclose(bias_plain - bias, shifted - shifted.mean() - BIAS, atol=1e-5)


def test_bcts_bias_prior_handles_a_class_without_held_out_samples():
    z = _logits()[:2000]
    labels = _labels(z / TEMPERATURE)
    labels[labels == 4] = 0  # class 4 never appears in the held-out labels
    with pytest.raises(ValueError, match=r"classes \[4\] have no held-out sample.*bias_std"):
        fit_bcts(z, labels)
    temperature, bias = fit_bcts(z, labels, bias_std=1.0)
    assert math.isfinite(temperature) and torch.isfinite(bias).all()
    # The data only ever say "not class 4", so the prior-regularised bias of class 4 is the lowest.
    assert int(bias.argmin()) == 4
    # A tight prior pins every bias near 0, which is temperature scaling: at the optimum
    # b_c / bias_std^2 = sum_i (1[y_i = c] - p_ic), so |b_c| <= bias_std^2 * N = 0.002.
    temperature_tight, bias_tight = fit_bcts(z, labels, bias_std=1e-3)
    assert bias_tight.abs().max() <= 1e-6 * len(labels)
    assert temperature_tight == pytest.approx(fit_temperature(z, labels), rel=0.01)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "error", "message"),
    [
        (torch.zeros(4), [0, 1, 0, 1], {}, ValueError, "shape \\(num_samples, num_classes\\)"),
        (torch.zeros(4, 1), [0, 0, 0, 0], {}, ValueError, "num_classes >= 2"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), [0, 1], {}, ValueError, "NaN or infinite"),
        (torch.zeros(2, 2, dtype=torch.long), [0, 1], {}, TypeError, "floating-point"),
        (torch.zeros(3, 2), [0, 1], {}, ValueError, "labels must have shape \\(3,\\)"),
        (torch.zeros(2, 2), [0, 2], {}, ValueError, "labels must lie in \\[0, 1\\]"),
        (torch.zeros(2, 2), [0.0, 1.0], {}, TypeError, "integer class indices"),
        (torch.zeros(2, 2), [0, 1], {"offset": [0.0, 0.0, 0.0]}, ValueError, "offset must have shape"),
        (torch.zeros(2, 2), [0, 1], {"bias_std": 0.0}, ValueError, "bias_std must be a positive"),
        (torch.zeros(2, 2), [0, 1], {"max_iter": 0}, ValueError, "max_iter"),
    ],
)
def test_fit_bcts_bad_input(logits, labels, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_bcts(logits, labels, **kwargs)


def test_fit_that_stops_early_raises():
    z = _logits()[:2000]
    with pytest.raises(RuntimeError, match="did not converge in 1 LBFGS iterations"):
        fit_bcts(z, _labels(z / TEMPERATURE + BIAS), max_iter=1)


@pytest.mark.parametrize(
    ("temperature", "bias", "message"),
    [
        (0.0, None, "temperature"),
        (float("nan"), None, "temperature"),
        (-1.0, None, "temperature"),
        (1.0, [0.0, 0.0, 0.0], "bias must have shape \\(2,\\)"),
        (1.0, [0.0, float("inf")], "bias contains NaN"),
    ],
)
def test_apply_calibration_bad_input(temperature, bias, message):
    with pytest.raises(ValueError, match=message):
        apply_calibration(torch.zeros(3, 2), temperature, bias)


def test_validate_logits_returns_a_float64_copy_of_the_same_values():
    logits = torch.tensor([[0.1, -2.5, 3.0], [1e-8, 7.25, -0.3]], dtype=torch.float32)
    checked = validate_logits(logits)
    assert checked.dtype == torch.float64 and torch.equal(checked, logits.double())  # float32 -> 64 is exact
    checked[0, 0] = 99.0
    assert logits[0, 0] == pytest.approx(0.1)  # a copy: the caller's tensor is untouched
