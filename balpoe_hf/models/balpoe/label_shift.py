"""Label shift: the class prior of unlabelled deployment images, estimated from a model's logits on them.

Under label shift ``p(x|y)`` is fixed and only the class prior moves. A BalPoE model's default logits ``z``
are for a uniform prior, so predictions for a target prior ``pi_t`` are ``z + log(C pi_t)``
(``model.set_target_prior``). ``estimate_prior`` estimates ``pi_t`` from ``z`` on unlabelled images;
``model.adapt_to_unlabeled`` runs it on images and sets the result; ``PriorStream`` accumulates the evidence
of a stream of batches for either.

The default, ``auto``: EM (Saerens et al., 2002) on the model's temperature-scaled posteriors, then the
estimate's logarithm shrunk towards uniform by empirical Bayes (``shrinkage``), with its error taken from
the images at hand (the sampling covariance of the EM estimate) and from the calibration it rests on (the
per-class calibration error the held-out split measured: ``holdout_statistics``). It adapts when the
estimated shift is larger than those errors and keeps the uniform prior when it is not, on any model: a
model without a held-out split gets an assumed calibration error in its place. The other named modes are the
literature's estimators as published, without shrinkage, for comparison: ``em``, ``em-bcts`` (Alexandari et
al., ICML 2020), ``bbse`` (Lipton et al., ICML 2018) and ``rlls`` (Azizzadenesheli et al., ICLR 2019). Any
other variant is a ``ShiftEstimator``.

This module is also shipped as remote code next to a saved model: it imports torch and the flat modules
``.calibration``, ``.holdout_statistics``, ``.prior_estimators`` and ``.shrinkage`` only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import apply_calibration, validate_logits
from .holdout_statistics import bias_covariance, validate_calibration
from .prior_estimators import (
    bbse_prior,
    check_weights,
    effective_images,
    em_prior,
    log_prior_covariance,
    rlls_prior,
)
from .shrinkage import FULL_COVARIANCE_CLASSES, shrink_log_prior

METHODS = ("em", "bbse", "rlls")
# What calibrates the posteriors: "auto" (BCTS when the held-out split shows per-class miscalibration, else
# temperature scaling; the raw posteriors for a model without a held-out split), "none", "ts", "bcts", and
# "confusion" (the held-out confusion matrix, for BBSE and RLLS).
CALIBRATIONS = ("auto", "none", "ts", "bcts", "confusion")
SHRINKAGES = ("empirical-bayes", "none")


@dataclass(frozen=True)
class ShiftEstimator:
    """How ``estimate_prior`` estimates a prior; the named modes of ``PRIOR_ESTIMATORS`` are instances.

    ``method``: ``"em"``, ``"bbse"`` or ``"rlls"``. ``calibration``: see ``CALIBRATIONS``; ``"auto"`` is
    BCTS (the held-out split's biases, their covariance counted among the errors) for a model with a
    held-out calibration and the raw posteriors for one without.
    ``shrinkage``: ``"empirical-bayes"`` (``shrinkage.shrink_log_prior``, EM only) or ``"none"``.
    ``pseudo_count``: EM's Dirichlet pseudo-count per class (a MAP estimate that keeps every class above 0,
    so that its logarithm is finite). ``calibration_error``: the standard deviation, in log-odds, of each
    class's calibration error that no held-out split measures: how far the calibration can move between
    the training distribution (which the held-out split follows) and a shifted test distribution, and, for
    a model without a held-out split, the calibration itself; it adds to what the held-out split measured.
    ``regularization``: RLLS's. ``scale_by_temperature``: the shrunk log prior is
    multiplied by the calibration's temperature ``T`` before it is added to the logits, since
    ``argmax(z / T + log pi) = argmax(z + T log pi)``: an under-confident model (``T < 1``) needs a smaller
    adjustment than its logits suggest.
    """

    method: str = "em"
    calibration: str = "auto"
    shrinkage: str = "empirical-bayes"
    pseudo_count: float = 0.5
    calibration_error: float = 0.3
    regularization: float = 0.1
    scale_by_temperature: bool = True

    def __post_init__(self) -> None:
        choices = {"method": METHODS, "calibration": CALIBRATIONS, "shrinkage": SHRINKAGES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ShiftEstimator.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}.")
        if (self.method != "em") != (self.calibration == "confusion"):
            raise ValueError(f"method {self.method!r} with calibration {self.calibration!r}: bbse and rlls "
                             "read the confusion matrix (calibration='confusion'), EM never does.")
        if self.method != "em" and self.shrinkage != "none":
            raise ValueError("empirical-Bayes shrinkage needs EM's covariance: use shrinkage='none' with "
                             f"method={self.method!r}.")
        for name in ("pseudo_count", "calibration_error", "regularization"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    value >= 0 and math.isfinite(value)):
                raise ValueError(f"ShiftEstimator.{name} must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.scale_by_temperature, bool):
            raise ValueError(f"ShiftEstimator.scale_by_temperature must be true or false, got "
                             f"{self.scale_by_temperature!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> ShiftEstimator:
        """The settings saved by ``to_dict``; a ``ValueError`` names a malformed mapping."""
        known = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"shift estimator settings must be a mapping with keys among {sorted(known)}, "
                             f"got {values!r}.")
        return cls(**values)


PRIOR_ESTIMATORS: dict[str, ShiftEstimator] = {
    "auto": ShiftEstimator(),
    "em": ShiftEstimator(calibration="none", shrinkage="none", pseudo_count=0.0, scale_by_temperature=False),
    "em-bcts": ShiftEstimator(calibration="bcts", shrinkage="none", pseudo_count=0.0,
                              scale_by_temperature=False),
    "bbse": ShiftEstimator(method="bbse", calibration="confusion", shrinkage="none"),
    "rlls": ShiftEstimator(method="rlls", calibration="confusion", shrinkage="none"),
}
# Modes that need config.calibration whatever the model.
NEEDS_CALIBRATION = tuple(name for name, settings in PRIOR_ESTIMATORS.items()
                          if settings.calibration not in ("auto", "none"))


@dataclass(frozen=True)
class PriorEstimate:
    """The result of ``estimate_prior``; every tensor is float64 ``(C,)``.

    ``prior``: what to predict with (``model.set_target_prior(prior)``). ``estimate``: the estimator's
    answer before shrinkage. ``log_prior_se``: the standard error of ``log(estimate)`` per class, sampling and
    calibration together (EM with shrinkage; else ``None``). ``shift_spread``: the standard deviation of the
    true log prior that the data support (empirical Bayes' ``tau``; 0 means no shift beyond the errors, and
    ``prior`` is uniform); ``None`` without shrinkage. ``kept_uniform``: ``prior`` is the uniform prior
    although the estimator ran (no evidence of a shift, or too few images). ``images``: the effective number
    of images the estimate rests on. ``method``: the mode's name. ``converged``: EM stopped by its tolerance.
    ``details``: the calibration used, its temperature, whether it is the raw posteriors because the model
    has no held-out calibration for ``auto`` to read (``"no_holdout": True``), and why the prior stayed
    uniform where it did.
    """

    prior: torch.Tensor
    estimate: torch.Tensor
    log_prior_se: torch.Tensor | None
    shift_spread: float | None
    kept_uniform: bool
    images: float
    method: str
    converged: bool = True
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, for a JSON report."""
        return {
            "prior": self.prior.tolist(),
            "estimate": self.estimate.tolist(),
            "log_prior_se": None if self.log_prior_se is None else self.log_prior_se.tolist(),
            "shift_spread": self.shift_spread,
            "kept_uniform": self.kept_uniform,
            "images": self.images,
            "method": self.method,
            "converged": self.converged,
            "details": self.details,
        }


class PriorStream:
    """The evidence of a stream of unlabelled batches, for ``estimate_prior`` (``model.adapt_to_unlabeled(...,
    stream=...)`` uses it).

    ``add(logits)`` appends a batch's uniform-prior logits; every earlier image's weight is multiplied by
    ``forgetting`` at each batch (1: every image counts the same, and the estimate converges to that of all
    the images together; below 1, an image ``k`` batches old counts ``forgetting ** k``, so a prior that
    drifts is followed, over about ``1 / (1 - forgetting)`` batches). Images whose weight fell below
    ``min_weight``, and the oldest beyond ``max_images``, are dropped. The estimate from ``logits`` and
    ``weights`` is exact: EM on the weighted likelihood of every image kept, with its sandwich covariance.
    """

    def __init__(self, forgetting: float = 1.0, *, max_images: int = 100_000, min_weight: float = 1e-3):
        if isinstance(forgetting, bool) or not isinstance(forgetting, int | float) or not 0 < forgetting <= 1:
            raise ValueError(f"forgetting must lie in (0, 1], got {forgetting!r}.")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {max_images!r}.")
        self.forgetting, self.max_images, self.min_weight = float(forgetting), max_images, min_weight
        self.logits: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.batches = 0

    def add(self, logits: torch.Tensor) -> None:
        """Append a batch's uniform-prior logits ``(N, C)``."""
        batch = validate_logits(logits).float()
        if self.logits is not None and batch.shape[1] != self.logits.shape[1]:
            raise ValueError(f"this stream holds logits over {self.logits.shape[1]} classes, got a batch "
                             f"over {batch.shape[1]}; use one stream per model.")
        ones = torch.ones(len(batch), dtype=torch.float64)
        if self.logits is None:
            self.logits, self.weights = batch, ones
        else:
            self.logits = torch.cat([self.logits, batch])
            self.weights = torch.cat([self.weights * self.forgetting, ones])
        keep = self.weights >= self.min_weight
        kept = keep.nonzero().flatten()  # rows are oldest first, and min_weight has dropped the oldest
        keep[kept[: max(0, len(kept) - self.max_images)]] = False
        self.logits, self.weights = self.logits[keep], self.weights[keep]
        self.batches += 1

    def reset(self) -> None:
        """Forget every batch."""
        self.logits = self.weights = None
        self.batches = 0


def resolve_estimator(method: str | ShiftEstimator, shift_estimator: dict[str, Any] | None = None
                      ) -> tuple[str, ShiftEstimator]:
    """``(name, settings)`` of a prior mode: a name of ``PRIOR_ESTIMATORS`` or a ``ShiftEstimator``.

    ``"auto"`` runs ``config.shift_estimator`` when a model's config sets one (``{"settings": ...}``, named
    ``"auto (custom)"``), else the package's default; a choice recorded by an earlier release (a
    ``"name"`` beside its settings) is not run: every model gets today's default.
    """
    if isinstance(method, ShiftEstimator):
        return "custom", method
    if method == "auto" and shift_estimator is not None and not is_legacy_choice(shift_estimator):
        validate_shift_estimator(shift_estimator)
        return "auto (custom)", ShiftEstimator.from_dict(shift_estimator["settings"])
    if method in PRIOR_ESTIMATORS:
        return method, PRIOR_ESTIMATORS[method]
    raise ValueError(f"unknown prior-estimation method {method!r}; choose one of "
                     f"{', '.join(PRIOR_ESTIMATORS)}, or pass a ShiftEstimator.")


def is_legacy_choice(shift_estimator: Any) -> bool:
    """A ``config.shift_estimator`` written by an earlier release's per-model choice (it names the
    candidate it chose); today's ``auto`` ignores it."""
    return isinstance(shift_estimator, dict) and "name" in shift_estimator


def validate_shift_estimator(shift_estimator: Any) -> None:
    """Check a ``config.shift_estimator``: ``{"settings": ShiftEstimator.to_dict()}``, or an earlier
    release's recorded choice (accepted, and ignored by ``auto``)."""
    if is_legacy_choice(shift_estimator):
        if not isinstance(shift_estimator.get("settings"), dict):
            raise ValueError(f"shift_estimator {shift_estimator!r} names a choice of an earlier release but "
                             "has no settings mapping; delete it from config.json (auto needs none).")
        return
    if not isinstance(shift_estimator, dict) or set(shift_estimator) != {"settings"}:
        raise ValueError(f"shift_estimator must be None or {{'settings': ShiftEstimator(...).to_dict()}}, "
                         f"got {shift_estimator!r}.")
    ShiftEstimator.from_dict(shift_estimator["settings"])


# Fewer unlabelled images than classes cannot inform a prior over every class: the estimate is the uniform
# prior, with a warning and the reason in PriorEstimate.details.
MIN_IMAGES_PER_CLASS = 1


def _uniform(num_classes: int) -> torch.Tensor:
    return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)


def _posterior_calibration(settings: ShiftEstimator, calibration: dict[str, Any] | None, name: str
                           ) -> tuple[str, float, Any]:
    """Which calibration EM uses, with its temperature and biases (``None``: no biases)."""
    kind = settings.calibration
    if kind == "auto":
        kind = "none" if calibration is None else "bcts"
    if kind == "none":
        return "none", 1.0, None
    if calibration is None:
        raise ValueError(f"method {name!r} needs the model's held-out calibration, but its config has none: "
                         "train with holdout_fraction > 0 (balpoe-train --holdout-fraction 0.1), or use "
                         "method='auto' or 'em'.")
    if kind == "ts":
        return "ts", calibration["ts_temperature"], None
    return "bcts", calibration["temperature"], calibration["bias"]


def describe_auto(calibration: dict[str, Any] | None) -> str:
    """One line on what ``auto`` rests on for a model with this ``config.calibration``."""
    settings = PRIOR_ESTIMATORS["auto"]
    if calibration is None:
        # Raw posteriors of an over-fitted model lean further than the assumed error allows (a 200-epoch
        # balanced softmax model lost 0.9 points on an unshifted set): say how to get a calibrated estimate.
        return (f"'auto' adapts from the raw posteriors, with a per-class calibration error of "
                f"{settings.calibration_error:g} (no held-out split: train with --holdout-fraction 0.1 for "
                "a calibrated estimate, safer on an over-confident model)")
    _, temperature, _ = _posterior_calibration(settings, calibration, "auto")
    return (f"'auto' adapts from the held-out split's BCTS posteriors (temperature {temperature:.3f}), with "
            f"the calibration error it measured plus {settings.calibration_error:g} a class")


def _calibration_covariance(calibration: dict[str, Any] | None, settings: ShiftEstimator,
                            num_classes: int) -> torch.Tensor:
    """The covariance of the per-class calibration error: what the held-out split measured (none without
    one), plus ``settings.calibration_error`` squared on every class. ``(C,)`` variances above
    ``FULL_COVARIANCE_CLASSES`` classes."""
    error = settings.calibration_error**2
    if num_classes > FULL_COVARIANCE_CLASSES:
        measured = torch.zeros(num_classes, dtype=torch.float64) if calibration is None else (
            bias_covariance(calibration).diagonal())
        return measured + error
    measured = torch.zeros(num_classes, num_classes, dtype=torch.float64) if calibration is None else (
        bias_covariance(calibration))
    return measured + error * torch.eye(num_classes, dtype=torch.float64)


def estimate_prior(logits: torch.Tensor, calibration: dict[str, Any] | None = None,
                   method: str | ShiftEstimator = "auto", *, weights: torch.Tensor | None = None,
                   shift_estimator: dict[str, Any] | None = None) -> PriorEstimate:
    """The class prior of unlabelled images from a model's uniform-prior logits ``(N, C)`` on them.

    ``calibration`` is the model's ``config.calibration`` (``holdout_statistics.holdout_calibration``;
    ``None`` for a model trained without a held-out split) and ``shift_estimator`` its
    ``config.shift_estimator``. ``method``: ``"auto"`` (the default: EM on the calibrated posteriors, shrunk
    by empirical Bayes, see the module docstring), another name of ``PRIOR_ESTIMATORS`` or a
    ``ShiftEstimator``. ``weights`` ``(N,)``: the images' weights (``PriorStream.weights``; ``None``: equal).

    Predictions for the estimate are the logits plus ``log(C * prior)``, which is
    ``model.set_target_prior(estimate.prior)``; the calibration serves the estimate only, so a uniform
    prior leaves the predictions exactly as they were. With fewer (effective) images than classes
    (``MIN_IMAGES_PER_CLASS``), the prior stays uniform, with a warning and the reason in ``details``.
    """
    name, settings = resolve_estimator(method, shift_estimator)
    scores = validate_logits(logits)
    num_samples, num_classes = scores.shape
    image_weights = check_weights(weights, num_samples)
    images = effective_images(image_weights)
    if calibration is not None:
        validate_calibration(calibration, num_classes)
    if settings.calibration == "confusion" and calibration is None:
        raise ValueError(f"method {name!r} needs the held-out confusion matrix of the model's calibration, "
                         "but its config has none: train with holdout_fraction > 0 (balpoe-train "
                         "--holdout-fraction 0.1), or use method='auto' or 'em'.")
    uniform = _uniform(num_classes)
    if images < MIN_IMAGES_PER_CLASS * num_classes:
        reason = (f"{images:.0f} unlabelled images for {num_classes} classes: too few to estimate a prior "
                  "over every class, so the prior stays uniform; adapt on a larger set.")
        warnings.warn(reason, stacklevel=2)
        return PriorEstimate(prior=uniform, estimate=uniform.clone(), log_prior_se=None, shift_spread=None,
                             kept_uniform=True, images=images, method=name, details={"reason": reason})
    if settings.method != "em":
        predicted = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, scores.argmax(dim=1),
                                                                              image_weights)
        confusion = torch.as_tensor(calibration["confusion"], dtype=torch.float64)
        estimate = bbse_prior(confusion, predicted) if settings.method == "bbse" else rlls_prior(
            confusion, predicted, regularization=settings.regularization)
        return PriorEstimate(prior=estimate, estimate=estimate, log_prior_se=None, shift_spread=None,
                             kept_uniform=False, images=images, method=name,
                             details={"calibration": "confusion"})
    kind, temperature, bias = _posterior_calibration(settings, calibration, name)
    posteriors = torch.softmax(apply_calibration(scores, temperature, bias), dim=1)
    estimate, converged = em_prior(posteriors, weights=image_weights, pseudo_counts=settings.pseudo_count)
    details: dict[str, Any] = {"calibration": kind, "temperature": temperature}
    if settings.calibration == "auto" and calibration is None:
        details["no_holdout"] = True
    if settings.shrinkage == "none":
        prior = (torch.softmax(temperature * estimate.log(), dim=0) if settings.scale_by_temperature
                 else estimate)
        return PriorEstimate(prior=prior, estimate=estimate, log_prior_se=None, shift_spread=None,
                             kept_uniform=False, images=images, method=name, converged=converged,
                             details=details)
    covariance = _calibration_covariance(calibration, settings, num_classes)
    if num_classes > FULL_COVARIANCE_CLASSES:
        covariance = covariance + _diagonal_sampling_variance(posteriors, estimate, image_weights,
                                                              settings.pseudo_count)
    else:
        covariance = covariance + log_prior_covariance(posteriors, estimate, weights=image_weights,
                                                       pseudo_counts=settings.pseudo_count)
    shrunk, spread = shrink_log_prior(estimate.log(), covariance)
    adjustment = temperature * shrunk if settings.scale_by_temperature else shrunk
    variances = covariance if covariance.ndim == 1 else covariance.diagonal()
    if spread == 0:
        details["reason"] = "the estimate differs from uniform by no more than its errors"
    return PriorEstimate(prior=torch.softmax(adjustment, dim=0), estimate=estimate,
                         log_prior_se=variances.clamp_min(0).sqrt(), shift_spread=math.sqrt(spread),
                         kept_uniform=spread == 0, images=images, method=name, converged=converged,
                         details=details)


def _diagonal_sampling_variance(posteriors: torch.Tensor, prior: torch.Tensor, weights: torch.Tensor,
                                pseudo_count: float) -> torch.Tensor:
    """The variance of each ``log pi_c`` alone, for many classes: the sandwich of
    ``prior_estimators.log_prior_covariance`` restricted to one class at a time (no ``(C, C)`` matrix)."""
    scores = posteriors * posteriors.shape[1]
    scores = scores / (scores @ prior).clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    hessian = weights @ scores.square() + pseudo_count / prior.square()
    meat = weights.square() @ scores.square()
    return meat / hessian.square() / prior.square()
