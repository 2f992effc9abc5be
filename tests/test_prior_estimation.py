"""Label-shift estimation: EM on BCTS-calibrated posteriors, BBSE, the likelihood-ratio guard."""

import math

import numpy as np
import pytest
import torch

from balpoe_hf.calibration import fit_bcts
from balpoe_hf.label_shift import (
    bbse_prior,
    confusion_matrix,
    estimate_prior,
    estimate_target_prior,
    likelihood_ratio_test,
    project_to_simplex,
)

SOURCE_PRIOR = np.array([0.55, 0.25, 0.13, 0.07])  # long-tailed training prior of the held-out data
TARGET_PRIOR = np.array([0.1, 0.2, 0.3, 0.4])  # the shifted, unlabelled test prior


def _gaussian_logits(prior, num_samples, rng, spacing=2.0, scale=1.0, class_bias=(0.0, 0.0, 0.0, 0.0)):
    """Labels from ``prior``, x ~ N(spacing * y, 1) and logits ``scale * log p(x|y) + class_bias``.

    ``scale = 1`` and no bias gives exact uniform-prior posteriors; otherwise the model is overconfident
    (temperature ``scale``) and off class by class, and ``(T, b) = (scale, -class_bias / scale)`` fixes it.
    """
    means = spacing * np.arange(4)
    labels = rng.choice(4, size=num_samples, p=prior)
    x = rng.normal(means[labels], 1.0)
    log_likelihood = -0.5 * (x[:, None] - means[None, :]) ** 2
    return torch.from_numpy(scale * log_likelihood + np.asarray(class_bias)), torch.from_numpy(labels)


def _one_hot_logits(counts):
    """Logits whose softmax is one-hot (within exp(-60)) on label c for counts[c] rows."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return 60.0 * torch.nn.functional.one_hot(labels, len(counts)).double()


def test_em_on_bcts_calibrated_posteriors_recovers_a_shifted_prior_that_plain_em_misses():
    rng = np.random.default_rng(0)
    miscalibration = {"scale": 2.0, "class_bias": (2.25, 0.0, -1.5, -0.75)}
    held_out_logits, held_out_labels = _gaussian_logits(SOURCE_PRIOR, 20000, rng, **miscalibration)
    target_logits, _ = _gaussian_logits(TARGET_PRIOR, 5000, rng, **miscalibration)
    plain = estimate_prior(target_logits, guard="none")
    # Held-out data follow the training prior: fit on the uniform-prior logits plus log pi_train.
    temperature, bias = fit_bcts(held_out_logits, held_out_labels, offset=np.log(SOURCE_PRIOR))
    calibrated = estimate_prior(target_logits, temperature=temperature, bias=bias)
    # Tolerance: the EM sampling error alone (std_error, 5000 samples) is about 0.011 per class; noise in
    # (T, b) from 20000 held-out samples adds to it (over 30 seeds the largest class error averaged 0.015,
    # worst 0.038). 0.05 is about 4.5 EM standard errors; plain EM misses by 0.12 on average (min 0.11).
    assert np.abs(plain.estimate.numpy() - TARGET_PRIOR).max() > 0.1
    assert np.abs(calibrated.prior.numpy() - TARGET_PRIOR).max() < 0.05
    assert calibrated.std_error.max().item() == pytest.approx(0.011, abs=0.002)
    assert not calibrated.guard_fired and calibrated.p_value < 1e-10 and calibrated.converged


def test_em_estimate_and_standard_error_match_the_multinomial_closed_form():
    # One-hot posteriors: the maximum-likelihood prior is the label frequencies n / N and the observed
    # information gives Cov = (diag(pi) - pi pi^T) / N, the multinomial covariance.
    counts = [500, 300, 200]
    result = estimate_prior(_one_hot_logits(counts), guard="none")
    frequencies = np.array(counts) / 1000
    assert result.estimate.numpy() == pytest.approx(frequencies, abs=1e-9)
    multinomial_se = np.sqrt(frequencies * (1 - frequencies) / 1000)
    assert result.std_error.numpy() == pytest.approx(multinomial_se, rel=1e-6)


def test_likelihood_ratio_statistic_is_the_g_test_on_one_hot_posteriors():
    # l(pi) = sum_c n_c log pi_c, so Lambda = 2 sum_c n_c log(n_c / (N / C)); with C = 3 (2 degrees of
    # freedom) the chi-square survival function is exp(-Lambda / 2).
    counts = [380, 330, 290]
    expected = 2 * sum(n * math.log(n / (1000 / 3)) for n in counts)
    result = estimate_prior(_one_hot_logits(counts))
    assert result.statistic == pytest.approx(expected, rel=1e-6)
    assert result.p_value == pytest.approx(math.exp(-expected / 2), rel=1e-6)
    # Lambda = 12.2, p = 0.0022: a real shift, so the guard keeps the estimate.
    assert not result.guard_fired
    assert torch.equal(result.prior, result.estimate)


def test_dirichlet_map_matches_the_pseudo_count_closed_form():
    counts, kappa = [500, 300, 200], 300.0
    result = estimate_prior(_one_hot_logits(counts), concentration=kappa, guard="none")
    expected = (np.array(counts) + kappa / 3) / (1000 + kappa)
    assert result.estimate.numpy() == pytest.approx(expected, abs=1e-9)
    # The test is still against the maximum-likelihood estimate: the G-test of the counts.
    g_statistic = 2 * sum(n * math.log(n / (1000 / 3)) for n in counts)
    assert result.statistic == pytest.approx(g_statistic, rel=1e-6)


def test_guard_keeps_the_uniform_prior_on_unshifted_calibrated_data():
    # Under H0 the p-value of the likelihood-ratio test is uniform on [0, 1] (Wilks' theorem): the guard
    # fires with probability 1 - alpha. 100 data sets: rejections ~ Binomial(100, 0.05), mean 5, sd 2.2;
    # at most 12 rejections holds with probability 0.998. Kolmogorov-Smirnov, level 0.01: D < 1.63/sqrt(100).
    p_values, fired = [], []
    for seed in range(100):
        logits, _ = _gaussian_logits([0.25] * 4, 1000, np.random.default_rng(seed))
        result = estimate_prior(logits)
        p_values.append(result.p_value)
        fired.append(result.guard_fired)
        if result.guard_fired:
            assert result.prior.tolist() == [0.25] * 4
    assert sum(not f for f in fired) <= 12
    ordered = np.sort(p_values)
    ranks = np.arange(1, 101)
    ks_distance = max(np.abs(ranks / 100 - ordered).max(), np.abs((ranks - 1) / 100 - ordered).max())
    assert ks_distance < 1.63 / math.sqrt(100)


def test_guard_does_not_fire_on_a_strong_shift_and_alpha_controls_it():
    logits, _ = _gaussian_logits(TARGET_PRIOR, 2000, np.random.default_rng(1))
    result = estimate_prior(logits)
    assert not result.guard_fired and result.p_value < 1e-20
    assert np.abs(result.prior.numpy() - TARGET_PRIOR).max() < 5 * result.std_error.max().item()
    # A weak shift on few samples (p = 0.74 here): the guard fires for alpha < p only.
    weak, _ = _gaussian_logits([0.22, 0.24, 0.26, 0.28], 400, np.random.default_rng(2))
    p_value = estimate_prior(weak).p_value
    strict = estimate_prior(weak, alpha=p_value / 2)
    loose = estimate_prior(weak, alpha=(1 + p_value) / 2)
    assert strict.guard_fired and not loose.guard_fired
    assert estimate_prior(weak, guard="none", alpha=p_value / 2).prior.tolist() == strict.estimate.tolist()


def test_guard_falls_back_to_a_given_null_prior():
    logits, _ = _gaussian_logits(SOURCE_PRIOR, 1000, np.random.default_rng(3))
    # The data follow SOURCE_PRIOR: tested against it as the null, p = 0.44 for this draw.
    result = estimate_prior(logits, null_prior=SOURCE_PRIOR.tolist())
    assert result.p_value > 0.05 and result.guard_fired
    assert result.prior.numpy() == pytest.approx(SOURCE_PRIOR)
    assert estimate_prior(logits).p_value < 1e-20  # against uniform it is a clear shift


def test_source_prior_logits_give_the_same_estimate():
    # Posteriors under pi_s (logits + log pi_s) with source_prior=pi_s describe the same model.
    logits, _ = _gaussian_logits(TARGET_PRIOR, 1000, np.random.default_rng(4))
    uniform = estimate_prior(logits, guard="none")
    source_logits = logits + torch.from_numpy(np.log(SOURCE_PRIOR))
    source = estimate_prior(source_logits, source_prior=SOURCE_PRIOR, guard="none")
    assert source.estimate.numpy() == pytest.approx(uniform.estimate.numpy(), abs=1e-6)
    assert source.statistic == pytest.approx(uniform.statistic, rel=1e-6)


def test_accelerated_em_reaches_the_plain_em_fixed_point_in_few_updates():
    # Heavily overlapping classes: plain EM crawls (200 updates leave it 0.08 away, 1000 leave 0.007).
    logits, _ = _gaussian_logits(TARGET_PRIOR, 2000, np.random.default_rng(5), spacing=0.7)
    accelerated = estimate_prior(logits, guard="none", max_iter=200)
    plain = estimate_target_prior(torch.softmax(logits, dim=1), tol=1e-12, max_iter=100000)
    assert accelerated.converged
    assert accelerated.estimate.numpy() == pytest.approx(plain.numpy(), abs=1e-5)


def test_likelihood_ratio_test_on_posteriors():
    probs = torch.softmax(_one_hot_logits([380, 330, 290]), dim=1)
    statistic, p_value = likelihood_ratio_test(probs, [0.38, 0.33, 0.29])
    expected = 2 * sum(n * math.log(n / (1000 / 3)) for n in [380, 330, 290])
    assert statistic == pytest.approx(expected, rel=1e-6)
    assert p_value == pytest.approx(math.exp(-expected / 2), rel=1e-6)


# --- BBSE (Lipton et al., 2018) ---------------------------------------------------------------------


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


def test_bbse_through_estimate_prior():
    # A perfect classifier: identity confusion, so the estimate is the frequency of the predictions.
    counts = [500, 300, 200]
    result = estimate_prior(_one_hot_logits(counts), method="bbse", confusion=torch.eye(3) * 50, guard="none")
    assert result.estimate.tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert result.std_error is None and result.method == "bbse"


@pytest.mark.parametrize(
    ("vector", "expected"),
    [([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), ([0.5, 0.5, 0.5], [1 / 3] * 3), ([2.0, 0.0], [1.0, 0.0]),
     ([0.6, 0.6, -1.0], [0.5, 0.5, 0.0])],
)
def test_project_to_simplex_hand_examples(vector, expected):
    assert project_to_simplex(vector).tolist() == pytest.approx(expected)


# --- bad input --------------------------------------------------------------------------------------


def test_prior_estimate_to_dict_is_plain():
    data = estimate_prior(_one_hot_logits([5, 5])).to_dict()
    assert data["prior"] == [0.5, 0.5] and data["guard_fired"] is True
    assert isinstance(data["std_error"], list) and isinstance(data["p_value"], float)


# --------------------------------------------------------------------------- EM (Saerens et al., 2002)

MEANS = np.array([-2.0, 0.0, 2.0])


def _gaussian_posteriors(true_prior, source_prior, n=30000, seed=0):
    """Labels drawn from ``true_prior``; exact posteriors of x ~ N(mean_y, 1) under ``source_prior``."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(true_prior), size=n, p=true_prior)
    x = rng.normal(MEANS[labels], 1.0)
    log_joint = -0.5 * (x[:, None] - MEANS[None, :]) ** 2 + np.log(source_prior)[None, :]
    return torch.softmax(torch.from_numpy(log_joint), dim=1)


@pytest.mark.parametrize("source_prior", [None, [0.2, 0.3, 0.5]])
def test_em_recovers_a_known_prior_from_calibrated_posteriors(source_prior):
    true_prior = np.array([0.6, 0.3, 0.1])
    probs = _gaussian_posteriors(true_prior, source_prior or [1 / 3] * 3)
    estimate = estimate_target_prior(probs, source_prior=source_prior)
    assert estimate.sum() == pytest.approx(1.0)
    assert estimate.numpy() == pytest.approx(true_prior, abs=0.015)
    # The plain mean of the posteriors is pulled towards the source prior; EM removes that bias.
    naive = probs.mean(0).numpy()
    assert np.abs(estimate.numpy() - true_prior).max() < np.abs(naive - true_prior).max() / 3


def test_em_leaves_a_uniform_prior_uniform():
    # Every cyclic shift of one posterior: the set is symmetric in the classes, so uniform is the fixed point.
    row = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    probs = torch.stack([row.roll(k) for k in range(3)] * 5)
    assert estimate_target_prior(probs).numpy() == pytest.approx([1 / 3] * 3, abs=1e-12)


def test_em_first_step_from_uniform_is_the_mean_posterior():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    assert estimate_target_prior(probs, max_iter=1).numpy() == pytest.approx([0.6, 0.4])


@pytest.mark.parametrize(
    ("logits", "kwargs", "error", "message"),
    [
        (torch.zeros(4), {}, ValueError, "shape \\(num_samples, num_classes\\)"),
        (torch.tensor([[0.0, float("inf")]]), {}, ValueError, "NaN or infinite"),
        (torch.zeros(2, 2), {"method": "mle"}, ValueError, "method must be one of"),
        (torch.zeros(2, 2), {"guard": "bootstrap"}, ValueError, "guard must be one of"),
        (torch.zeros(2, 2), {"alpha": 1.0}, ValueError, "alpha"),
        (torch.zeros(2, 2), {"concentration": -1.0}, ValueError, "concentration"),
        (torch.zeros(2, 2), {"method": "bbse"}, ValueError, "needs confusion"),
        (torch.zeros(2, 2), {"confusion": torch.eye(2)}, ValueError, "method='bbse' or 'rlls' only"),
        (torch.zeros(2, 2), {"method": "bbse", "confusion": torch.eye(3)}, ValueError, "confusion must have"),
        (torch.zeros(2, 2), {"null_prior": [1.0, 0.0]}, ValueError, "null_prior is zero for classes \\[1\\]"),
        (torch.zeros(2, 2), {"source_prior": [0.5, 0.6]}, ValueError, "must sum to 1"),
        (torch.zeros(2, 2), {"temperature": 0.0}, ValueError, "temperature"),
        (torch.zeros(2, 2), {"bias": [0.0]}, ValueError, "bias must have shape"),
        (torch.zeros(2, 2), {"max_iter": 0}, ValueError, "max_iter"),
    ],
)
def test_estimate_prior_bad_input(logits, kwargs, error, message):
    with pytest.raises(error, match=message):
        estimate_prior(logits, **kwargs)


@pytest.mark.parametrize(
    ("probs", "source_prior", "message"),
    [
        (torch.tensor([[0.5, 0.3]]), None, "sum to 1"),
        (torch.tensor([[2.0, -1.0]]), None, "softmax"),  # logits, not probabilities
        (torch.tensor([[1.2, -0.2]]), None, "non-negative"),
        (torch.tensor([0.5, 0.5]), None, "shape"),
        (torch.tensor([[float("nan"), 1.0]]), None, "finite"),
        (torch.tensor([[0.5, 0.5]]), [1.0, 0.0], "source_prior"),
        (torch.tensor([[0.5, 0.5]]), [0.2, 0.3, 0.5], "entries"),
    ],
)
def test_estimate_target_prior_rejects_bad_probabilities(probs, source_prior, message):
    with pytest.raises(ValueError, match=message):
        estimate_target_prior(probs, source_prior=source_prior)


def test_bbse_and_confusion_bad_input():
    with pytest.raises(ValueError, match=r"classes \[1\] have no held-out sample"):
        bbse_prior(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), [1, 1])
    with pytest.raises(ValueError, match="square"):
        bbse_prior(torch.ones(2, 3), [1, 1])
    with pytest.raises(ValueError, match="positive total"):
        bbse_prior(torch.eye(2), [0, 0])
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), one per sample, got \(1,\)"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="must lie in"):
        confusion_matrix([0, 3], [0, 1], 2)
    with pytest.raises(TypeError, match="integer class indices"):
        confusion_matrix([0.0, 1.0], [0, 1], 2)
