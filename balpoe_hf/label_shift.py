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

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import (
    apply_calibration,
    bcts_bias_covariance,
    fit_bcts,
    fit_temperature,
    validate_labels,
    validate_logits,
)
from .priors import PriorLike, as_vector, validate_prior

# --------------------------------------------------------------------------- label-shift estimation
# Under label shift p(x|y) is fixed and only the class prior moves. For posteriors p_ic = p_s(c|x_i) under
# a source prior pi_s, the unlabelled target data have log-likelihood, up to a constant in pi,
#     l(pi) = sum_i log sum_c p_ic pi_c / pi_s,c,
# which every estimator and test below uses.

ESTIMATION_METHODS = ("em", "bbse", "rlls")
CONFUSION_METHODS = ("bbse", "rlls")  # the estimators that read the held-out confusion matrix
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
        max_iter: int, accelerate: bool, start: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """EM for the target prior from uniform (or ``start``), with at most ``max_iter`` updates (``_em_step``).

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
    target = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64) if start is None else start
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
    preds = validate_labels(predictions, num_classes, name="predictions")
    targets = validate_labels(labels, num_classes, len(preds))
    flat = targets * num_classes + preds
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


def _confusion_system(confusion: torch.Tensor, target_prediction_counts: PriorLike
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``K`` (``P(yhat = j | y = i)``, rows labels), the target prediction frequencies ``mu`` and the number
    of held-out samples, from held-out confusion counts and target prediction counts, checked."""
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
        raise ValueError(f"classes {empty} have no held-out sample, so P(prediction | label) is "
                         "unknown for them; hold out samples of every class.")
    return counts / row_totals[:, None], predicted / predicted.sum(), round(float(counts.sum()))


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
    conditional, frequencies, _ = _confusion_system(confusion, target_prediction_counts)
    solution = torch.linalg.lstsq(conditional.T, frequencies[:, None], driver="gelsd").solution[:, 0]
    return project_to_simplex(solution)


# The confidence level delta of RLLS's regularisation constant Delta_C (Azizzadenesheli et al., 2019, Thm 1).
RLLS_DELTA = 0.05


def rlls_prior(confusion: torch.Tensor, target_prediction_counts: PriorLike, *, regularization: float = 1.0,
               null_prior: PriorLike | None = None) -> torch.Tensor:
    """Regularised learning under label shift (RLLS, Azizzadenesheli et al., ICLR 2019) of the target prior.

    BBSE's system ``mu = K^T pi_t`` (see ``bbse_prior``) with the target prior written as importance weights
    over ``null_prior`` (``None``: uniform, the prior of a BalPoE model's default logits),
    ``pi_t = null * (1 + theta)``, solved as

        theta = argmin |A theta - b|_2 + rho |theta|_2,   A = K^T diag(null),  b = mu - K^T null,

    with ``rho = regularization * Delta_C`` and ``Delta_C = 3 (2 log(2C / delta) / (3 n) + sqrt(2 log(2C /
    delta) / n))`` for ``n`` held-out samples (the paper's bound, ``delta = RLLS_DELTA``): the weights are
    pulled towards "no shift" by as much as the held-out confusion matrix is uncertain, which is what makes
    RLLS safer than BBSE on small held-out sets. The paper regularises towards the held-out (training) prior;
    this package's logits are for a uniform prior, so "no shift" is ``null_prior``. ``regularization=0`` is
    BBSE.

    The optimum lies on the ridge path ``theta(m) = (A^T A + m I)^{-1} A^T b`` (the stationarity condition of
    the two norms is a ridge equation with ``m = rho |A theta - b| / |theta|``), so it is found by a grid
    search over ``log m`` with one SVD of ``A``; the result is projected onto the simplex (the paper's
    ``theta >= -1``). Returns float64 ``(C,)``.
    """
    if not (regularization >= 0 and math.isfinite(regularization)):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
    conditional, frequencies, num_holdout = _confusion_system(confusion, target_prediction_counts)
    num_classes = conditional.shape[0]
    null = _positive_prior(null_prior, num_classes, "null_prior")
    log_term = math.log(2 * num_classes / RLLS_DELTA)
    rho = regularization * 3 * (2 * log_term / (3 * num_holdout) + math.sqrt(2 * log_term / num_holdout))
    design = conditional.T * null[None, :]
    target = frequencies - conditional.T @ null
    left, singular, right_t = torch.linalg.svd(design)
    keep = singular > singular[0] * 1e-12
    basis, singular, projected = right_t[keep].T, singular[keep], (left.T @ target)[keep]

    def path(log_ridges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``theta(m)`` ``(K, C)`` for ``m = exp(log_ridges)`` and the objective at each."""
        shrunk = singular / (singular.square() + log_ridges.exp()[:, None]) * projected  # (K, r)
        weights = shrunk @ basis.T
        residual = (design @ weights.T).T - target
        return weights, residual.norm(dim=1) + rho * weights.norm(dim=1)

    # Ridge from 1e-13 to 1e4 times |A|^2 on a log grid, then finer grids between the best point's neighbours.
    grid = 2 * singular[0].log() + torch.arange(-240, 81, dtype=torch.float64) / 8
    for _ in range(2):
        weights, values = path(grid)
        best = int(values.argmin())
        grid = torch.linspace(float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)]), 65,
                              dtype=torch.float64)
    weights, values = path(grid)
    best = int(values.argmin())
    weights = weights[best]
    if rho > 0 and float(target.norm()) <= float(values[best]):
        weights = torch.zeros_like(weights)  # theta = 0 (no shift) is the optimum
    return project_to_simplex(null * (1 + weights))


@dataclass(frozen=True)
class PriorEstimate:
    """The result of ``estimate_prior``; every tensor is float64 ``(C,)``.

    ``prior``: the prior to use, ``estimate`` or ``null_prior`` when the guard fired. ``estimate``: the
    estimator's answer before the guard. ``std_error``: its per-class standard error from the observed
    information (EM only, else ``None``). ``statistic`` and ``p_value``: the likelihood-ratio test of
    ``null_prior`` against the maximum-likelihood EM estimate (``likelihood_ratio_test``), reported whatever
    the guard. ``converged``: every EM run stopped by ``tol`` before ``max_iter``. ``method``: the estimator.
    ``details``: what the gain guard weighed (``gain_guard``), or why the estimate fell back to uniform.
    """

    prior: torch.Tensor
    estimate: torch.Tensor
    std_error: torch.Tensor | None
    statistic: float
    p_value: float
    guard_fired: bool
    converged: bool
    method: str
    details: dict[str, Any] | None = None

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
            "details": self.details,
        }


def estimate_prior(logits: torch.Tensor, *, method: str = "em", temperature: float = 1.0,
                   bias: PriorLike | None = None, source_prior: PriorLike | None = None,
                   confusion: torch.Tensor | None = None, concentration: float = 0.0,
                   null_prior: PriorLike | None = None, guard: str = "lrt", alpha: float = 0.05,
                   regularization: float = 1.0, tol: float = 1e-8, max_iter: int = 1000) -> PriorEstimate:
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
    ``method="rlls"``: ``rlls_prior`` from the same counts, regularised towards ``null_prior`` with
    ``regularization``.

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
    if method in CONFUSION_METHODS and confusion is None:
        raise ValueError(f"method={method!r} needs confusion, the held-out confusion_matrix(pred, labels, "
                         "C).")
    if method not in CONFUSION_METHODS and confusion is not None:
        raise ValueError("confusion is used by method='bbse' or 'rlls' only; drop it or set the method.")
    if method in CONFUSION_METHODS and concentration > 0:
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
        if method == "bbse":
            estimate = bbse_prior(confusion, predicted)
        else:
            estimate = rlls_prior(confusion, predicted, regularization=regularization, null_prior=null)
    guard_fired = guard == "lrt" and p_value > alpha
    return PriorEstimate(prior=null.clone() if guard_fired else estimate, estimate=estimate,
                         std_error=std_error, statistic=statistic, p_value=p_value, guard_fired=guard_fired,
                         converged=converged, method=method)


# --------------------------------------------------------------------------- held-out statistics
# What a saved model needs to estimate a test prior without its training data: BCTS and temperature-scaling
# fits and the confusion matrix of its uniform-prior logits on held-out data, stored as config.calibration.

CALIBRATION_KEYS = ("temperature", "bias", "bias_std", "bias_se", "bias_cov_factor", "ts_temperature",
                    "holdout_counts", "confusion")
# Models calibrated before bias_std, bias_se and bias_cov_factor were recorded lack them: bias_std describes
# the fit, and without the others the gain guard draws the biases from a normal approximation of the
# held-out counts alone (see _calibration_draw).
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
    eigenvalues) describe the uncertainty of the biases (``calibration.bcts_bias_covariance``) for the gain
    guard: ``F F^T`` plus a diagonal up to ``bias_se^2``. ``confusion`` counts ``argmax z`` against the
    labels (rows labels, for ``bbse_prior``) and ``holdout_counts`` are its row sums. Plain lists and
    numbers, ready for JSON. Raises a ``ValueError`` for a class without held-out sample.
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
                         f"priors.holdout_calibration), got {type(calibration).__name__}.")
    missing = [key for key in CALIBRATION_KEYS
               if key not in calibration and key not in OPTIONAL_CALIBRATION_KEYS]
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if missing or unknown:
        optional = ", ".join(OPTIONAL_CALIBRATION_KEYS)
        raise ValueError(f"calibration needs the keys {CALIBRATION_KEYS} ({optional} optional); missing "
                         f"{missing}, unknown {unknown}. Build it with "
                         "label_shift.holdout_calibration(logits, labels).")
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


# --------------------------------------------------------------------------- unknown test priors
# The estimators a user picks by name (balpoe-evaluate --prior, model.adapt_to_unlabeled): which calibration
# of the uniform-prior logits they use, how they call estimate_prior, and which guard they add.

CALIBRATIONS = (None, "ts", "bcts", "confusion")
UNKNOWN_PRIOR_GUARDS = ("none", "lrt", "gain")


@dataclass(frozen=True)
class UnknownPriorMethod:
    """How ``estimate_unknown_prior`` runs one estimator; saved as ``config.shift_estimator["settings"]``.

    ``calibration``: what of ``config.calibration`` it uses: ``None`` (nothing: raw posteriors), ``"ts"``
    (temperature scaling), ``"bcts"``, or ``"confusion"`` (for ``method="bbse"`` and ``"rlls"``). ``method``
    goes to ``estimate_prior``. ``shrinkage``: for EM, the Dirichlet-MAP ``concentration`` is ``shrinkage *
    N`` for ``N`` unlabelled images (the estimate is pulled towards uniform as if ``shrinkage`` times as many
    images followed it; relative to ``N`` because the error it guards against, that of the held-out
    calibration, does not shrink as ``N`` grows); for RLLS, its ``regularization``; BBSE takes none.
    ``guard``: ``"none"``; ``"lrt"``, the likelihood-ratio test at level ``alpha`` (``estimate_prior``);
    ``"gain"``, the gain guard (``gain_guard``) at ``gain_quantile``.
    """

    calibration: str | None
    method: str = "em"
    guard: str = "none"
    alpha: float = 0.05
    shrinkage: float = 0.0
    # The gain guard's level: 0.9 kept the uniform prior on shifts worth 7 points to a weak model whose
    # held-out calibration is uncertain; 0.75 lost nothing more on the models measured (docs/benchmarks.md).
    gain_quantile: float = 0.75

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"UnknownPriorMethod.calibration must be one of {CALIBRATIONS}, got "
                             f"{self.calibration!r}.")
        if self.method not in ESTIMATION_METHODS:
            raise ValueError(f"UnknownPriorMethod.method must be one of {ESTIMATION_METHODS}, got "
                             f"{self.method!r}.")
        if (self.method in CONFUSION_METHODS) != (self.calibration == "confusion"):
            raise ValueError(f"method {self.method!r} with calibration {self.calibration!r}: bbse and rlls "
                             "read the confusion matrix (calibration='confusion'), EM never does.")
        if self.guard not in UNKNOWN_PRIOR_GUARDS:
            raise ValueError(f"UnknownPriorMethod.guard must be one of {UNKNOWN_PRIOR_GUARDS}, got "
                             f"{self.guard!r}.")
        for name in ("alpha", "shrinkage", "gain_quantile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    value >= 0 and math.isfinite(value)):
                raise ValueError(f"UnknownPriorMethod.{name} must be a finite number >= 0, got {value!r}.")
        for name in ("alpha", "gain_quantile"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"UnknownPriorMethod.{name} must lie in (0, 1), got {getattr(self, name)}.")
        if self.method == "bbse" and self.shrinkage > 0:
            raise ValueError("BBSE takes no shrinkage; use method='rlls' for a regularised BBSE.")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: Any) -> UnknownPriorMethod:
        """The settings saved by ``to_dict``; a ``ValueError`` names a malformed mapping."""
        known = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or "calibration" not in values or set(values) - known:
            raise ValueError(f"shift estimator settings must be a mapping with 'calibration' and keys among "
                             f"{sorted(known)}, got {values!r}.")
        return cls(**values)


UNKNOWN_PRIOR_METHODS: dict[str, UnknownPriorMethod] = {
    "em": UnknownPriorMethod(calibration=None),
    "em-ts": UnknownPriorMethod(calibration="ts"),
    "em-bcts": UnknownPriorMethod(calibration="bcts"),
    "bbse": UnknownPriorMethod(calibration="confusion", method="bbse"),
    # RLLS with a tenth of the regularisation of its bound: the full bound keeps "no shift" for every shift of
    # the evaluation protocol on held-out splits of a thousand images.
    "rlls": UnknownPriorMethod(calibration="confusion", method="rlls", shrinkage=0.1),
    "em-bcts-lrt": UnknownPriorMethod(calibration="bcts", guard="lrt", alpha=0.05),
    "em-bcts-map": UnknownPriorMethod(calibration="bcts", shrinkage=0.25),
    "em-bcts-gain": UnknownPriorMethod(calibration="bcts", guard="gain"),
    "bbse-gain": UnknownPriorMethod(calibration="confusion", method="bbse", guard="gain"),
}
# What "auto" runs for a model without config.shift_estimator (saved before the per-model choice existed):
# EM on BCTS posteriors shrunk towards uniform, with the likelihood-ratio guard.
LEGACY_AUTO = UnknownPriorMethod(calibration="bcts", guard="lrt", alpha=0.05, shrinkage=0.25)
UNKNOWN_PRIOR_MODES = (*UNKNOWN_PRIOR_METHODS, "auto")
# Unlabelled sets with fewer images than classes cannot inform a prior over every class: the estimators
# return the uniform prior for them, saying so in PriorEstimate.details.
MIN_IMAGES_PER_CLASS = 1


def resolve_unknown_prior_method(method: str | UnknownPriorMethod,
                                 shift_estimator: dict[str, Any] | None = None
                                 ) -> tuple[str, UnknownPriorMethod]:
    """``(name, settings)`` of a prior mode: a name of ``UNKNOWN_PRIOR_METHODS``, ``"auto"`` or settings.

    ``"auto"`` runs the model's own choice, ``config.shift_estimator`` (``shift_selection``), named
    ``"auto (NAME)"``, or ``LEGACY_AUTO`` for a model saved without one.
    """
    if isinstance(method, UnknownPriorMethod):
        return "custom", method
    if method == "auto":
        if shift_estimator is None:
            return "auto", LEGACY_AUTO
        validate_shift_estimator(shift_estimator)
        return f"auto ({shift_estimator['name']})", UnknownPriorMethod.from_dict(shift_estimator["settings"])
    if method in UNKNOWN_PRIOR_METHODS:
        return method, UNKNOWN_PRIOR_METHODS[method]
    raise ValueError(f"unknown prior-estimation method {method!r}; choose one of "
                     f"{', '.join(UNKNOWN_PRIOR_MODES)}.")


def validate_shift_estimator(shift_estimator: Any) -> None:
    """Check a ``config.shift_estimator`` mapping: ``name`` and ``settings`` (``UnknownPriorMethod``), plus
    whatever the choice recorded about itself (``shift_selection.choose_shift_estimator``)."""
    if not isinstance(shift_estimator, dict) or not isinstance(shift_estimator.get("name"), str) or (
            "settings" not in shift_estimator):
        raise ValueError(f"shift_estimator must be a mapping with a 'name' and 'settings' (see "
                         f"shift_selection.choose_shift_estimator), got {shift_estimator!r}.")
    UnknownPriorMethod.from_dict(shift_estimator["settings"])


def _point_estimate(logits: torch.Tensor, calibration: dict[str, Any] | None, settings: UnknownPriorMethod,
                    name: str) -> PriorEstimate:
    """``estimate_prior`` with the settings' calibration, shrinkage and likelihood-ratio guard."""
    options: dict[str, Any] = {"method": settings.method, "alpha": settings.alpha,
                               "guard": "lrt" if settings.guard == "lrt" else "none"}
    if settings.method == "em":
        options["concentration"] = settings.shrinkage * logits.shape[0]
    elif settings.method == "rlls":
        options["regularization"] = settings.shrinkage
    if settings.calibration == "ts":
        options["temperature"] = calibration["ts_temperature"]
    elif settings.calibration == "bcts":
        options.update(temperature=calibration["temperature"], bias=calibration["bias"])
    elif settings.calibration == "confusion":
        options["confusion"] = torch.as_tensor(calibration["confusion"], dtype=torch.float64)
    return dataclasses.replace(estimate_prior(logits, **options), method=name)


def estimate_unknown_prior(logits: torch.Tensor, calibration: dict[str, Any] | None = None,
                           method: str | UnknownPriorMethod = "auto",
                           shift_estimator: dict[str, Any] | None = None) -> PriorEstimate:
    """The class prior of unlabelled data from a model's uniform-prior logits ``(N, C)`` on them.

    ``calibration`` is the model's ``config.calibration`` (``holdout_calibration``) and ``shift_estimator``
    its ``config.shift_estimator``. ``method`` names a prior mode: ``auto`` (the default), the estimator
    chosen for this model on its held-out split (``shift_selection``; today's fixed ``LEGACY_AUTO`` for a
    model saved without a choice), or an entry of ``UNKNOWN_PRIOR_METHODS``: ``em`` (EM on the raw
    posteriors, Saerens et al. 2002), ``em-ts`` (after temperature scaling), ``em-bcts`` (after BCTS,
    Alexandari et al. 2020), ``bbse`` (Lipton et al. 2018) and ``rlls`` (Azizzadenesheli et al. 2019) from
    the held-out confusion matrix, ``em-bcts-lrt`` (the likelihood-ratio guard), ``em-bcts-map`` (shrunk
    towards uniform) and the gain-guarded ``em-bcts-gain`` and ``bbse-gain``. An ``UnknownPriorMethod``
    runs other settings.

    Predictions for the estimate are the logits plus ``log(C * prior)``, which is
    ``model.set_target_prior(estimate.prior)``; the calibration is used to estimate only, so a uniform
    estimate leaves the predictions exactly as they were. With fewer unlabelled images than classes
    (``MIN_IMAGES_PER_CLASS``), the estimate is the uniform prior, with a warning and the reason in
    ``details``.
    """
    name, settings = resolve_unknown_prior_method(method, shift_estimator)
    scores = validate_logits(logits)
    num_samples, num_classes = scores.shape
    if settings.calibration is not None:
        if calibration is None:
            raise ValueError(f"method {name!r} needs the model's held-out calibration, but its config has "
                             "none: train with holdout_fraction > 0 (balpoe-train --holdout-fraction 0.1), "
                             "or use method='em'.")
        validate_calibration(calibration, num_classes)
    if num_samples < MIN_IMAGES_PER_CLASS * num_classes:
        reason = (f"{num_samples} unlabelled images for {num_classes} classes: too few to estimate a prior "
                  "over every class, so the prior stays uniform; adapt on a larger set.")
        warnings.warn(reason, stacklevel=2)
        uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        return PriorEstimate(prior=uniform, estimate=uniform.clone(), std_error=None, statistic=0.0,
                             p_value=1.0, guard_fired=True, converged=True, method=name,
                             details={"reason": reason})
    estimate = _point_estimate(scores, calibration, settings, name)
    if settings.guard == "gain":
        estimate = gain_guard(scores, calibration, settings, estimate)
    return estimate


# --------------------------------------------------------------------------- the gain guard
# An estimate is worth using when the accuracy it gains is larger than what noise alone would claim.
# Miscalibration left over from a small held-out split looks like a shift to every estimator, and a
# likelihood-ratio test cannot tell the two apart once thousands of images make any "shift" significant. The
# guard compares the gain an estimate claims with the gains claimed on bootstrap draws where there is no shift
# (the images re-weighted to the uniform prior), the held-out calibration redrawn from its uncertainty, so
# that such a "shift" shows up as noise, and so does a mild shift whose gain is smaller than the noise.

GAIN_DRAWS = 32
GAIN_EM_TOL = 1e-4  # a bootstrap draw needs the prior to a hundredth of a percent, not more
GAIN_EM_MAX_ITER = 500
GAIN_CHUNK_ELEMENTS = 2**23
# Shrinkage steps the guard weighs: predictions with (1 - s) * estimate + s * uniform.
GAIN_SHRINK_STEPS = (0.0, 0.25, 0.5, 0.75)


def _calibration_draw(calibration: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """``calibration`` with the BCTS biases and the confusion matrix redrawn from their uncertainty.

    Biases: ``b + F e + d * e'`` with ``e, e'`` standard normal, ``F = bias_cov_factor`` and ``d`` the rest
    of ``bias_se`` (``sqrt(se^2 - rowsum(F^2))``); for a calibration saved without them, ``b + e' /
    sqrt(held-out count)``, the normal approximation of a log-frequency. Confusion rows: a Bayesian bootstrap,
    ``Dirichlet(counts)`` over the predictions seen, times the row's held-out count.
    """
    counts = torch.as_tensor(calibration["holdout_counts"], dtype=torch.float64)
    bias = torch.as_tensor(calibration["bias"], dtype=torch.float64)
    if calibration.get("bias_cov_factor") is not None:
        factor = torch.as_tensor(calibration["bias_cov_factor"], dtype=torch.float64)
        residual = (torch.as_tensor(calibration["bias_se"], dtype=torch.float64).square()
                    - factor.square().sum(dim=1)).clamp_min(0).sqrt()
        bias = bias + factor @ torch.randn(factor.shape[1], generator=generator, dtype=torch.float64)
    else:
        residual = counts.rsqrt()
    noise = residual * torch.randn(bias.shape, generator=generator, dtype=torch.float64)
    confusion = torch.as_tensor(calibration["confusion"], dtype=torch.float64)
    seen = confusion > 0
    gamma = torch._standard_gamma(torch.where(seen, confusion, torch.ones_like(confusion)),
                                  generator=generator) * seen
    return {**calibration, "bias": (bias + noise).tolist(),
            "confusion": gamma / gamma.sum(dim=1, keepdim=True) * counts[:, None]}


def _batched_em(posteriors: torch.Tensor, start: torch.Tensor, pseudo_counts: torch.Tensor
                ) -> torch.Tensor:
    """EM (``_em_step`` under a uniform source prior) on a batch of draws ``(D, N, C)`` at once, from
    ``start`` ``(C,)``, until no entry of any draw moves by more than ``GAIN_EM_TOL`` (at most
    ``GAIN_EM_MAX_ITER`` updates). Returns ``(D, C)``."""
    num_classes = posteriors.shape[2]
    prior = start.expand(posteriors.shape[0], num_classes).clone()
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(GAIN_EM_MAX_ITER):
        ratio = prior * num_classes
        mixture = torch.bmm(posteriors, ratio[:, :, None]).clamp_min(tiny)  # (D, N, 1)
        updated = ratio * torch.bmm(posteriors.transpose(1, 2), mixture.reciprocal())[:, :, 0] + pseudo_counts
        updated = updated / updated.sum(dim=1, keepdim=True)
        converged = bool((updated - prior).abs().max() <= GAIN_EM_TOL)
        prior = updated
        if converged:
            break
    return prior


def _redrawn_estimates(logits: torch.Tensor, rows: torch.Tensor, calibrations: list[dict[str, Any] | None],
                       settings: UnknownPriorMethod, start: torch.Tensor) -> torch.Tensor:
    """The estimator of ``settings`` on bootstrap draws (``rows`` ``(D, N)`` of ``logits``, each with its own
    redrawn calibration), without the tests ``estimate_prior`` reports; EM runs on every draw at once, from
    the full-data estimate ``start`` (a draw lands near it). Returns ``(D, C)``."""
    num_classes = logits.shape[1]
    if settings.method in CONFUSION_METHODS:
        estimates = []
        for draw, calibration in zip(rows, calibrations, strict=True):
            predicted = torch.bincount(logits[draw].argmax(dim=1), minlength=num_classes)
            confusion = calibration["confusion"]
            estimates.append(bbse_prior(confusion, predicted) if settings.method == "bbse" else
                             rlls_prior(confusion, predicted, regularization=settings.shrinkage))
        return torch.stack(estimates)
    scores = logits[rows]  # (D, N, C)
    if settings.calibration == "ts":
        scores = scores / calibrations[0]["ts_temperature"]
    elif settings.calibration == "bcts":
        scores = scores / calibrations[0]["temperature"] + torch.tensor(
            [calibration["bias"] for calibration in calibrations], dtype=torch.float64)[:, None, :]
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    pseudo_counts = settings.shrinkage * logits.shape[0] * uniform
    # EM cannot leave a zero entry: start from a prior with every class.
    return _batched_em(torch.softmax(scores, dim=2), (start + 1e-3 * uniform) / (1 + 1e-3), pseudo_counts)


def _posteriors(logits: torch.Tensor, calibration: dict[str, Any] | None, prior: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrated posteriors ``(..., N, C)`` under ``prior`` ``(..., C)``: ``softmax(z / T + b + log prior)``
    (BCTS, with ``bias`` ``(..., C)`` in place of the calibration's), or ``softmax(z + log prior)`` without a
    calibration."""
    floor = torch.finfo(torch.float64).tiny
    scores = logits
    if calibration is not None:
        scores = logits / calibration["temperature"] + (
            torch.as_tensor(calibration["bias"], dtype=torch.float64) if bias is None else bias[..., None, :])
    return torch.softmax(scores + prior.clamp_min(floor).log()[..., None, :], dim=-1)


def _claimed_gains(logits: torch.Tensor, posteriors: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """The accuracy gain over the uniform prior that predicting with each shrinkage step of ``priors``
    ``(..., C)`` has if ``posteriors`` ``(..., N, C)`` are right: ``mean_i p(argmax(z_i + log q_s) | x_i) -
    p(argmax z_i | x_i)``, ``(..., S)``."""
    floor = torch.finfo(torch.float64).tiny
    uniform = torch.full_like(priors, 1.0 / priors.shape[-1])
    baseline = posteriors.gather(-1, logits.argmax(dim=-1, keepdim=True)).squeeze(-1)  # (..., N)
    gains = []
    for step in GAIN_SHRINK_STEPS:
        shrunk = ((1 - step) * priors + step * uniform).clamp_min(floor).log()
        predicted = (logits + shrunk[..., None, :]).argmax(dim=-1, keepdim=True)
        gains.append((posteriors.gather(-1, predicted).squeeze(-1) - baseline).mean(dim=-1))
    return torch.stack(gains, dim=-1)


def gain_guard(logits: torch.Tensor, calibration: dict[str, Any] | None, settings: UnknownPriorMethod,
               estimate: PriorEstimate, *, draws: int = GAIN_DRAWS, seed: int = 0) -> PriorEstimate:
    """Keep ``estimate.estimate``, shrink it towards uniform, or fall back to uniform, by its expected gain.

    For ``q_s = (1 - s) * estimate + s * uniform`` (``s`` in ``GAIN_SHRINK_STEPS``) the estimate claims an
    accuracy gain over the uniform prior on these images, ``mean_i p(yhat_s,i | x_i) - p(yhat_u,i | x_i)``
    with ``yhat_s = argmax(z + log q_s)`` and ``p`` the calibrated posteriors (BCTS when the model has a
    calibration, else softmax) under the estimate. Noise claims gains too: each of ``draws`` bootstrap draws
    resamples the images re-weighted to the uniform prior (weights ``sum_c p(c | x) / (C * estimate_c)``,
    which undo the estimated shift), redraws the held-out calibration from its uncertainty
    (``_calibration_draw``), estimates the prior again with the same estimator and records the gain that
    estimate claims. The guard keeps the ``q_s`` whose claimed gain exceeds the ``gain_quantile`` quantile of
    the no-shift claims by the most, and the uniform prior when none exceeds it (``guard_fired``). Seeded by
    ``seed``: the same images give the same answer. ``details`` records the claims per step.
    """
    num_samples, num_classes = logits.shape
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    posteriors = _posteriors(logits, calibration, estimate.estimate)
    claimed = _claimed_gains(logits, posteriors, estimate.estimate)  # (S,)
    # Importance weights from the estimated prior to the uniform one: a draw has (about) no shift.
    floor = torch.finfo(torch.float64).tiny
    weights = posteriors @ (uniform / estimate.estimate.clamp_min(floor))
    null_claims = []
    # Draws in chunks of about GAIN_CHUNK_ELEMENTS posteriors, so that memory stays flat for many classes.
    chunk = max(1, GAIN_CHUNK_ELEMENTS // (num_samples * num_classes))
    for first in range(0, draws, chunk):
        size = min(chunk, draws - first)
        rows = torch.multinomial(weights.expand(size, num_samples), num_samples, replacement=True,
                                 generator=generator)  # (D, N)
        drawn = [None if calibration is None else _calibration_draw(calibration, generator)
                 for _ in range(size)]
        priors = _redrawn_estimates(logits, rows, drawn, settings, uniform)  # (D, C)
        bias = None if calibration is None else torch.tensor([d["bias"] for d in drawn], dtype=torch.float64)
        null_claims.append(_claimed_gains(logits[rows], _posteriors(logits[rows], calibration, priors, bias),
                                          priors))
    noise = torch.quantile(torch.cat(null_claims), settings.gain_quantile, dim=0)  # (S,)
    margin = claimed - noise
    best = int(margin.argmax())
    fired = not float(margin[best]) > 0
    step = GAIN_SHRINK_STEPS[best]
    details = {"shrink_steps": list(GAIN_SHRINK_STEPS), "claimed_gain": claimed.tolist(),
               "no_shift_quantile": noise.tolist(), "draws": draws, "shrink": None if fired else step}
    prior = uniform if fired else (1 - step) * estimate.estimate + step * uniform
    return dataclasses.replace(estimate, prior=prior, guard_fired=fired, details=details)
