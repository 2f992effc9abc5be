"""Class priors and the BalPoE inference-time prior adjustment.

The training prior is ``pi(y) = n_y / N``. An ensemble of experts with biases ``lambda_e`` has mean
logits ``zbar`` that model ``log P(x|y) + mean(lambda) * log pi`` (Theorem 1 of the paper), so the
logits for a target prior ``pi_t`` are ``zbar - mean(lambda) * log pi + log pi_t``.

Estimating an unknown target prior from unlabelled data is ``balpoe_hf.models.balpoe.label_shift``'s concern.

This module is also shipped as remote code next to a saved model: it imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PriorLike = Sequence[float] | torch.Tensor
# A target prior must sum to one within this tolerance (float32 round-off over thousands of classes).
PRIOR_SUM_TOLERANCE = 1e-4


def as_vector(values: PriorLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(tensor.shape)}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values: {tensor.tolist()}.")
    return tensor


def validate_class_counts(class_counts: PriorLike, num_classes: int | None = None) -> torch.Tensor:
    """Check training class counts and return them as a float64 tensor ``(C,)``.

    Raises a ``ValueError`` naming the problem for a wrong length, negative counts or classes with no
    training sample (their log prior would be minus infinity).
    """
    counts = as_vector(class_counts, "class_counts")
    if num_classes is not None and counts.numel() != num_classes:
        raise ValueError(
            f"class_counts has {counts.numel()} entries but the model has {num_classes} classes; "
            "pass one training count per class, in label-index order."
        )
    negative = torch.nonzero(counts < 0).flatten().tolist()
    if negative:
        raise ValueError(f"class_counts must be non-negative; classes {negative} have negative counts.")
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty} have zero training samples, so their log prior is -inf. Drop these classes "
            "from the label set or add training samples for them."
        )
    return counts


def class_prior(class_counts: PriorLike) -> torch.Tensor:
    """Training prior ``pi(y) = n_y / N`` as a float32 tensor ``(C,)``."""
    counts = validate_class_counts(class_counts)
    return (counts / counts.sum()).float()


def log_class_prior(class_counts: PriorLike) -> torch.Tensor:
    """``log pi(y)`` as a float32 tensor ``(C,)``, computed in float64 before the cast."""
    counts = validate_class_counts(class_counts)
    return (counts.log() - counts.sum().log()).float()


def validate_prior(prior: PriorLike, num_classes: int, name: str = "target_prior") -> torch.Tensor:
    """Check that ``prior`` is a probability vector over ``num_classes`` classes; return it as float64.

    Zero entries are allowed (a class known to be absent from the target distribution).
    """
    tensor = as_vector(prior, name)
    if tensor.numel() != num_classes:
        raise ValueError(
            f"{name} has {tensor.numel()} entries but the model has {num_classes} classes; "
            "give one probability per class, in label-index order."
        )
    negative = torch.nonzero(tensor < 0).flatten().tolist()
    if negative:
        raise ValueError(f"{name} must be non-negative; classes {negative} have negative probabilities.")
    total = float(tensor.sum())
    if abs(total - 1.0) > PRIOR_SUM_TOLERANCE:
        raise ValueError(
            f"{name} must sum to 1 but sums to {total:.6g}; normalise it first (prior / prior.sum())."
        )
    return tensor


def expert_lambdas(lambdas: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor,
                   num_experts: int, num_classes: int) -> torch.Tensor:
    """Expand expert biases to a float32 tensor ``(E, C)``.

    ``lambdas`` holds one scalar per expert, or one per-class vector of length ``C`` per expert.
    """
    tensor = torch.as_tensor(lambdas, dtype=torch.float64)
    if tensor.ndim == 0 or tensor.shape[0] != num_experts:
        got = 1 if tensor.ndim == 0 else tensor.shape[0]
        raise ValueError(f"lambdas has {got} entries but there are {num_experts} experts; "
                         "give one per expert.")
    if tensor.ndim == 1:
        tensor = tensor[:, None].expand(num_experts, num_classes)
    elif tensor.ndim != 2 or tensor.shape[1] != num_classes:
        raise ValueError(
            f"per-class lambdas must have shape (num_experts, num_classes) = ({num_experts}, {num_classes}), "
            f"got {tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all():
        raise ValueError("lambdas contain NaN or infinite values.")
    return tensor.float().contiguous()


def adjust_logits(mean_logits: torch.Tensor, log_train_prior: torch.Tensor, mean_lambda: torch.Tensor | float,
                  target_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Adjust ensemble logits ``(B, C)`` from the ensemble's implied prior to a target prior.

    Returns ``zbar - mean_lambda * log pi_train + log(C * pi_target)``. The ``C *`` only shifts every
    logit of a row by the same constant ``log C`` (so softmax and argmax follow the formula exactly) and
    makes a uniform target add nothing: with ``mean_lambda = 0`` the logits come back unchanged.
    ``target_prior=None`` means uniform.
    """
    adjusted = mean_logits - mean_lambda * log_train_prior
    if target_prior is not None:
        num_classes = mean_logits.shape[-1]
        adjusted = adjusted + torch.log(target_prior.to(adjusted) * num_classes)
    return adjusted
