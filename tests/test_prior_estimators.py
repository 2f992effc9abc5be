"""The building blocks of label-shift estimation: EM (weighted, MAP), its covariance, BBSE, RLLS, and the
empirical-Bayes shrinkage of a log prior, each against a closed form or a hand count."""

import math

import numpy as np
import pytest
import torch
from helpers import gaussian_logits

from balpoe_hf.models.balpoe.prior_estimators import (
    bbse_prior,
    confusion_matrix,
    effective_images,
    em_prior,
    log_prior_covariance,
    project_to_simplex,
    rlls_prior,
)
from balpoe_hf.models.balpoe.shrinkage import FULL_COVARIANCE_CLASSES, centred_basis, shrink_log_prior

MEANS = np.array([-2.0, 0.0, 2.0])


def _one_hot(counts):
    """Posteriors that are one-hot on label c for counts[c] rows."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.nn.functional.one_hot(labels, len(counts)).double()


def _gaussian_posteriors(true_prior, source_prior, n=30000, seed=0, spacing=1.0):
    """Labels drawn from ``true_prior``; exact posteriors of x ~ N(spacing * mean_y, 1) under
    ``source_prior``."""
    logits, _ = gaussian_logits(true_prior, n, np.random.default_rng(seed), spacing * MEANS)
    return torch.softmax(logits + torch.from_numpy(np.log(source_prior)), dim=1)


# --------------------------------------------------------------------------- EM (Saerens et al., 2002)


def test_em_on_one_hot_posteriors_is_the_label_frequencies():
    counts = [500, 300, 200]
    prior, converged = em_prior(_one_hot(counts))
    assert converged and prior.numpy() == pytest.approx(np.array(counts) / 1000, abs=1e-9)


def test_em_map_matches_the_pseudo_count_closed_form():
    # pi_c = (n_c + a) / (N + C a) for one-hot posteriors.
    counts, pseudo = [500, 300, 200], 100.0
    prior, _ = em_prior(_one_hot(counts), pseudo_counts=pseudo)
    assert prior.numpy() == pytest.approx((np.array(counts) + pseudo) / 1300, abs=1e-9)


def test_integer_weights_are_repeated_images():
    probs = _gaussian_posteriors([0.6, 0.3, 0.1], [1 / 3] * 3, n=400, seed=1)
    weights = torch.from_numpy(np.random.default_rng(2).integers(1, 4, size=400)).double()
    repeated = probs.repeat_interleave(weights.long(), dim=0)
    weighted, _ = em_prior(probs, weights=weights)
    plain, _ = em_prior(repeated)
    assert weighted.numpy() == pytest.approx(plain.numpy(), abs=1e-8)


@pytest.mark.parametrize("source_prior", [None, [0.2, 0.3, 0.5]])
def test_em_recovers_a_known_prior_from_calibrated_posteriors(source_prior):
    true_prior = np.array([0.6, 0.3, 0.1])
    probs = _gaussian_posteriors(true_prior, source_prior or [1 / 3] * 3)
    estimate, _ = em_prior(probs, source_prior=source_prior)
    assert estimate.sum() == pytest.approx(1.0)
    assert estimate.numpy() == pytest.approx(true_prior, abs=0.015)
    # The plain mean of the posteriors is pulled towards the source prior; EM removes that bias.
    naive = probs.mean(0).numpy()
    assert np.abs(estimate.numpy() - true_prior).max() < np.abs(naive - true_prior).max() / 3


def test_em_leaves_a_symmetric_set_uniform_and_starts_from_the_mean_posterior():
    row = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    probs = torch.stack([row.roll(k) for k in range(3)] * 5)
    assert em_prior(probs)[0].numpy() == pytest.approx([1 / 3] * 3, abs=1e-12)
    # One update from uniform is the mean posterior (max_iter=1 leaves no room for the extrapolation).
    first_step, _ = em_prior(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), max_iter=1)
    assert first_step.numpy() == pytest.approx([0.6, 0.4])


def test_accelerated_em_reaches_the_plain_em_fixed_point():
    # Heavily overlapping classes: plain EM crawls (thousands of updates); SQUAREM gets there in 200.
    probs = _gaussian_posteriors([0.1, 0.3, 0.6], [1 / 3] * 3, n=2000, seed=5, spacing=0.35)
    fast, converged = em_prior(probs, max_iter=200)
    prior = torch.full((3,), 1 / 3, dtype=torch.float64)
    for _ in range(100000):  # the plain update, written out, until it stops moving (about 1,800 updates)
        responsibilities = probs * prior
        updated = (responsibilities / responsibilities.sum(1, keepdim=True)).mean(0)
        if (updated - prior).abs().max() < 1e-13:
            break
        prior = updated
    assert converged and fast.numpy() == pytest.approx(prior.numpy(), abs=1e-5)


# --------------------------------------------------------------------------- the estimate's covariance


def test_covariance_of_one_hot_posteriors_is_the_multinomial_one():
    # Cov(pi) = (diag(pi) - pi pi^T) / N, so Var(log pi_c) = (1 - pi_c) / (N pi_c) and
    # Cov(log pi_a, log pi_b) = -1 / N.
    counts = [500, 300, 200]
    pi = np.array(counts) / 1000
    prior, _ = em_prior(_one_hot(counts))
    covariance = log_prior_covariance(_one_hot(counts), prior).numpy()
    expected = (np.diag(1 / pi) - 1) / 1000
    assert covariance == pytest.approx(expected, rel=1e-6)


def test_weighted_covariance_is_that_of_a_weighted_mean():
    # One-hot posteriors with weights: the estimate is the weighted label frequency pi = sum_i w_i e_i / W, a
    # weighted mean, whose (delta-method) covariance is sum_i w_i^2 (e_i - pi)(e_i - pi)^T / W^2, whatever
    # the weights' scale; for equal weights (1 - 1/N times) the multinomial one.
    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=600, p=[0.5, 0.3, 0.2])
    probs = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).double()
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, size=600))
    prior, _ = em_prior(probs, weights=weights)
    total = weights.sum()
    frequencies = (weights[:, None] * probs).sum(0) / total
    assert prior.numpy() == pytest.approx(frequencies.numpy(), abs=1e-9)
    deviations = probs - frequencies
    covariance = (weights.square()[:, None] * deviations).T @ deviations / total**2
    expected = (covariance / frequencies[:, None] / frequencies[None, :]).numpy()
    for scale in (1.0, 7.0):
        got = log_prior_covariance(probs, prior, weights=weights * scale).numpy()
        assert got == pytest.approx(expected, rel=1e-6)
    # Kish's effective number of images, (sum w)^2 / sum w^2.
    assert effective_images(weights) == pytest.approx(total.item() ** 2 / (weights**2).sum().item())


# --------------------------------------------------------------------------- BBSE and RLLS


def test_confusion_matrix_hand_example():
    # rows: true labels, columns: predictions
    counts = confusion_matrix([0, 1, 1, 2, 0], [0, 1, 0, 2, 2], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_bbse_closed_form():
    # P(yhat | y) = [[0.8, 0.2], [0.3, 0.7]] and pi_t = [0.25, 0.75] give prediction frequencies
    # mu = K^T pi_t = [0.8 * 0.25 + 0.3 * 0.75, 0.2 * 0.25 + 0.7 * 0.75] = [0.425, 0.575].
    confusion = torch.tensor([[80.0, 20.0], [30.0, 70.0]])
    assert bbse_prior(confusion, [425, 575]).tolist() == pytest.approx([0.25, 0.75])
    # The held-out class counts do not matter, only P(yhat | y): scale a row.
    assert bbse_prior(confusion * torch.tensor([[4.0], [1.0]]), [0.425, 0.575]).tolist() == pytest.approx(
        [0.25, 0.75])
    # mu = [0.9, 0.1] needs pi_t = [1.2, -0.2]; the projection onto the simplex gives [1, 0].
    assert bbse_prior(confusion, [0.9, 0.1]).tolist() == pytest.approx([1.0, 0.0])


def test_rlls_without_regularisation_is_bbse_and_with_a_large_one_is_no_shift():
    confusion = torch.tensor([[80.0, 20.0], [30.0, 70.0]])
    assert rlls_prior(confusion, [425, 575], regularization=0.0).tolist() == pytest.approx([0.25, 0.75],
                                                                                           abs=1e-6)
    assert rlls_prior(confusion, [425, 575], regularization=1e6).tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("vector", "expected"),
    [([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), ([0.5, 0.5, 0.5], [1 / 3] * 3), ([2.0, 0.0], [1.0, 0.0]),
     ([0.6, 0.6, -1.0], [0.5, 0.5, 0.0])],
)
def test_project_to_simplex_hand_examples(vector, expected):
    assert project_to_simplex(vector).tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------- empirical-Bayes shrinkage


def _isotropic_closed_form(log_prior, variance):
    """For errors s^2 I on the centred subspace (C - 1 dimensions), tau^2 = max(0, |x|^2 / (C - 1) - s^2)
    maximises the marginal likelihood, and the posterior mean is tau^2 / (tau^2 + s^2) times the estimate."""
    centred = log_prior - log_prior.mean()
    spread = max(0.0, float(centred @ centred) / (len(centred) - 1) - variance)
    return spread / (spread + variance) * centred, spread


@pytest.mark.parametrize("log_prior", [[1.5, 0.2, -0.4, -1.3], [0.05, -0.02, 0.01, -0.04]])
def test_shrinkage_with_isotropic_errors_matches_the_closed_form(log_prior):
    estimate = torch.tensor(log_prior, dtype=torch.float64)
    variance = 0.04
    covariance = variance * torch.eye(4, dtype=torch.float64)
    shrunk, spread = shrink_log_prior(estimate, covariance)
    expected, expected_spread = _isotropic_closed_form(estimate, variance)
    assert spread == pytest.approx(expected_spread, rel=1e-3, abs=1e-9)
    assert shrunk.numpy() == pytest.approx(expected.numpy(), rel=1e-3, abs=1e-9)


def test_an_estimate_within_its_errors_is_shrunk_to_uniform_and_a_strong_one_hardly_at_all():
    small = torch.tensor([0.1, -0.1, 0.05, -0.05], dtype=torch.float64)
    shrunk, spread = shrink_log_prior(small, 0.25 * torch.eye(4, dtype=torch.float64))
    assert spread == 0 and torch.equal(shrunk, torch.zeros(4, dtype=torch.float64))
    strong = torch.tensor(np.log([0.6, 0.25, 0.1, 0.05]), dtype=torch.float64)
    shrunk, _ = shrink_log_prior(strong, 0.01 * torch.eye(4, dtype=torch.float64))
    centred = strong - strong.mean()
    assert (shrunk / centred).numpy() == pytest.approx([0.99] * 4, abs=0.01)


def test_a_class_with_a_larger_error_is_shrunk_more():
    estimate = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    covariance = torch.diag(torch.tensor([0.01, 0.01, 0.01, 1.0], dtype=torch.float64))
    shrunk, _ = shrink_log_prior(estimate, covariance)
    assert abs(shrunk[3]) < abs(shrunk[1]) and abs(shrunk[0]) > 0.8


def test_many_classes_use_the_diagonal_and_match_the_per_class_closed_form():
    num_classes = FULL_COVARIANCE_CLASSES + 44
    rng = np.random.default_rng(4)
    truth = rng.normal(0, 1.0, num_classes)
    estimate = torch.from_numpy(truth + rng.normal(0, 0.5, num_classes))
    variances = torch.full((num_classes,), 0.25, dtype=torch.float64)
    shrunk, spread = shrink_log_prior(estimate, variances)
    centred = estimate - estimate.mean()
    # Independent classes: tau^2 = mean(x^2) - s^2, factor tau^2 / (tau^2 + s^2) (centred again after).
    expected_spread = float(centred.square().mean()) - 0.25
    assert spread == pytest.approx(expected_spread, rel=0.02)
    factor = spread / (spread + 0.25)
    assert shrunk.numpy() == pytest.approx((factor * centred - (factor * centred).mean()).numpy(), abs=1e-9)


def test_centred_basis_is_orthonormal_and_sums_to_zero():
    basis = centred_basis(5)
    assert basis.shape == (5, 4)
    assert (basis.T @ basis).numpy() == pytest.approx(np.eye(4), abs=1e-12)
    assert basis.sum(0).numpy() == pytest.approx(np.zeros(4), abs=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("probs", "kwargs", "message"),
    [
        (torch.tensor([[0.5, 0.3]]), {}, "sum to 1"),
        (torch.tensor([[2.0, -1.0]]), {}, "softmax"),  # logits, not probabilities
        (torch.tensor([[1.2, -0.2]]), {}, "non-negative"),
        (torch.tensor([0.5, 0.5]), {}, "shape"),
        (torch.tensor([[float("nan"), 1.0]]), {}, "finite"),
        (torch.tensor([[0.5, 0.5]]), {"source_prior": [1.0, 0.0]}, "source_prior"),
        (torch.tensor([[0.5, 0.5]]), {"source_prior": [0.2, 0.3, 0.5]}, "entries"),
        (torch.tensor([[0.5, 0.5]]), {"weights": [1.0, 2.0]}, "weights must hold 1"),
        (torch.tensor([[0.5, 0.5]]), {"weights": [-1.0]}, "non-negative"),
        (torch.tensor([[0.5, 0.5]]), {"pseudo_counts": -1.0}, "pseudo_counts"),
        (torch.tensor([[0.5, 0.5]]), {"max_iter": 0}, "max_iter"),
    ],
)
def test_em_rejects_bad_input(probs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        em_prior(probs, **kwargs)


def test_bbse_and_confusion_bad_input():
    with pytest.raises(ValueError, match=r"classes \[1\] have no held-out sample"):
        bbse_prior(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), [1, 1])
    with pytest.raises(ValueError, match="square"):
        bbse_prior(torch.ones(2, 3), [1, 1])
    with pytest.raises(ValueError, match="positive total"):
        bbse_prior(torch.eye(2), [0, 0])
    with pytest.raises(ValueError, match="regularization"):
        rlls_prior(torch.eye(2), [1, 1], regularization=-1.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), one per sample, got \(1,\)"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="must lie in"):
        confusion_matrix([0, 3], [0, 1], 2)
    with pytest.raises(TypeError, match="integer class indices"):
        confusion_matrix([0.0, 1.0], [0, 1], 2)


def test_effective_images_of_equal_weights_is_their_number():
    assert effective_images(torch.ones(7, dtype=torch.float64)) == pytest.approx(7.0)
    assert math.isclose(effective_images(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)), 1.0)
