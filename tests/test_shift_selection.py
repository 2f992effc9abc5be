"""Label shift, safe on any model: RLLS, the BCTS bias covariance, the gain guard, the per-model choice of the
estimator on the held-out split, and the choice saved with the model."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification
from balpoe_hf.calibration import bcts_bias_covariance, fit_bcts
from balpoe_hf.label_shift import (
    LEGACY_AUTO,
    RLLS_DELTA,
    UnknownPriorMethod,
    bbse_prior,
    estimate_unknown_prior,
    holdout_calibration,
    resolve_unknown_prior_method,
    rlls_prior,
)
from balpoe_hf.shift_selection import (
    CANDIDATES,
    choose_from_summary,
    choose_shift_estimator,
    shift_prior,
    simulate_holdout_shifts,
)

SOURCE_PRIOR = np.array([0.55, 0.25, 0.13, 0.07])
TRAIN_COUNTS = [550, 250, 130, 70]


def gaussian_logits(prior, num_samples, rng, scales=(1.0, 1.0, 1.0, 1.0), bias=(0.0, 0.0, 0.0, 0.0)):
    """Labels from ``prior``, x ~ N(2 y, 1), uniform-prior logits ``scales * log p(x|y) + bias``.

    Unit scales and no bias: exactly calibrated. A common scale and a bias: fixed by BCTS. Scales that differ
    by class: miscalibrated in a way no temperature and bias undo.
    """
    means = 2.0 * np.arange(4)
    labels = rng.choice(4, size=num_samples, p=prior)
    x = rng.normal(means[labels], 1.0)
    log_likelihood = -0.5 * (x[:, None] - means[None, :]) ** 2
    return torch.from_numpy(log_likelihood * np.asarray(scales) + np.asarray(bias)), torch.from_numpy(labels)


def accuracy_gain(logits, labels, prior):
    """Top-1 accuracy with ``logits + log prior`` minus with the logits alone, in points."""
    adjusted = logits + torch.as_tensor(prior).clamp_min(1e-300).log()
    correct = (adjusted.argmax(1) == labels).double().mean() - (logits.argmax(1) == labels).double().mean()
    return 100 * float(correct)


# --------------------------------------------------------------------------- RLLS


def test_rlls_on_a_perfect_classifier_is_bbse_or_no_shift_by_the_closed_form():
    # K = I: A = K^T diag(uniform) = I / C, so |A theta - b| + rho |theta| with phi = theta / C is
    # |phi - b| + rho C |phi|: by the triangle inequality the optimum is phi = b (the target frequencies) when
    # rho C < 1 and phi = 0 (uniform) when rho C > 1.
    num_classes, per_class = 4, 50
    confusion = torch.eye(num_classes) * per_class
    predicted = torch.tensor([40.0, 30.0, 20.0, 10.0])
    log_term = math.log(2 * num_classes / RLLS_DELTA)
    n = num_classes * per_class
    delta = 3 * (2 * log_term / (3 * n) + math.sqrt(2 * log_term / n))
    below, above = 0.9 / (num_classes * delta), 1.1 / (num_classes * delta)
    assert rlls_prior(confusion, predicted, regularization=below).tolist() == pytest.approx(
        [0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert rlls_prior(confusion, predicted, regularization=above).tolist() == pytest.approx([0.25] * 4)


def test_rlls_without_regularization_is_bbse():
    confusion = torch.tensor([[80.0, 15, 5], [10, 70, 20], [5, 10, 85]])
    predicted = torch.tensor([200.0, 300, 500])
    assert rlls_prior(confusion, predicted, regularization=0.0).tolist() == pytest.approx(
        bbse_prior(confusion, predicted).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="regularization must be a finite number >= 0"):
        rlls_prior(confusion, predicted, regularization=-1.0)


# --------------------------------------------------------------------------- the BCTS bias covariance


def test_bias_covariance_is_the_inverse_hessian_of_the_penalised_likelihood():
    # Independent check: autograd's Hessian of the summed NLL plus the Gaussian prior, in the biases, at the
    # fitted (T, b); restricted to mean-zero biases (the representative fit_bcts reports).
    logits, labels = gaussian_logits(SOURCE_PRIOR, 400, np.random.default_rng(0), scales=(2, 2, 2, 2))
    offset = torch.from_numpy(np.log(SOURCE_PRIOR))
    temperature, bias = fit_bcts(logits, labels, offset=offset, bias_std=1.0)
    covariance = bcts_bias_covariance(logits, temperature, bias, offset=offset, bias_std=1.0)

    def penalised_nll(b):
        nll = F.cross_entropy(logits / temperature + b + offset, labels, reduction="sum")
        return nll + 0.5 * b.square().sum()

    hessian = torch.autograd.functional.hessian(penalised_nll, bias.clone())
    centring = torch.eye(4, dtype=torch.float64) - 0.25
    expected = centring @ torch.linalg.inv(hessian) @ centring
    torch.testing.assert_close(covariance, expected, rtol=1e-6, atol=1e-9)
    # The rarest class is known worst; confusable neighbours are correlated.
    standard_error = covariance.diagonal().sqrt()
    assert int(standard_error.argmax()) == 3


def test_holdout_calibration_keeps_the_covariance_as_a_factor_and_standard_errors():
    logits, labels = gaussian_logits(SOURCE_PRIOR, 400, np.random.default_rng(0))
    calibration = holdout_calibration(logits, labels)
    factor = torch.tensor(calibration["bias_cov_factor"], dtype=torch.float64)
    counts = torch.tensor(calibration["holdout_counts"], dtype=torch.float64)
    offset = (counts / counts.sum()).log()
    covariance = bcts_bias_covariance(logits, calibration["temperature"], calibration["bias"], offset=offset,
                                      bias_std=calibration["bias_std"])
    # Four classes, rank 32: the factor is exact.
    torch.testing.assert_close(factor @ factor.T, covariance, rtol=1e-6, atol=1e-10)
    assert calibration["bias_se"] == pytest.approx(covariance.diagonal().sqrt().tolist())


# --------------------------------------------------------------------------- the gain guard


def test_gain_guard_keeps_uniform_on_unshifted_data_and_adapts_to_a_strong_shift():
    rng = np.random.default_rng(1)
    calibration = holdout_calibration(*gaussian_logits(SOURCE_PRIOR, 1500, rng))
    unshifted, _ = gaussian_logits(np.full(4, 0.25), 3000, rng)
    # Unguarded BCTS-EM always finds some "shift" in sampling noise; the guard sees no gain beyond its noise.
    unguarded = estimate_unknown_prior(unshifted, calibration, "em-bcts").prior
    assert not torch.equal(unguarded, torch.full((4,), 0.25, dtype=torch.float64))
    kept = estimate_unknown_prior(unshifted, calibration, "em-bcts-gain")
    assert kept.guard_fired and kept.prior.tolist() == [0.25] * 4 and kept.details["shrink"] is None
    # A strong shift: the guard keeps (nearly all of) the estimate, and the gain.
    target = np.array([0.02, 0.08, 0.3, 0.6])
    shifted, labels = gaussian_logits(target, 3000, rng)
    adapted = estimate_unknown_prior(shifted, calibration, "em-bcts-gain")
    assert not adapted.guard_fired and adapted.details["shrink"] <= 0.25
    assert accuracy_gain(shifted, labels, adapted.prior) > 0.8 * accuracy_gain(shifted, labels, target)
    # Seeded: the same images give the same answer.
    assert torch.equal(estimate_unknown_prior(shifted, calibration, "em-bcts-gain").prior, adapted.prior)


def test_fewer_images_than_classes_keep_the_uniform_prior_with_a_warning():
    logits, _ = gaussian_logits(SOURCE_PRIOR, 3, np.random.default_rng(0))
    with pytest.warns(UserWarning, match="3 unlabelled images for 4 classes"):
        estimate = estimate_unknown_prior(logits, None, "em")
    assert estimate.guard_fired and estimate.prior.tolist() == [0.25] * 4
    assert "too few" in estimate.details["reason"]


# --------------------------------------------------------------------------- the choice


def test_shift_prior_closed_form():
    # Training ranks of classes [0, 1, 2] with counts [5, 50, 20] are [2, 0, 1]; forward ratio 4 over 3
    # classes gives rank k the weight 4 ** (-k / 2) = 1, 1/2, 1/4.
    counts = [5, 50, 20]
    assert shift_prior(counts, "forward4").tolist() == pytest.approx(np.array([0.25, 1.0, 0.5]) / 1.75)
    assert shift_prior(counts, "backward4").tolist() == pytest.approx(np.array([1.0, 0.25, 0.5]) / 1.75)
    assert shift_prior(counts, "uniform").tolist() == pytest.approx([1 / 3] * 3)


def test_holdout_simulation_of_a_calibrated_model():
    # Exactly calibrated synthetic logits: the oracle gains on a strong shift, and BCTS-EM with the
    # calibration of the other half gets most of that gain.
    logits, labels = gaussian_logits(SOURCE_PRIOR, 2000, np.random.default_rng(0))
    result = simulate_holdout_shifts(logits, labels, TRAIN_COUNTS, {"bcts": "em-bcts"},
                                     ["forward50", "uniform", "backward50"], sizes=[500], repeats=1)
    assert set(result) == {"oracle", "bcts"} and set(result["oracle"]["uniform"]) == {500}
    assert result["oracle"]["backward50"][500] > 0.02 and abs(result["oracle"]["uniform"][500]) < 0.01
    assert result["bcts"]["backward50"][500] > 0.5 * result["oracle"]["backward50"][500]
    with pytest.raises(ValueError, match=r"classes \[3\] have fewer than 2 held-out images"):
        simulate_holdout_shifts(logits[:7], torch.tensor([0, 0, 1, 1, 2, 2, 3]), [5, 4, 3, 2], {"em": "em"})


def test_rule_prefers_safety_within_the_simulations_error_then_the_order():
    def row(harm, recovered, worst=None):
        return {"harm": harm, "worst": harm if worst is None else worst, "mean": 0.0, "recovered": recovered}

    order = ["a", "b", "c"]
    # The oracle's own worst simulated loss (2 points) sets the tolerance: a (1.5 points more harm than c) is
    # as safe as the simulation can tell, and first in the order.
    summary = {"oracle": row(0.0, 1.0, worst=-0.02), "a": row(-0.025, 0.5), "b": row(-0.2, 0.9),
               "c": row(-0.01, 0.5)}
    assert choose_from_summary(summary, order) == "a"
    # With a near-exact simulation (the oracle loses nothing), a is beyond the tolerance: c is safer.
    summary["oracle"] = row(0.0, 1.0, worst=0.0)
    assert choose_from_summary(summary, order) == "c"
    # An estimator that never adapts is safe and useless: a useful one as safe (within the tolerance) wins...
    summary["oracle"] = row(0.0, 1.0, worst=-0.02)
    summary["a"], summary["c"] = row(-0.015, 0.5), row(0.0, 0.0)
    assert choose_from_summary(summary, order) == "a"
    # ... but when every useful one is clearly more harmful, the safe, useless one is chosen.
    summary["a"] = row(-0.08, 0.5)
    assert choose_from_summary(summary, order) == "c"


@pytest.mark.parametrize(("miscalibration", "failing"), [
    # Under-confident on the head, over-confident on the tail: EM on raw posteriors misreads the shift; one
    # temperature and a bias per class undo it, so BCTS-EM does not.
    ({"scales": (0.5, 1, 1, 2)}, {"em-gain"}),
    # Over-confident on the head, under-confident on the tail, against a middle of calibrated classes: no
    # temperature and bias undo that, so every EM misreads the shift; the confusion matrix (argmax only)
    # still carries over.
    ({"scales": (2, 1, 1, 0.5)}, {"em-gain", "em-bcts-gain"}),
])
def test_choice_avoids_the_estimators_that_fail_on_the_model(miscalibration, failing):
    rng = np.random.default_rng(0)
    holdout_logits, holdout_labels = gaussian_logits(SOURCE_PRIOR, 1200, rng, **miscalibration)
    choice = choose_shift_estimator(holdout_logits, holdout_labels, TRAIN_COUNTS, sizes=(400,), repeats=1)
    assert choice["name"] not in failing, choice["simulation"]
    # Judged on shifted sets from the same model: the failing estimators lose points, even behind the gain
    # guard; the choice does not (losses the true prior itself suffers are not counted).
    calibration = holdout_calibration(holdout_logits, holdout_labels)
    worst = {}
    for method in [*failing, choice["name"]]:
        gains = []
        for shift in ("forward50", "uniform", "backward10", "backward50"):
            true_prior = shift_prior(TRAIN_COUNTS, shift)
            logits, labels = gaussian_logits(true_prior.numpy(), 3000, rng, **miscalibration)
            prior = estimate_unknown_prior(logits, calibration, CANDIDATES[method]).prior
            oracle = accuracy_gain(logits, labels, true_prior)
            gains.append(accuracy_gain(logits, labels, prior) - min(0.0, oracle))
        worst[method] = min(gains)
    assert worst[choice["name"]] > -0.5 and all(worst[m] < -1.0 for m in failing), worst


# --------------------------------------------------------------------------- saved with the model


def test_the_choice_travels_in_config_json_and_auto_runs_it(tmp_path):
    rng = np.random.default_rng(0)
    holdout_logits, holdout_labels = gaussian_logits(SOURCE_PRIOR, 400, rng)
    calibration = holdout_calibration(holdout_logits, holdout_labels)
    chosen = {"name": "bbse-gain", "settings": CANDIDATES["bbse-gain"].to_dict(), "rule": "by hand"}
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=1, class_counts=TRAIN_COUNTS, image_size=8,
                          calibration=calibration, shift_estimator=chosen)
    BalPoEForImageClassification(config).save_pretrained(tmp_path)
    loaded = BalPoEForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.shift_estimator == chosen
    logits, _ = gaussian_logits(np.array([0.1, 0.2, 0.3, 0.4]), 500, rng)
    auto = estimate_unknown_prior(logits, loaded.config.calibration, "auto", loaded.config.shift_estimator)
    explicit = estimate_unknown_prior(logits, calibration, CANDIDATES["bbse-gain"])
    assert auto.method == "auto (bbse-gain)" and torch.equal(auto.prior, explicit.prior)
    # A config without a choice runs the fixed estimator of earlier releases.
    assert resolve_unknown_prior_method("auto", None) == ("auto", LEGACY_AUTO)


def test_malformed_choices_are_refused_with_their_fix():
    calibration = holdout_calibration(*gaussian_logits(SOURCE_PRIOR, 400, np.random.default_rng(0)))
    base = {"backbone": "resnet20_cifar", "num_experts": 1, "class_counts": TRAIN_COUNTS, "image_size": 8}
    with pytest.raises(ValueError, match="must be a mapping with a 'name' and 'settings'"):
        BalPoEConfig(**base, calibration=calibration, shift_estimator={"name": "x"})
    with pytest.raises(ValueError, match="reads the held-out calibration, but calibration is None"):
        BalPoEConfig(**base, shift_estimator={"name": "em-bcts-gain",
                                              "settings": CANDIDATES["em-bcts-gain"].to_dict()})
    with pytest.raises(ValueError, match="bbse and rlls read the confusion matrix"):
        UnknownPriorMethod(calibration="bcts", method="bbse")
    with pytest.raises(ValueError, match="guard must be one of"):
        UnknownPriorMethod(calibration=None, guard="maybe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnknownPriorMethod.from_dict(CANDIDATES["rlls-gain"].to_dict())  # round trip, silently
