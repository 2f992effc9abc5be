"""Logit-adjusted cross-entropy and the BalPoE multi-expert loss.

Expert ``e`` with bias ``lambda_e`` is trained on ``CE(z_e + (1 - lambda_e) * log pi, y)``:
``lambda = 1`` is plain cross-entropy, ``lambda = 0`` balanced softmax / logit adjustment, ``lambda = -1``
a tail expert. Targets are class indices ``(B,)`` or soft targets ``(B, C)`` (mixup).

This module is also shipped as remote code next to a saved model: it imports torch and ``.priors`` only.
"""

from __future__ import annotations

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

    The log prior and the per-expert ``tau = 1 - lambda`` are persistent buffers, so they travel with
    the module's state dict.
    """

    def __init__(self, class_counts: PriorLike, lambdas: Sequence[float] | torch.Tensor) -> None:
        super().__init__()
        log_prior = log_class_prior(class_counts)
        num_experts = len(lambdas)
        taus = 1.0 - expert_lambdas(lambdas, num_experts, log_prior.numel())
        self.register_buffer("log_prior", log_prior)  # (C,)
        self.register_buffer("taus", taus)  # (E, C)

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
