"""Logit-adjusted cross-entropy, the BalPoE multi-expert loss and the LADE loss.

Expert ``e`` with bias ``lambda_e`` is trained on ``CE(z_e + (1 - lambda_e) * log pi, y)``:
``lambda = 1`` is plain cross-entropy, ``lambda = 0`` balanced softmax / logit adjustment, ``lambda = -1``
a tail expert. LADE (Hong et al., CVPR 2021) adds a regulariser to the balanced softmax of one classifier.
Targets are class indices ``(B,)`` or soft targets ``(B, C)`` (mixup).

This module is also shipped as remote code next to a saved model: it imports torch and ``.priors`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .priors import PriorLike, expert_lambdas, log_class_prior


def _check_targets(targets: torch.Tensor, batch_size: int, num_classes: int) -> None:
    if targets.is_floating_point():
        if targets.shape != (batch_size, num_classes):
            raise ValueError(
                f"soft targets must have shape (batch, num_classes) = ({batch_size}, {num_classes}), "
                f"got {tuple(targets.shape)}."
            )
        # One host read per batch, like the range check of class indices below.
        tolerance = 1e-3 if targets.dtype in (torch.float32, torch.float64) else 2e-2
        off_one = (targets.float().sum(-1) - 1).abs() > tolerance
        bad = (targets < 0).any(-1) | off_one | ~targets.isfinite().all(-1)
        if targets.numel() and bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            values = ", ".join(f"{value:.4g}" for value in targets[row, :10].tolist())
            raise ValueError(
                f"soft targets must be probabilities (rows >= 0 summing to 1); row {row} is "
                f"[{values}{', ...' if num_classes > 10 else ''}] (sum {float(targets[row].sum()):.4g})."
            )
        return
    if targets.shape != (batch_size,):
        raise ValueError(f"class-index targets must have shape ({batch_size},), got {tuple(targets.shape)}.")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}], got values from {int(targets.min())} to "
            f"{int(targets.max())}; check that the label column matches the model's classes."
        )


def _cross_entropy(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy from log-probabilities ``(B, ..., C)`` and hard or soft targets."""
    if targets.is_floating_point():
        # Soft targets broadcast over any expert dimension between batch and classes.
        soft = targets.reshape(targets.shape[0], *([1] * (log_probs.ndim - 2)), targets.shape[-1])
        return -(soft.to(log_probs) * log_probs).sum(-1)
    index = targets.reshape(targets.shape[0], *([1] * (log_probs.ndim - 1)))
    index = index.expand(*log_probs.shape[:-1], 1)
    return -log_probs.gather(-1, index).squeeze(-1)


def logit_adjusted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor,
                                 tau: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits + tau * log_prior``.

    Args:
        logits: raw scores ``(B, C)``.
        targets: class indices ``(B,)`` (integer) or soft targets ``(B, C)`` (float, rows summing to 1).
        log_prior: training log prior ``(C,)``.
        tau: ``1 - lambda``; a scalar or a per-class tensor ``(C,)``. ``tau = 0`` is plain cross-entropy.
    """
    _check_targets(targets, logits.shape[0], logits.shape[-1])
    adjusted = logits + tau * log_prior.to(logits)
    return _cross_entropy(F.log_softmax(adjusted, dim=-1), targets).mean()


class BalPoELoss(nn.Module):
    """Mean over experts of each expert's logit-adjusted cross-entropy.

    Args:
        class_counts: training samples per class ``(C,)``; every class needs at least one.
        lambdas: one bias per expert ``(E,)``, or per-class biases ``(E, C)``.

    The log prior and the per-expert ``tau = 1 - lambda`` are non-persistent buffers: they follow the
    module's device moves but stay out of its state dict, since the model rebuilds them from its config.
    """

    def __init__(self, class_counts: PriorLike, lambdas: Sequence[float] | torch.Tensor) -> None:
        super().__init__()
        log_prior = log_class_prior(class_counts)
        if not isinstance(lambdas, Sequence | torch.Tensor) or isinstance(lambdas, str) or len(lambdas) == 0:
            # An empty ensemble's loss is the mean of no expert losses: NaN at the first call.
            raise ValueError(f"lambdas must hold one bias per expert (at least one expert), got {lambdas!r}.")
        num_experts = len(lambdas)
        taus = 1.0 - expert_lambdas(lambdas, num_experts, log_prior.numel())
        self.register_buffer("log_prior", log_prior, persistent=False)  # (C,)
        self.register_buffer("taus", taus, persistent=False)  # (E, C)

    @property
    def num_experts(self) -> int:
        return self.taus.shape[0]

    def expert_losses(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-expert mean losses ``(E,)`` for expert logits ``(B, E, C)``."""
        batch, experts, classes = expert_logits.shape
        if (experts, classes) != tuple(self.taus.shape):
            raise ValueError(
                f"expert logits have {experts} experts x {classes} classes, but the loss was built for "
                f"{self.taus.shape[0]} experts x {self.taus.shape[1]} classes."
            )
        _check_targets(targets, batch, classes)
        adjusted = expert_logits + (self.taus * self.log_prior).to(expert_logits)  # (B, E, C)
        return _cross_entropy(F.log_softmax(adjusted, dim=-1), targets).mean(0)

    def forward(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.expert_losses(expert_logits, targets).mean()


def lade_regularizer(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor,
                     remine_lambda: float = 0.1) -> torch.Tensor:
    """The LADE regulariser of Hong et al. (CVPR 2021): minus the prior-weighted ReMINE bounds, per class.

    For every class ``c`` the Donsker-Varadhan representation bounds the divergence between the images of
    class ``c`` and the batch, with the critic ``T_c(x) = z_c(x)`` read from the logits:

    ``first_c  = mean over the class-c samples of z_c``
    ``second_c = log(mean over all N samples of exp(z_c - log pi_c - log C))``
    ``bound_c  = first_c - second_c - remine_lambda * second_c ** 2``

    (the last term is the ReMINE penalty that keeps ``second_c`` near 0, i.e. makes ``z_c - log pi_c`` a
    log-likelihood ratio under the balanced prior). The regulariser is ``-sum_c pi_c * bound_c``. As in the
    reference implementation (hyperconnect/LADE), a class without samples in the batch keeps its
    ``second_c`` terms with ``first_c = 0``.

    Soft targets ``(B, C)`` (mixup) are read as sample weights: ``first_c`` becomes the mean of ``z_c``
    weighted by each sample's target mass on ``c`` (``sum_i y_ic z_ic / sum_i y_ic``), the estimate of
    ``E[z_c | y = c]`` under the mixed labels, so the regulariser stays defined for mixup batches and
    one-hot soft targets give exactly the hard-label value. ``second_c`` does not depend on the labels.

    Args:
        logits: raw scores ``(B, C)``.
        targets: class indices ``(B,)`` or soft targets ``(B, C)``.
        log_prior: training log prior ``log pi`` ``(C,)``; ``pi`` also weights the classes.
        remine_lambda: weight of the ReMINE penalty (0.1 in every LADE config).
    """
    batch, num_classes = logits.shape
    _check_targets(targets, batch, num_classes)
    # Logsumexp over the batch and the squared penalty are computed in float32 under mixed precision too.
    logits = logits.float()
    log_prior = log_prior.to(logits)
    if targets.is_floating_point():
        weights = targets.to(logits)
    else:
        weights = F.one_hot(targets, num_classes).to(logits)  # (B, C)
    mass = weights.sum(0)  # (C,) samples (or target mass) per class
    # An absent class has mass 0 and a zero numerator: the clamp makes its first term 0 without a 0 / 0.
    first = (weights * logits).sum(0) / mass.clamp_min(torch.finfo(logits.dtype).tiny)
    second = (torch.logsumexp(logits, dim=0) - log_prior - math.log(num_classes) - math.log(batch))
    bound = first - second - remine_lambda * second.square()
    return -(log_prior.exp() * bound).sum()


class LADELoss(nn.Module):
    """The LADE loss of one classifier: balanced softmax ``CE(z + log pi, y)`` plus a weighted regulariser.

    ``loss = CE(z + log pi, y) + weight * lade_regularizer(z, y, log pi, remine_lambda)``; the reference
    configs use ``weight = 0.1`` and ``remine_lambda = 0.1``. At test time LADE adds ``log pi_target`` to the
    raw logits (``BalPoEForImageClassification`` does this with lambda 0).

    Args:
        class_counts: training samples per class ``(C,)``; every class needs at least one.
        weight: weight of the regulariser; 0 gives the balanced softmax alone.
        remine_lambda: weight of the ReMINE penalty inside the regulariser.

    The log prior is a non-persistent buffer, as in :class:`BalPoELoss`.
    """

    num_experts = 1

    def __init__(self, class_counts: PriorLike, weight: float = 0.1, remine_lambda: float = 0.1) -> None:
        super().__init__()
        self.weight = float(weight)
        self.remine_lambda = float(remine_lambda)
        self.register_buffer("log_prior", log_class_prior(class_counts), persistent=False)  # (C,)

    def expert_losses(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss as a one-element tensor ``(1,)`` for the single expert's logits ``(B, 1, C)``."""
        if expert_logits.ndim != 3 or expert_logits.shape[1:] != (1, self.log_prior.numel()):
            raise ValueError(
                f"LADE trains one classifier: expected expert logits of shape (batch, 1, "
                f"{self.log_prior.numel()}), got {tuple(expert_logits.shape)}; build the model with "
                "num_experts=1."
            )
        return self(expert_logits[:, 0], targets)[None]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of logits ``(B, C)`` against class indices ``(B,)`` or soft targets ``(B, C)``."""
        loss = logit_adjusted_cross_entropy(logits, targets, self.log_prior, tau=1.0)
        if self.weight:
            loss = loss + self.weight * lade_regularizer(logits, targets, self.log_prior, self.remine_lambda)
        return loss

    def extra_repr(self) -> str:
        return f"weight={self.weight}, remine_lambda={self.remine_lambda}"
