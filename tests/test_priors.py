import math

import pytest
import torch

from balpoe_hf.models.balpoe.priors import (
    adjust_logits,
    class_prior,
    expert_lambdas,
    log_class_prior,
    validate_class_counts,
    validate_prior,
)


def test_class_prior_is_counts_over_total():
    prior = class_prior([6, 3, 1])
    assert prior.tolist() == pytest.approx([0.6, 0.3, 0.1])
    assert log_class_prior([6, 3, 1]).tolist() == pytest.approx([math.log(0.6), math.log(0.3), math.log(0.1)])


def test_adjustment_on_hand_example():
    # zbar = [1, 2], pi_train = [0.8, 0.2], mean lambda = 0.5, target = [0.25, 0.75]:
    # logits = zbar - 0.5 * log pi + log(2 * pi_t)
    zbar = torch.tensor([[1.0, 2.0]])
    out = adjust_logits(zbar, torch.log(torch.tensor([0.8, 0.2])), 0.5, torch.tensor([0.25, 0.75]))
    expected = [1 - 0.5 * math.log(0.8) + math.log(0.5), 2 - 0.5 * math.log(0.2) + math.log(1.5)]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_balanced_ensemble_with_uniform_target_is_unchanged():
    zbar = torch.randn(4, 5)
    out = adjust_logits(zbar, torch.log(torch.full((5,), 0.2)) - 1.0, 0.0, None)
    assert torch.equal(out, zbar)


def test_target_prior_shifts_posterior_by_log_ratio():
    # softmax(zbar + log pi_t) / softmax(zbar) is proportional to pi_t, row by row.
    zbar = torch.randn(3, 4)
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    base = torch.softmax(adjust_logits(zbar, torch.zeros(4), 0.0), -1)
    shifted = torch.softmax(adjust_logits(zbar, torch.zeros(4), 0.0, target), -1)
    ratio = (shifted / base) / target
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)


def test_per_class_mean_lambda():
    zbar = torch.zeros(1, 3)
    log_pi = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    out = adjust_logits(zbar, log_pi, torch.tensor([1.0, 0.0, -1.0]))
    assert out[0].tolist() == pytest.approx([-math.log(0.5), 0.0, math.log(0.2)])


def test_expert_lambdas_scalar_and_vector():
    assert expert_lambdas([1.0, 0.0, -1.0], 3, 2).tolist() == [[1, 1], [0, 0], [-1, -1]]
    assert expert_lambdas([[1.0, 0.5], [0.0, -0.5]], 2, 2).tolist() == [[1, 0.5], [0, -0.5]]


@pytest.mark.parametrize(
    ("lambdas", "experts", "message"),
    [([1.0, 0.0], 3, "2 entries but there are 3 experts"), ([[1.0, 0.0, 2.0]], 1, "shape")],
)
def test_expert_lambdas_errors(lambdas, experts, message):
    with pytest.raises(ValueError, match=message):
        expert_lambdas(lambdas, experts, 2)


def test_zero_count_names_the_classes():
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have zero training samples"):
        class_prior([5, 0, 2, 0])


def test_count_errors():
    with pytest.raises(ValueError, match="negative"):
        validate_class_counts([3, -1])
    with pytest.raises(ValueError, match="3 entries but the model has 2 classes"):
        validate_class_counts([3, 2, 1], num_classes=2)


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ([0.5, 0.5], "2 entries but the model has 3 classes"),
        ([0.5, 0.6, -0.1], "negative"),
        ([0.2, 0.2, 0.2], "must sum to 1 but sums to 0.6"),
    ],
)
def test_target_prior_errors(prior, message):
    with pytest.raises(ValueError, match=message):
        validate_prior(prior, 3)


def test_target_prior_accepts_zero_entries():
    assert validate_prior([0.0, 0.25, 0.75], 3).tolist() == [0.0, 0.25, 0.75]
