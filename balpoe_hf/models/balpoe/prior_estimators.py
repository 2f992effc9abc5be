"""Estimators of an unknown class prior from a classifier's outputs on unlabelled data.

Under label shift ``p(x|y)`` is fixed and only the class prior moves. For posteriors ``p_ic = p_s(c|x_i)``
under a source prior ``pi_s``, unlabelled target images with weights ``w_i`` have the log-likelihood, up to
a constant in ``pi``,

    l(pi) = sum_i w_i log sum_c p_ic pi_c / pi_s,c,

which EM maximises (Saerens et al., 2002) and whose curvature gives the estimate's covariance. BBSE (Lipton
et al., ICML 2018) and RLLS (Azizzadenesheli et al., ICLR 2019) solve the confusion-matrix equation instead.
These are the building blocks of ``label_shift.estimate_prior``, which calibrates the posteriors and shrinks
the estimate (``shrinkage``).

This module is also shipped as remote code next to a saved model: it imports torch, ``.calibration`` and
``.priors`` only.
"""

from __future__ import annotations

import math

import torch

from .calibration import validate_labels
from .priors import PriorLike, as_vector, validate_prior

TINY = torch.finfo(torch.float64).tiny


def check_posteriors(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` ``(N, C)`` as float64 rows summing to one; a ``ValueError`` for anything else."""
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


def check_weights(weights: PriorLike | None, num_samples: int) -> torch.Tensor:
    """Image weights ``(N,)``: ones for ``None``; finite, non-negative, with a positive total otherwise."""
    if weights is None:
        return torch.ones(num_samples, dtype=torch.float64)
    tensor = as_vector(weights, "weights")
    if tensor.numel() != num_samples or (tensor < 0).any() or not tensor.sum() > 0:
        raise ValueError(f"weights must hold {num_samples} non-negative numbers (one per image) with a "
                         f"positive sum, got {tensor.numel()} numbers from {float(tensor.min()):g}.")
    return tensor


def positive_prior(prior: PriorLike | None, num_classes: int, name: str) -> torch.Tensor:
    """``prior`` validated and strictly positive, or uniform for ``None``."""
    if prior is None:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    tensor = validate_prior(prior, num_classes, name=name)
    zero = torch.nonzero(tensor == 0).flatten().tolist()
    if zero:
        raise ValueError(f"{name} is zero for classes {zero}, but the estimators divide by it or take its "
                         f"log there; give every class a positive probability in {name}.")
    return tensor


def effective_images(weights: torch.Tensor) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2``: the number of equally weighted images that carry
    as much information."""
    return float(weights.sum().square() / weights.square().sum())


def _em_step(posteriors: torch.Tensor, ratio_scale: torch.Tensor, weights: torch.Tensor,
             pseudo_counts: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """One EM update, MAP under a Dirichlet(1 + pseudo_counts) prior.

    With ``v = pi / pi_s`` the responsibilities are ``r_ic = p_ic v_c / s_i``, ``s_i = sum_c p_ic v_c``, and
    the update is ``pi_c = (sum_i w_i r_ic + a_c) / (sum_i w_i + sum_c a_c)``: two matrix-vector products,
    no ``(N, C)`` temporary.
    """
    ratio = prior * ratio_scale
    # A row whose mass sits only on classes with pi = 0 has s_i = 0 and r_i = 0; TINY avoids 0 / 0.
    mixture = (posteriors @ ratio).clamp_min(TINY)
    updated = ratio * (posteriors.T @ (weights / mixture)) + pseudo_counts
    return updated / updated.sum()


def _em_objective(posteriors: torch.Tensor, ratio_scale: torch.Tensor, weights: torch.Tensor,
                  pseudo_counts: torch.Tensor, prior: torch.Tensor) -> float:
    """``l(pi) + sum_c a_c log pi_c``, the quantity every EM step increases."""
    mixture = (posteriors @ (prior * ratio_scale)).clamp_min(TINY)
    return float(weights @ mixture.log()) + float(torch.special.xlogy(pseudo_counts, prior).sum())


def em_prior(posteriors: torch.Tensor, *, weights: torch.Tensor | None = None,
             pseudo_counts: float | torch.Tensor = 0.0, source_prior: PriorLike | None = None,
             tol: float = 1e-8, max_iter: int = 1000) -> tuple[torch.Tensor, bool]:
    """The target prior that maximises ``l(pi)`` (plus a Dirichlet log-density), by EM from uniform.

    ``posteriors`` ``(N, C)`` are calibrated ``p(y|x)`` under ``source_prior`` (``None``: uniform, what a
    BalPoE model's default logits give), ``weights`` ``(N,)`` the images' weights (``None``: ones) and
    ``pseudo_counts`` the Dirichlet prior's ``a_c`` (a number for every class, or ``(C,)``; 0 is maximum
    likelihood, which can drive a class to exactly 0). EM is slow when the posteriors overlap, so two plain
    updates are extrapolated with SQUAREM (Varadhan & Roland, Scand. J. Stat. 2008, scheme S3), kept only
    when the objective is no lower. Stops when no entry moves by more than ``tol``; returns the float64
    prior ``(C,)`` and whether that happened within ``max_iter`` updates.
    """
    posteriors = check_posteriors(posteriors)
    num_samples, num_classes = posteriors.shape
    weights = check_weights(weights, num_samples)
    if max_iter < 1 or not tol >= 0:
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}.")
    pseudo = torch.as_tensor(pseudo_counts, dtype=torch.float64).expand(num_classes).clone()
    if not (torch.isfinite(pseudo).all() and (pseudo >= 0).all()):
        raise ValueError(f"pseudo_counts must be finite and >= 0, got {pseudo_counts!r}.")
    scale = 1.0 / positive_prior(source_prior, num_classes, "source_prior")

    def step(prior: torch.Tensor) -> torch.Tensor:
        return _em_step(posteriors, scale, weights, pseudo, prior)

    def objective(prior: torch.Tensor) -> float:
        return _em_objective(posteriors, scale, weights, pseudo, prior)

    target = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    updates = 0
    while updates < max_iter:
        if updates + 3 <= max_iter:
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


def log_prior_covariance(posteriors: torch.Tensor, prior: torch.Tensor, *,
                         weights: torch.Tensor | None = None, pseudo_counts: float | torch.Tensor = 0.0,
                         source_prior: PriorLike | None = None) -> torch.Tensor:
    """Covariance ``(C, C)`` of ``log pi`` for the (weighted, MAP) EM estimate ``prior``: its sampling error.

    With ``q_ic = p_ic / pi_s,c`` and ``s_i = sum_c q_ic pi_c``, the score of image ``i`` is ``g_i = q_i /
    s_i``. On the simplex (basis ``B = [Id_{C-1}; -1^T]``) the estimate's covariance is the sandwich
    ``H^-1 M H^-1`` with ``H = B^T (sum_i w_i g_i g_i^T + diag(a / pi^2)) B`` (the observed information of
    the weighted log-likelihood and the Dirichlet prior) and ``M = B^T (sum_i w_i^2 g_i g_i^T) B`` (the
    variance of the weighted score): for unit weights and no prior it is the inverse observed information,
    and it stays right for the decaying weights of a stream. The delta method turns ``Cov(pi)`` into that of
    ``log pi``, ``diag(1 / pi) Cov(pi) diag(1 / pi)``. Classes the posteriors cannot tell apart make ``H``
    singular; the pseudo-inverse then leaves their difference with no variance, which only the calibration's
    covariance (``holdout_statistics.bias_covariance``) can supply.
    """
    posteriors = check_posteriors(posteriors)
    num_samples, num_classes = posteriors.shape
    weights = check_weights(weights, num_samples)
    pseudo = torch.as_tensor(pseudo_counts, dtype=torch.float64).expand(num_classes)
    scaled = posteriors / positive_prior(source_prior, num_classes, "source_prior")
    scores = scaled / (scaled @ prior).clamp_min(TINY)[:, None]  # g_i
    basis = torch.cat([torch.eye(num_classes - 1, dtype=torch.float64),
                       -torch.ones(1, num_classes - 1, dtype=torch.float64)])
    projected = scores @ basis  # (N, C - 1)
    curvature = torch.where(pseudo > 0, pseudo / prior.clamp_min(TINY).square(), torch.zeros_like(prior))
    hessian = (projected * weights[:, None]).T @ projected + basis.T @ (curvature[:, None] * basis)
    meat = (projected * weights.square()[:, None]).T @ projected
    inverse = torch.linalg.pinv(hessian, hermitian=True)
    covariance = basis @ inverse @ meat @ inverse @ basis.T
    inverse_prior = 1.0 / prior.clamp_min(TINY)
    return inverse_prior[:, None] * covariance * inverse_prior[None, :]


def confusion_matrix(predictions: torch.Tensor | list[int], labels: torch.Tensor | list[int],
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
    each class on the unlabelled target data (weighted counts are fine). Under label shift ``K_ij = P(yhat =
    j | y = i)`` is the same in both domains, so ``mu = K^T pi_t`` with ``mu`` the target prediction
    frequencies. Solves that system (least squares, minimum norm if ``K`` is singular) and projects the
    solution onto the simplex (``project_to_simplex``). This equals Lipton et al.'s ``w = C^{-1} mu``,
    ``pi_t = w * pi_s`` with ``C`` the joint confusion and ``pi_s`` the held-out label frequencies. Returns
    float64 ``(C,)``.
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
    pulled towards "no shift" by as much as the held-out confusion matrix is uncertain. The paper regularises
    towards the held-out (training) prior; this package's logits are for a uniform prior, so "no shift" is
    ``null_prior``. ``regularization=0`` is BBSE.

    The optimum lies on the ridge path ``theta(m) = (A^T A + m I)^{-1} A^T b`` (the stationarity condition of
    the two norms is a ridge equation with ``m = rho |A theta - b| / |theta|``), so it is found by a grid
    search over ``log m`` with one SVD of ``A``; the result is projected onto the simplex (the paper's
    ``theta >= -1``). Returns float64 ``(C,)``.
    """
    if not (regularization >= 0 and math.isfinite(regularization)):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization}.")
    conditional, frequencies, num_holdout = _confusion_system(confusion, target_prediction_counts)
    num_classes = conditional.shape[0]
    null = positive_prior(null_prior, num_classes, "null_prior")
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
