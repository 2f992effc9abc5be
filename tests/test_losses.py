import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from balpoe_hf.models.balpoe.losses import (
    BalPoELoss,
    LADELoss,
    lade_regularizer,
    logit_adjusted_cross_entropy,
)


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


def test_balpoe_loss_buffers_are_derived_not_saved():
    loss_fn = BalPoELoss([2, 1], [0.5, -0.5])
    # The prior and taus come from the model config: buffers (device moves) that stay out of the state dict.
    assert loss_fn.state_dict() == {}
    assert loss_fn.taus.tolist() == [[0.5, 0.5], [1.5, 1.5]]
    assert loss_fn.log_prior.tolist() == pytest.approx([math.log(2 / 3), math.log(1 / 3)])


def test_label_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got values from 0 to 3"):
        BalPoELoss([1, 1, 1], [0.0])(torch.randn(2, 1, 3), torch.tensor([0, 3]))


def test_wrong_expert_count_is_named():
    with pytest.raises(ValueError, match="2 experts x 3 classes"):
        BalPoELoss([1, 1, 1], [1.0, 0.0, -1.0])(torch.randn(2, 2, 3), torch.tensor([0, 1]))


def test_soft_target_shape_checked():
    with pytest.raises(ValueError, match="soft targets must have shape"):
        logit_adjusted_cross_entropy(torch.randn(2, 3), torch.rand(2, 4), torch.zeros(3))


# ----------------------------------------------------------------------------------------- LADE

LADE_LOGITS = [[2.0, 0.5, -1.0], [1.0, 1.5, 0.0], [0.0, -0.5, 1.0], [1.5, 0.0, 0.5]]
LADE_COUNTS = [6, 3, 1]


def numpy_lade_regularizer(logits, soft_targets, counts, remine_lambda):
    """The regulariser written out class by class: -sum_c pi_c (first_c - second_c - lambda second_c^2)."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(soft_targets, dtype=np.float64)
    pi = np.asarray(counts, dtype=np.float64) / sum(counts)
    n, num_classes = z.shape
    total = 0.0
    for c in range(num_classes):
        mass = y[:, c].sum()
        first = (y[:, c] * z[:, c]).sum() / mass if mass > 0 else 0.0  # absent class: 0, as the reference
        # Critic shifted from the training prior to the uniform one, averaged over the whole batch.
        second = math.log(sum(math.exp(z[i, c] - math.log(pi[c]) + math.log(1 / num_classes))
                              for i in range(n)) / n)
        total -= pi[c] * (first - second - remine_lambda * second ** 2)
    return total


@pytest.mark.parametrize(("targets", "reference"), [
    # Values of hyperconnect/LADE's loss/LADELoss.py on these inputs (run on the CPU, eps terms included).
    ([0, 1, 2, 0], -0.6727291941642761),
    ([0, 0, 1, 1], 0.10227079689502716),  # class 2 absent from the batch
])
def test_lade_regularizer_hand_computed_four_by_three(targets, reference):
    one_hot = np.eye(3)[targets]
    expected = numpy_lade_regularizer(LADE_LOGITS, one_hot, LADE_COUNTS, remine_lambda=0.1)
    log_prior = torch.log(torch.tensor(LADE_COUNTS, dtype=torch.float64) / 10).float()
    got = lade_regularizer(torch.tensor(LADE_LOGITS), torch.tensor(targets), log_prior, remine_lambda=0.1)
    # float32 against float64 (numpy) and the reference's own float32 run: absolute tolerances.
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert got.item() == pytest.approx(reference, abs=1e-6)


def test_lade_loss_is_balanced_softmax_plus_weighted_regularizer():
    targets = [0, 1, 2, 0]
    z = np.asarray(LADE_LOGITS)
    log_pi = np.log(np.asarray(LADE_COUNTS) / 10)
    # Balanced softmax by hand: CE(z + log pi, y).
    adjusted = z + log_pi
    log_softmax = adjusted - np.log(np.exp(adjusted).sum(1, keepdims=True))
    balanced_softmax = -np.mean([log_softmax[i, y] for i, y in enumerate(targets)])
    regularizer = numpy_lade_regularizer(LADE_LOGITS, np.eye(3)[targets], LADE_COUNTS, remine_lambda=0.2)
    loss_fn = LADELoss(LADE_COUNTS, weight=0.5, remine_lambda=0.2)
    got = loss_fn(torch.tensor(LADE_LOGITS), torch.tensor(targets))
    assert got.item() == pytest.approx(balanced_softmax + 0.5 * regularizer, rel=1e-6)
    assert loss_fn.state_dict() == {}


def test_lade_with_zero_weight_is_balanced_softmax():
    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(9, 5, generator=generator), torch.randint(0, 5, (9,), generator=generator)
    counts = [40, 20, 10, 5, 1]
    log_prior = torch.log(torch.tensor(counts) / sum(counts))
    got = LADELoss(counts, weight=0.0)(logits, targets)
    assert torch.allclose(got, F.cross_entropy(logits + log_prior, targets), atol=1e-6)
    # The same sum in another order: equal up to float rounding.
    torch.testing.assert_close(got, logit_adjusted_cross_entropy(logits, targets, log_prior.float(), tau=1.0),
                               rtol=0, atol=1e-6)


def test_lade_soft_targets_weight_the_first_term():
    logits = torch.tensor(LADE_LOGITS)
    targets = torch.tensor([0, 1, 2, 0])
    log_prior = torch.log(torch.tensor(LADE_COUNTS) / 10)
    one_hot = F.one_hot(targets, 3).float()
    hard = lade_regularizer(logits, targets, log_prior)
    assert torch.allclose(lade_regularizer(logits, one_hot, log_prior), hard, atol=1e-6)
    # A mixup batch: each row mixes its own label with the reversed batch's label.
    soft = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    expected = numpy_lade_regularizer(LADE_LOGITS, soft.numpy(), LADE_COUNTS, remine_lambda=0.1)
    assert lade_regularizer(logits, soft, log_prior).item() == pytest.approx(expected, rel=1e-6)
    loss = LADELoss(LADE_COUNTS)(logits, soft)
    assert torch.isfinite(loss)


def test_lade_regularizer_has_finite_gradients_with_absent_classes():
    logits = torch.tensor(LADE_LOGITS, requires_grad=True)
    lade_regularizer(logits, torch.tensor([0, 0, 0, 0]), torch.log(torch.tensor(LADE_COUNTS) / 10)).backward()
    assert torch.isfinite(logits.grad).all()


def test_lade_loss_needs_one_expert():
    loss_fn = LADELoss(LADE_COUNTS)
    assert loss_fn.expert_losses(torch.tensor(LADE_LOGITS)[:, None], torch.tensor([0, 1, 2, 0])).shape == (1,)
    with pytest.raises(ValueError, match="LADE trains one classifier"):
        loss_fn.expert_losses(torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("row,message", [
    ([0.7, 0.5, -0.2], "rows >= 0 summing to 1); row 1 is [0.7, 0.5, -0.2]"),
    ([0.5, 0.4, 0.0], "row 1 is [0.5, 0.4, 0] (sum 0.9)"),
    ([float("nan"), 0.5, 0.5], "row 1 is [nan, 0.5, 0.5]"),
])
def test_soft_targets_that_are_not_probabilities_are_refused_by_the_loss(row, message):
    loss = BalPoELoss([30, 20, 10], [1.0, 0.0, -1.0])
    targets = torch.tensor([[1.0, 0.0, 0.0], row])
    with pytest.raises(ValueError) as error:
        loss(torch.zeros(2, 3, 3), targets)
    assert message in str(error.value)
    assert torch.isfinite(loss(torch.zeros(2, 3, 3), torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])))
