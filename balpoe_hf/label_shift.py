"""Label shift: estimating the class prior of unlabelled deployment data, and when to trust the estimate.

Under label shift ``p(x|y)`` is fixed and only the class prior moves. A BalPoE model's default logits ``z``
are for a uniform prior, so predictions for a target prior ``pi_t`` are ``z + log(C pi_t)``
(``model.set_target_prior``); this module estimates ``pi_t`` from the model's logits on unlabelled images.

- Estimators: EM (Saerens et al., 2002) on raw, temperature-scaled or BCTS-calibrated posteriors
  (Alexandari et al., ICML 2020), optionally shrunk towards uniform (Dirichlet MAP); BBSE (Lipton et al.,
  ICML 2018) and RLLS (Azizzadenesheli et al., ICLR 2019) from the held-out confusion matrix.
- Guards: the likelihood-ratio test of "no shift", and the gain guard (``gain_guard``), which keeps the
  uniform prior, or shrinks towards it, unless the expected accuracy gain of the estimate is larger than its
  uncertainty (a bootstrap over the unlabelled images and the held-out calibration).
- ``config.calibration`` (``holdout_calibration``): what a saved model keeps of its held-out split, so that
  a model loaded from the Hub estimates priors without its training data; ``config.shift_estimator``: the
  estimator chosen for this model (``balpoe_hf.shift_selection``), which the default mode ``auto`` runs.

This module is also shipped as remote code next to a saved model: it imports torch, ``.calibration`` and
``.priors`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import apply_calibration, fit_bcts, fit_temperature, validate_logits
from .priors import PriorLike, as_vector, validate_prior

# --------------------------------------------------------------------------- label-shift estimation
# Under label shift p(x|y) is fixed and only the class prior moves. For posteriors p_ic = p_s(c|x_i) under
# a source prior pi_s, the unlabelled target data have log-likelihood, up to a constant in pi,
#     l(pi) = sum_i log sum_c p_ic pi_c / pi_s,c,
# which every estimator and test below uses.

ESTIMATION_METHODS = ("em", "bbse")
GUARDS = ("lrt", "none")


def _check_posteriors(probs: torch.Tensor) -> torch.Tensor:
    posteriors = torch.as_tensor(probs).detach().cpu().to(torch.float64)
    if posteriors.ndim != 2 or posteriors.shape[0] == 0 or posteriors.shape[1] == 0:
        raise ValueError(f"probs must have shape (num_samples, num_classes) with both > 0, "
                         f"got {tuple(posteriors.shape)}.")
    if not torch.isfinite(posteriors).all() or (posteriors < 0).any():
        raise ValueError("probs must be finite and non-negative; pass softmax(logits), not logits.")
    row_sums = posteriors.sum(dim=1)
    # float32 softmax rows over many classes can miss 1 by more than 1e-4; 1e-3 still catches logits.
    if ((row_sums - 1).abs() > 1e-3).any():
        raise ValueError("rows of probs must sum to 1 (posteriors p(y|x)); pass softmax(logits), not logits.")
    return posteriors / row_sums[:, None]


def _positive_prior(prior: PriorLike | None, num_classes: int, name: str) -> torch.Tensor:
    """``prior`` validated and strictly positive, or uniform for ``None``."""
    if prior is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    tensor = validate_prior(prior, num_classes, name=name)
    zero = torch.nonzero(tensor == 0).flatten().tolist()
    if zero:
        raise ValueError(f"{name} is zero for classes {zero}, but the estimators divide by it or take its "
                         f"log there; give every class a positive probability in {name}.")
    return tensor


def _check_em_settings(tol: float, max_iter: int) -> None:
    if max_iter < 1 or not tol >= 0:
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}.")


def _em_step(posteriors: torch.Tensor, source: torch.Tensor, pseudo_counts: torch.Tensor,
             prior: torch.Tensor) -> torch.Tensor:
    """One EM update (Saerens et al., 2002), MAP under a Dirichlet(1 + pseudo_counts) prior.

    With ``w = pi / pi_s`` the responsibilities are ``r_ic = p_ic w_c / s_i``, ``s_i = sum_c p_ic w_c``, and
    the update is ``pi_c = (sum_i r_ic + a_c) / (N + sum_c a_c)`` with ``a = pseudo_counts`` (0: maximum
    likelihood). ``sum_i r_ic = w_c (P^T (1 / s))_c`` needs two matrix-vector products and no ``(N, C)``
    temporary.
    """
    ratio = prior / source
    # A row whose mass sits only on classes with pi = 0 has s_i = 0 and r_i = 0; tiny avoids 0 / 0.
    mixture = (posteriors @ ratio).clamp_min(torch.finfo(torch.float64).tiny)
    updated = ratio * (posteriors.T @ mixture.reciprocal()) + pseudo_counts
    return updated / updated.sum()


def _em_objective(posteriors: torch.Tensor, source: torch.Tensor, pseudo_counts: torch.Tensor,
                  prior: torch.Tensor) -> float:
    """``l(pi) + sum_c a_c log pi_c``, the quantity every EM step increases."""
    return _log_likelihood(posteriors, source, prior) + float(torch.special.xlogy(pseudo_counts, prior).sum())


def _em(posteriors: torch.Tensor, source: torch.Tensor, pseudo_counts: torch.Tensor, tol: float,
        max_iter: int, accelerate: bool) -> tuple[torch.Tensor, bool]:
    """EM for the target prior from uniform, with at most ``max_iter`` updates (``_em_step``).

    Stops when no entry moves by more than ``tol``; returns the prior and whether that happened. EM is slow
    when the posteriors overlap (thousands of updates on 100 classes), so ``accelerate`` uses SQUAREM
    (Varadhan & Roland, Scand. J. Stat. 2008, scheme S3): from two updates ``r = F(pi) - pi`` and
    ``v = F(F(pi)) - 2 F(pi) + pi``, it extrapolates to ``pi - 2 alpha r + alpha^2 v`` with
    ``alpha = min(-|r| / |v|, -1)``, clips that to the simplex and applies one more update; it keeps the
    result only if the objective is no lower than after the two plain updates, so it never does worse.
    """
    def step(prior: torch.Tensor) -> torch.Tensor:
        return _em_step(posteriors, source, pseudo_counts, prior)

    def objective(prior: torch.Tensor) -> float:
        return _em_objective(posteriors, source, pseudo_counts, prior)

    num_classes = posteriors.shape[1]
    target = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    updates = 0
    while updates < max_iter:
        if accelerate and updates + 3 <= max_iter:
            first = step(target)
            second = step(first)
            updates += 2
            updated = second
            r, v = first - target, second - 2 * first + target
            if v.norm() > 0:
                alpha = min(-float(r.norm() / v.norm()), -1.0)
                extrapolated = (target - 2 * alpha * r + alpha**2 * v).clamp_min(0)
                if extrapolated.sum() > 0:
                    candidate = step(extrapolated / extrapolated.sum())
                    updates += 1
                    if objective(candidate) >= objective(second):
                        updated = candidate
        else:
            updated = step(target)
            updates += 1
        converged = bool((updated - target).abs().max() <= tol)
        target = updated
        if converged:
            return target, True
    return target, False


def estimate_target_prior(probs: torch.Tensor, source_prior: PriorLike | None = None, tol: float = 1e-6,
                          max_iter: int = 100) -> torch.Tensor:
    """Estimate the test label distribution from unlabeled posteriors with the EM of Saerens et al. (2002).

    ``probs`` ``(N, C)`` are calibrated posteriors ``p(y|x)`` under ``source_prior`` (``None``: uniform,
    which is what a BalPoE model gives with its default uniform target prior). Starting from a uniform
    ``pi_t``, each step re-weights the posteriors to ``p(y|x) * pi_t(y) / pi_source(y)`` (renormalised
    per row) and sets ``pi_t`` to their mean over the samples; it stops when no entry moves by more than
    ``tol`` or after ``max_iter`` steps. Returns ``pi_t`` as a float64 tensor ``(C,)`` summing to one,
    ready for ``model.set_target_prior(...)``. EM trusts the posteriors class by class: calibrate them
    first (``estimate_prior`` with a BCTS ``temperature`` and ``bias``), or it can drive a class to zero.
    """
    posteriors = _check_posteriors(probs)
    _check_em_settings(tol, max_iter)
    source = _positive_prior(source_prior, posteriors.shape[1], "source_prior")
    no_pseudo_counts = torch.zeros(posteriors.shape[1], dtype=torch.float64)
    return _em(posteriors, source, no_pseudo_counts, tol, max_iter, accelerate=False)[0]


def _log_likelihood(posteriors: torch.Tensor, source: torch.Tensor, prior: torch.Tensor) -> float:
    """``l(pi) = sum_i log sum_c p_ic pi_c / pi_s,c`` (the target log-likelihood up to a constant)."""
    mixture = posteriors @ (prior / source)  # (N,)
    return float(mixture.clamp_min(torch.finfo(torch.float64).tiny).log().sum())


def _standard_error(posteriors: torch.Tensor, source: torch.Tensor, prior: torch.Tensor,
                    pseudo_counts: torch.Tensor) -> torch.Tensor:
    """Per-class standard error of an EM estimate from the observed information on the simplex.

    With ``q_ic = p_ic / pi_s,c`` and ``s_i = sum_c q_ic pi_c``, minus the Hessian of ``l(pi)`` (plus the
    Dirichlet log-density ``sum_c a_c log pi_c``) is ``I = sum_i q_i q_i^T / s_i^2 + diag(a / pi^2)``.
    ``pi`` lives on the simplex, so ``I`` is restricted to it with the basis ``B = [Id_{C-1}; -1^T]``:
    ``Cov(pi) = B (B^T I B)^{-1} B^T`` (the same for every basis of the sum-zero directions). Returns
    ``sqrt(diag Cov)``, all ``inf`` when ``B^T I B`` is singular (classes the posteriors cannot tell apart).
    """
    num_classes = prior.numel()
    scaled = posteriors / source
    scaled = scaled / (scaled @ prior).clamp_min(torch.finfo(torch.float64).tiny)[:, None]  # q_i / s_i
    information = scaled.T @ scaled
    information = information + torch.diag(
        torch.where(pseudo_counts > 0, pseudo_counts / prior.square(), torch.zeros_like(prior)))
    basis = torch.cat([torch.eye(num_classes - 1, dtype=torch.float64),
                       -torch.ones(1, num_classes - 1, dtype=torch.float64)])
    cholesky, failed = torch.linalg.cholesky_ex(basis.T @ information @ basis)
    if failed:
        return torch.full((num_classes,), float("inf"), dtype=torch.float64)
    covariance = basis @ torch.cholesky_inverse(cholesky) @ basis.T
    return covariance.diagonal().clamp_min(0).sqrt()


def likelihood_ratio_test(probs: torch.Tensor, estimate: PriorLike, null_prior: PriorLike | None = None,
                          source_prior: PriorLike | None = None) -> tuple[float, float]:
    """Likelihood-ratio test of a target prior ``null_prior`` (``None``: uniform) against ``estimate``.

    ``probs`` ``(N, C)`` are posteriors under ``source_prior`` (``None``: uniform) and ``estimate`` the
    maximum-likelihood EM estimate on them. Returns ``(Lambda, p)`` with
    ``Lambda = 2 (l(estimate) - l(null_prior))`` and, by Wilks' theorem, ``p = P(chi^2_{C-1} >= Lambda)
    = Q((C - 1) / 2, Lambda / 2)`` (the regularised upper incomplete gamma function). A small ``p`` means
    the unlabelled data support a shift away from ``null_prior``. Valid for calibrated posteriors and a
    strictly positive ``null_prior``; miscalibrated posteriors show a "shift" that is not there.
    """
    posteriors = _check_posteriors(probs)
    num_classes = posteriors.shape[1]
    if num_classes < 2:
        raise ValueError("a likelihood-ratio test needs at least 2 classes.")
    source = _positive_prior(source_prior, num_classes, "source_prior")
    null = _positive_prior(null_prior, num_classes, "null_prior")
    alternative = validate_prior(estimate, num_classes, name="estimate")
    # l(estimate) >= l(null) for the maximum-likelihood estimate; round-off can make it a hair negative.
    statistic = max(0.0, 2 * (_log_likelihood(posteriors, source, alternative)
                              - _log_likelihood(posteriors, source, null)))
    dof = torch.tensor((num_classes - 1) / 2, dtype=torch.float64)
    p_value = float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, p_value


def confusion_matrix(predictions: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
                     num_classes: int) -> torch.Tensor:
    """Counts ``(C, C)`` (float64): entry ``[i, j]`` is the number of samples of label ``i`` predicted ``j``.

    Rows are true labels and columns predictions, as in scikit-learn and torchmetrics (written here because
    remote code cannot import either).
    """
    preds, targets = torch.as_tensor(predictions).detach().cpu(), torch.as_tensor(labels).detach().cpu()
    for name, tensor in (("predictions", preds), ("labels", targets)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool or (
                tensor.ndim != 1):
            raise TypeError(f"{name} must be a 1-D tensor of integer class indices, got dtype {tensor.dtype} "
                            f"and shape {tuple(tensor.shape)}.")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes.")
    if preds.shape != targets.shape:
        raise ValueError(f"predictions and labels must have the same length, got {preds.numel()} and "
                         f"{targets.numel()}.")
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).to(torch.float64)


def project_to_simplex(vector: PriorLike) -> torch.Tensor:
    """Euclidean projection of ``vector`` ``(C,)`` onto the probability simplex (float64).

    ``argmin_p |p - v|`` over ``p >= 0, sum p = 1`` is ``p = max(v - theta, 0)``, with ``theta`` found by
    sorting (Duchi et al., ICML 2008, "Efficient projections onto the l1-ball").
    """
    values = as_vector(vector, "vector")
    ordered = values.sort(descending=True).values
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    support = int((ordered - cumulative / ranks > 0).nonzero().max()) + 1
    theta = cumulative[support - 1] / support
    return (values - theta).clamp_min(0)


def bbse_prior(confusion: torch.Tensor, target_prediction_counts: PriorLike) -> torch.Tensor:
    """Black-box shift estimation (BBSE, Lipton et al., ICML 2018) of the target prior.

    ``confusion`` ``(C, C)`` holds held-out counts (``confusion_matrix(pred, labels, C)``: rows true labels,
    columns predictions); ``target_prediction_counts`` ``(C,)`` counts how often the same classifier predicts
    each class on the unlabelled target data. Under label shift ``K_ij = P(yhat = j | y = i)`` is the same
    in both domains, so ``mu = K^T pi_t`` with ``mu`` the target prediction frequencies. Solves that system
    (least squares, minimum norm if ``K`` is singular) and projects the solution onto the simplex
    (``project_to_simplex``). This equals Lipton et al.'s ``w = C^{-1} mu``, ``pi_t = w * pi_s`` with ``C``
    the joint confusion and ``pi_s`` the held-out label frequencies. Returns float64 ``(C,)``.
    """
    counts = torch.as_tensor(confusion, dtype=torch.float64).detach().cpu()
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 2:
        raise ValueError(f"confusion must be a square (num_classes, num_classes) matrix with "
                         f"num_classes >= 2, got shape {tuple(counts.shape)}.")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("confusion must hold finite non-negative counts.")
    num_classes = counts.shape[0]
    predicted = as_vector(target_prediction_counts, "target_prediction_counts")
    if predicted.numel() != num_classes or (predicted < 0).any() or predicted.sum() <= 0:
        raise ValueError(f"target_prediction_counts must hold {num_classes} non-negative counts with a "
                         f"positive total, got {predicted.tolist()}.")
    row_totals = counts.sum(dim=1)
    empty = torch.nonzero(row_totals == 0).flatten().tolist()
    if empty:
        raise ValueError(f"classes {empty} have no held-out sample, so P(prediction | label) is unknown for "
                         "them; hold out samples of every class.")
    conditional = counts / row_totals[:, None]
    frequencies = predicted / predicted.sum()
    solution = torch.linalg.lstsq(conditional.T, frequencies[:, None], driver="gelsd").solution[:, 0]
    return project_to_simplex(solution)


@dataclass(frozen=True)
class PriorEstimate:
    """The result of ``estimate_prior``; every tensor is float64 ``(C,)``.

    ``prior``: the prior to use, ``estimate`` or ``null_prior`` when the guard fired. ``estimate``: the
    estimator's answer before the guard. ``std_error``: its per-class standard error from the observed
    information (EM only, else ``None``). ``statistic`` and ``p_value``: the likelihood-ratio test of
    ``null_prior`` against the maximum-likelihood EM estimate (``likelihood_ratio_test``), reported whatever
    the guard. ``converged``: every EM run stopped by ``tol`` before ``max_iter``.
    """

    prior: torch.Tensor
    estimate: torch.Tensor
    std_error: torch.Tensor | None
    statistic: float
    p_value: float
    guard_fired: bool
    converged: bool
    method: str

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, for a JSON report."""
        return {
            "prior": self.prior.tolist(),
            "estimate": self.estimate.tolist(),
            "std_error": None if self.std_error is None else self.std_error.tolist(),
            "statistic": self.statistic,
            "p_value": self.p_value,
            "guard_fired": self.guard_fired,
            "converged": self.converged,
            "method": self.method,
        }


def estimate_prior(logits: torch.Tensor, *, method: str = "em", temperature: float = 1.0,
                   bias: PriorLike | None = None, source_prior: PriorLike | None = None,
                   confusion: torch.Tensor | None = None, concentration: float = 0.0,
                   null_prior: PriorLike | None = None, guard: str = "lrt", alpha: float = 0.05,
                   tol: float = 1e-8, max_iter: int = 1000) -> PriorEstimate:
    """Estimate the label distribution of unlabelled data, with a no-harm guard.

    ``logits`` ``(N, C)`` are the model's logits on the unlabelled target data; ``softmax(logits / T + b)``
    must be calibrated posteriors under ``source_prior`` (``None``: uniform, a BalPoE model's default
    logits). ``temperature`` ``T`` and ``bias`` ``b`` come from ``calibration.fit_bcts`` (or
    ``fit_temperature``) on held-out labelled data; the defaults ``1`` and ``None`` mean no calibration.

    ``method="em"``: EM of Saerens et al. (2002) on the calibrated posteriors. This is EM with bias-corrected
    calibration (Alexandari et al., ICML 2020) when ``(T, b)`` come from ``fit_bcts``. ``concentration``
    ``kappa >= 0`` makes it the MAP estimate under a Dirichlet prior with ``kappa * null_prior``
    pseudo-counts, ``pi_c = (sum_i r_ic + kappa null_c) / (N + kappa)``: it shrinks the estimate towards
    ``null_prior`` as if ``kappa`` extra samples followed it. ``std_error`` comes from the observed
    information (see ``_standard_error``); it ignores the uncertainty of ``(T, b)``.

    ``method="bbse"``: ``bbse_prior(confusion, counts of argmax(logits))``; the predictions are the argmax of
    the raw ``logits``, so ``confusion`` must count the argmax of the same kind of logits on held-out data.

    Guard (``guard="lrt"``): when the likelihood-ratio test of ``null_prior`` (``None``: uniform, the prior
    a BalPoE model assumes by default) has ``p_value > alpha``, the data do not support a shift and
    ``prior`` is ``null_prior``. ``guard="none"`` always returns the estimate (the test is still reported).
    Raising ``alpha`` makes the guard fire less often. EM (SQUAREM-accelerated, see ``_em``) stops when no
    entry moves by more than ``tol`` or after ``max_iter`` updates.
    """
    if method not in ESTIMATION_METHODS:
        raise ValueError(f"method must be one of {ESTIMATION_METHODS}, got {method!r}.")
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    if not (concentration >= 0 and math.isfinite(concentration)):
        raise ValueError(f"concentration must be a finite number >= 0, got {concentration}.")
    if method == "bbse" and confusion is None:
        raise ValueError("method='bbse' needs confusion, the held-out confusion_matrix(pred, labels, C).")
    if method != "bbse" and confusion is not None:
        raise ValueError("confusion is used by method='bbse' only; drop it or set method='bbse'.")
    if method == "bbse" and concentration > 0:
        raise ValueError("concentration applies to method='em' only.")
    _check_em_settings(tol, max_iter)
    raw = validate_logits(logits)
    num_classes = raw.shape[1]
    source = _positive_prior(source_prior, num_classes, "source_prior")
    null = _positive_prior(null_prior, num_classes, "null_prior")
    posteriors = torch.softmax(apply_calibration(raw, temperature, bias), dim=1)
    no_pseudo_counts = torch.zeros(num_classes, dtype=torch.float64)
    maximum_likelihood, converged = _em(posteriors, source, no_pseudo_counts, tol, max_iter,
                                        accelerate=True)
    statistic, p_value = likelihood_ratio_test(posteriors, maximum_likelihood, null, source)
    std_error = None
    if method == "em":
        pseudo_counts = concentration * null
        estimate = maximum_likelihood
        if concentration > 0:
            estimate, map_converged = _em(posteriors, source, pseudo_counts, tol, max_iter, accelerate=True)
            converged = converged and map_converged
        std_error = _standard_error(posteriors, source, estimate, pseudo_counts)
    else:
        if tuple(torch.as_tensor(confusion).shape) != (num_classes, num_classes):
            raise ValueError(f"confusion must have shape ({num_classes}, {num_classes}) for logits over "
                             f"{num_classes} classes, got {tuple(torch.as_tensor(confusion).shape)}.")
        predicted = torch.bincount(raw.argmax(dim=1), minlength=num_classes)
        estimate = bbse_prior(confusion, predicted)
    guard_fired = guard == "lrt" and p_value > alpha
    return PriorEstimate(prior=null.clone() if guard_fired else estimate, estimate=estimate,
                         std_error=std_error, statistic=statistic, p_value=p_value, guard_fired=guard_fired,
                         converged=converged, method=method)


# --------------------------------------------------------------------------- held-out statistics
# What a saved model needs to estimate a test prior without its training data: BCTS and temperature-scaling
# fits and the confusion matrix of its uniform-prior logits on held-out data, stored as config.calibration.

CALIBRATION_KEYS = ("temperature", "bias", "bias_std", "ts_temperature", "holdout_counts", "confusion")
# Models calibrated before bias_std was recorded lack it; it describes the fit and is not needed to use it.
OPTIONAL_CALIBRATION_KEYS = ("bias_std",)
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
    return {
        "temperature": temperature,
        "bias": bias.tolist(),
        "bias_std": bias_std,
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
                         f"priors.holdout_calibration), got {type(calibration).__name__}.")
    missing = [key for key in CALIBRATION_KEYS
               if key not in calibration and key not in OPTIONAL_CALIBRATION_KEYS]
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if missing or unknown:
        raise ValueError(f"calibration needs the keys {CALIBRATION_KEYS} (bias_std optional); missing "
                         f"{missing}, unknown {unknown}. Build it with priors.holdout_calibration(logits, "
                         "labels).")
    for key in ("temperature", "ts_temperature", "bias_std"):
        value = calibration.get(key)
        if not (_positive_finite(value) or (key == "bias_std" and value is None)):
            raise ValueError(f"calibration[{key!r}] must be a positive finite number, got {value!r}.")
    _check_class_values(calibration["bias"], num_classes, "calibration['bias']")
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


# --------------------------------------------------------------------------- unknown test priors
# The estimators a user picks by name (balpoe-evaluate --prior, model.adapt_to_unlabeled): which calibration
# of the uniform-prior logits they use and how they call estimate_prior.

@dataclass(frozen=True)
class UnknownPriorMethod:
    """How ``estimate_unknown_prior`` runs one named estimator.

    ``calibration``: what of ``config.calibration`` it uses: ``None`` (nothing: raw posteriors), ``"ts"``
    (temperature scaling), ``"bcts"`` or ``"confusion"`` (for ``method="bbse"``); ``method``, ``guard`` and
    ``alpha`` go to ``estimate_prior``. ``shrinkage`` ``rho`` sets its Dirichlet-MAP ``concentration`` to
    ``rho * N`` for ``N`` unlabelled images: the estimate is pulled towards the uniform prior as if ``rho``
    times as many images followed it. Relative to ``N`` because the error it guards against, that of the
    held-out calibration, does not shrink as ``N`` grows.
    """

    calibration: str | None
    method: str = "em"
    guard: str = "none"
    alpha: float = 0.05
    shrinkage: float = 0.0


CALIBRATIONS = (None, "ts", "bcts", "confusion")
UNKNOWN_PRIOR_METHODS: dict[str, UnknownPriorMethod] = {
    "em": UnknownPriorMethod(calibration=None),
    "em-ts": UnknownPriorMethod(calibration="ts"),
    "em-bcts": UnknownPriorMethod(calibration="bcts"),
    "bbse": UnknownPriorMethod(calibration="confusion", method="bbse"),
    "em-bcts-lrt": UnknownPriorMethod(calibration="bcts", guard="lrt", alpha=0.05),
    "em-bcts-map": UnknownPriorMethod(calibration="bcts", shrinkage=0.25),
    # The default: shrinkage 0.25 chosen on shifts simulated from the held-out split (README, label shift);
    # the likelihood-ratio guard adds the fallback to uniform for small unlabelled sets.
    "auto": UnknownPriorMethod(calibration="bcts", guard="lrt", alpha=0.05, shrinkage=0.25),
}


def estimate_unknown_prior(logits: torch.Tensor, calibration: dict[str, Any] | None = None,
                           method: str | UnknownPriorMethod = "auto") -> PriorEstimate:
    """The class prior of unlabelled data from a model's uniform-prior logits ``(N, C)`` on them.

    ``calibration`` is the model's ``config.calibration`` (``holdout_calibration``); ``method`` names an
    entry of ``UNKNOWN_PRIOR_METHODS``: ``em`` (EM on the raw posteriors, Saerens et al. 2002), ``em-ts``
    (after temperature scaling), ``em-bcts`` (after BCTS, Alexandari et al. 2020), ``bbse`` (Lipton et al.
    2018, from the held-out confusion matrix), ``em-bcts-lrt`` (``em-bcts`` that keeps the uniform prior
    when a likelihood-ratio test does not support a shift), ``em-bcts-map`` (``em-bcts`` shrunk towards
    uniform, see ``UnknownPriorMethod.shrinkage``) and ``auto``, the default: both guards (see the
    README's label-shift section for how it was chosen). Predictions for the estimate are the logits plus
    ``log(C * prior)``, which is ``model.set_target_prior(estimate.prior)``; the calibration is used to
    estimate only, so a uniform estimate leaves the predictions exactly as they were. An
    ``UnknownPriorMethod`` instead of a name runs other settings (e.g. another ``alpha``).
    """
    if isinstance(method, UnknownPriorMethod):
        settings = method
    elif method in UNKNOWN_PRIOR_METHODS:
        settings = UNKNOWN_PRIOR_METHODS[method]
    else:
        raise ValueError(f"unknown prior-estimation method {method!r}; choose one of "
                         f"{', '.join(UNKNOWN_PRIOR_METHODS)}.")
    if settings.calibration not in CALIBRATIONS:
        raise ValueError(f"UnknownPriorMethod.calibration must be one of {CALIBRATIONS}, got "
                         f"{settings.calibration!r}.")
    if not (settings.shrinkage >= 0 and math.isfinite(settings.shrinkage)):
        raise ValueError(f"UnknownPriorMethod.shrinkage must be a finite number >= 0, got "
                         f"{settings.shrinkage}.")
    options: dict[str, Any] = {"method": settings.method, "guard": settings.guard, "alpha": settings.alpha,
                               "concentration": settings.shrinkage * validate_logits(logits).shape[0]}
    if settings.calibration is not None:
        if calibration is None:
            raise ValueError(f"method {method!r} needs the model's held-out calibration, but its config has "
                             "none: train with holdout_fraction > 0 (balpoe-train --holdout-fraction 0.1), "
                             "or use method='em'.")
        validate_calibration(calibration, validate_logits(logits).shape[1])
        if settings.calibration == "ts":
            options["temperature"] = calibration["ts_temperature"]
        elif settings.calibration == "bcts":
            options.update(temperature=calibration["temperature"], bias=calibration["bias"])
        else:
            options["confusion"] = torch.as_tensor(calibration["confusion"], dtype=torch.float64)
    return estimate_prior(logits, **options)
