"""What a saved model keeps of its held-out split, so that it can estimate a test prior without its data.

``config.calibration`` (``holdout_calibration``): the BCTS and temperature-scaling fits of the model's
uniform-prior logits on held-out labelled data, the uncertainty of the BCTS biases, and the held-out
confusion matrix. ``label_shift.estimate_prior`` reads it: the temperature sharpens or flattens the
posteriors, the biases' covariance says how far the per-class calibration can be off, the confusion matrix
serves BBSE and RLLS.

This module is also shipped as remote code next to a saved model: it imports torch, ``.calibration`` and
``.prior_estimators`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .calibration import bcts_bias_covariance, fit_bcts, fit_temperature, validate_logits
from .prior_estimators import confusion_matrix

CALIBRATION_KEYS = ("temperature", "bias", "bias_std", "bias_se", "bias_cov_factor", "ts_temperature",
                    "holdout_counts", "confusion")
# Models calibrated before bias_std, bias_se and bias_cov_factor were recorded lack them: bias_std describes
# the fit, and without the others the biases' covariance is a normal approximation of the held-out counts
# alone (see bias_covariance).
OPTIONAL_CALIBRATION_KEYS = ("bias_std", "bias_se", "bias_cov_factor")
# Rank of the low-rank part of the BCTS bias covariance kept in config.calibration (the rest is diagonal):
# exact up to this many classes, and a few hundred kilobytes of JSON for a thousand.
BIAS_COVARIANCE_RANK = 32
# The Gaussian prior of the BCTS biases (calibration.fit_bcts): a class whose few held-out images the model
# separates perfectly has no finite maximum-likelihood bias (the fit runs off to huge biases), and the biases
# of classes with a handful of held-out images are noisy. On shifts simulated from held-out data (README,
# label shift) 1.0 did as well as the maximum-likelihood fit, within the simulation's noise.
HOLDOUT_BIAS_STD = 1.0


def holdout_calibration(logits: torch.Tensor, labels: torch.Tensor | Sequence[int], *,
                        bias_std: float | None = HOLDOUT_BIAS_STD) -> dict[str, Any]:
    """``config.calibration`` from a model's uniform-prior logits ``(N, C)`` on held-out labelled data.

    The held-out data follow the training distribution, not the uniform prior of the logits ``z``, so the
    fits use the offset ``log q`` with ``q`` the held-out label frequencies (see ``calibration``'s module
    docstring); a stratified held-out split has the training prior up to rounding, and ``q`` is the prior
    of the very data fitted. The returned ``temperature`` and ``bias`` (BCTS, ``calibration.fit_bcts``
    with ``bias_std``; ``None`` is the plain maximum-likelihood fit) and ``ts_temperature`` (temperature
    scaling, ``fit_temperature``) then calibrate ``z`` itself for a uniform prior: ``softmax(z / T + b)``.
    ``bias_se`` (standard errors) and ``bias_cov_factor`` (``F``, ``(C, r)`` with ``r = min(C,
    BIAS_COVARIANCE_RANK)``: the leading eigenvectors of the covariance scaled by the root of their
    eigenvalues) describe the uncertainty of the biases (``calibration.bcts_bias_covariance``) for the
    shrinkage of ``auto``: ``F F^T`` plus a diagonal up to ``bias_se^2`` (``bias_covariance``).
    ``confusion`` counts ``argmax z`` against the labels (rows labels, for ``bbse_prior``) and
    ``holdout_counts`` are its row sums. Plain lists and numbers, ready for JSON. Raises a ``ValueError``
    for a class without held-out sample.
    """
    z = validate_logits(logits)
    num_classes = z.shape[1]
    targets = torch.as_tensor(labels)
    confusion = confusion_matrix(z.argmax(dim=1), targets, num_classes)
    counts = confusion.sum(dim=1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"classes {empty[:20]} have no held-out sample, so neither their calibration bias "
                         "nor their column of the confusion matrix can be estimated; hold out at least one "
                         "image of every class (a stratified split, e.g. recipe holdout_fraction).")
    offset = (counts / counts.sum()).log()
    temperature, bias = fit_bcts(z, targets, offset=offset, bias_std=bias_std)
    covariance = bcts_bias_covariance(z, temperature, bias, offset=offset, bias_std=bias_std)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    rank = min(num_classes, BIAS_COVARIANCE_RANK)
    factor = eigenvectors[:, -rank:] * eigenvalues[-rank:].clamp_min(0).sqrt()
    return {
        "temperature": temperature,
        "bias": bias.tolist(),
        "bias_std": bias_std,
        "bias_se": covariance.diagonal().clamp_min(0).sqrt().tolist(),
        "bias_cov_factor": factor.tolist(),
        "ts_temperature": fit_temperature(z, targets, offset=offset),
        "holdout_counts": [int(n) for n in counts.tolist()],
        "confusion": confusion.long().tolist(),
    }


def _positive_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def validate_calibration(calibration: dict[str, Any], num_classes: int) -> None:
    """Check a ``config.calibration`` mapping (``holdout_calibration``'s keys); ``ValueError`` otherwise."""
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be a mapping with keys {CALIBRATION_KEYS} (see "
                         f"holdout_statistics.holdout_calibration), got {type(calibration).__name__}.")
    missing = [key for key in CALIBRATION_KEYS
               if key not in calibration and key not in OPTIONAL_CALIBRATION_KEYS]
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if missing or unknown:
        optional = ", ".join(OPTIONAL_CALIBRATION_KEYS)
        raise ValueError(f"calibration needs the keys {CALIBRATION_KEYS} ({optional} optional); missing "
                         f"{missing}, unknown {unknown}. Build it with "
                         "holdout_statistics.holdout_calibration(logits, labels).")
    for key in ("temperature", "ts_temperature", "bias_std"):
        value = calibration.get(key)
        if not (_positive_finite(value) or (key == "bias_std" and value is None)):
            raise ValueError(f"calibration[{key!r}] must be a positive finite number, got {value!r}.")
    _check_class_values(calibration["bias"], num_classes, "calibration['bias']")
    if calibration.get("bias_se") is not None:
        standard_errors = _check_class_values(calibration["bias_se"], num_classes, "calibration['bias_se']")
        if (standard_errors < 0).any():
            raise ValueError("calibration['bias_se'] must be non-negative standard errors, one per class.")
    if calibration.get("bias_cov_factor") is not None:
        factor = torch.as_tensor(calibration["bias_cov_factor"], dtype=torch.float64)
        if factor.ndim != 2 or factor.shape[0] != num_classes or not torch.isfinite(factor).all() or (
                calibration.get("bias_se") is None):
            raise ValueError(f"calibration['bias_cov_factor'] must be a finite ({num_classes}, rank) matrix, "
                             "saved together with calibration['bias_se'].")
    counts = _check_class_values(calibration["holdout_counts"], num_classes, "calibration['holdout_counts']")
    if (counts <= 0).any() or (counts != counts.round()).any():
        raise ValueError("calibration['holdout_counts'] must be positive integers, one per class: every "
                         f"class needs a held-out sample; got {calibration['holdout_counts']}.")
    confusion = torch.as_tensor(calibration["confusion"], dtype=torch.float64)
    if confusion.shape != (num_classes, num_classes) or (confusion < 0).any() or not torch.equal(
            confusion.sum(dim=1), counts):
        raise ValueError(f"calibration['confusion'] must be a ({num_classes}, {num_classes}) matrix of "
                         "non-negative counts whose rows sum to calibration['holdout_counts'].")


def _check_class_values(values: Any, num_classes: int, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {num_classes} numbers, got {values!r}.") from None
    if tensor.shape != (num_classes,) or not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be {num_classes} finite numbers (one per class), got {values!r}.")
    return tensor


def bias_covariance(calibration: dict[str, Any]) -> torch.Tensor:
    """The covariance ``(C, C)`` of the BCTS biases ``calibration["bias"]``: how far each class's
    calibration can be off, and with which others together.

    ``F F^T`` plus the diagonal rest up to ``bias_se^2`` (``holdout_calibration``); for a calibration saved
    before those were recorded, ``diag(1 / holdout_counts)``, the normal approximation of a log-frequency
    estimated from that many images.
    """
    if calibration.get("bias_cov_factor") is not None:
        factor = torch.as_tensor(calibration["bias_cov_factor"], dtype=torch.float64)
        variance = torch.as_tensor(calibration["bias_se"], dtype=torch.float64).square()
        return factor @ factor.T + torch.diag((variance - factor.square().sum(dim=1)).clamp_min(0))
    return torch.diag(1.0 / torch.as_tensor(calibration["holdout_counts"], dtype=torch.float64))
