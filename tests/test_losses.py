import math

import pytest
import torch
import torch.nn.functional as F

from balpoe_hf.losses import BalPoELoss, logit_adjusted_cross_entropy


def test_hand_computed_two_by_three():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    targets = torch.tensor([0, 2])
    prior = [0.5, 0.25, 0.25]
    # tau = 1: adjusted = logits + log prior.
    a = [1 + math.log(0.5), math.log(0.25), math.log(0.25)]
    b = [math.log(0.5), 2 + math.log(0.25), 1 + math.log(0.25)]

    def ce(row, y):
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    expected = (ce(a, 0) + ce(b, 2)) / 2
    got = logit_adjusted_cross_entropy(logits, targets, torch.log(torch.tensor(prior)), tau=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tau_zero_is_plain_cross_entropy():
    logits, targets = torch.randn(8, 5), torch.randint(0, 5, (8,))
    log_prior = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    got = logit_adjusted_cross_entropy(logits, targets, log_prior, tau=0.0)
    assert torch.allclose(got, F.cross_entropy(logits, targets))


def test_one_hot_soft_targets_equal_hard_targets():
    logits, targets = torch.randn(6, 4), torch.randint(0, 4, (6,))
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    hard = logit_adjusted_cross_entropy(logits, targets, log_prior, tau=2.0)
    soft = logit_adjusted_cross_entropy(logits, F.one_hot(targets, 4).float(), log_prior, tau=2.0)
    assert torch.allclose(hard, soft)


def test_mixed_soft_targets_are_the_convex_mix_of_losses():
    logits = torch.randn(5, 3)
    y1, y2, lam = torch.randint(0, 3, (5,)), torch.randint(0, 3, (5,)), 0.3
    soft = lam * F.one_hot(y1, 3).float() + (1 - lam) * F.one_hot(y2, 3).float()
    log_prior = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    mixed = logit_adjusted_cross_entropy(logits, soft, log_prior, tau=1.0)
    expected = (lam * logit_adjusted_cross_entropy(logits, y1, log_prior)
                + (1 - lam) * logit_adjusted_cross_entropy(logits, y2, log_prior))
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_balpoe_loss_is_mean_of_expert_losses_with_tau_one_minus_lambda():
    counts, lambdas = [50, 30, 20], [1.0, 0.0, -1.0]
    loss_fn = BalPoELoss(counts, lambdas)
    logits, targets = torch.randn(7, 3, 3), torch.randint(0, 3, (7,))
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    per_expert = torch.stack([F.cross_entropy(logits[:, e] + (1 - lam) * log_prior, targets)
                              for e, lam in enumerate(lambdas)])
    assert torch.allclose(loss_fn.expert_losses(logits, targets), per_expert, atol=1e-6)
    assert torch.allclose(loss_fn(logits, targets), per_expert.mean(), atol=1e-6)
    # The head expert (lambda = 1) is plain cross-entropy.
    assert torch.allclose(per_expert[0], F.cross_entropy(logits[:, 0], targets))


def test_balpoe_loss_buffers_are_persistent():
    state = BalPoELoss([2, 1], [0.5, -0.5]).state_dict()
    assert set(state) == {"log_prior", "taus"}
    assert state["taus"].tolist() == [[0.5, 0.5], [1.5, 1.5]]


def test_label_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got values from 0 to 3"):
        BalPoELoss([1, 1, 1], [0.0])(torch.randn(2, 1, 3), torch.tensor([0, 3]))


def test_wrong_expert_count_is_named():
    with pytest.raises(ValueError, match="2 experts x 3 classes"):
        BalPoELoss([1, 1, 1], [1.0, 0.0, -1.0])(torch.randn(2, 2, 3), torch.tensor([0, 1]))


def test_soft_target_shape_checked():
    with pytest.raises(ValueError, match="soft targets must have shape"):
        logit_adjusted_cross_entropy(torch.randn(2, 3), torch.rand(2, 4), torch.zeros(3))
