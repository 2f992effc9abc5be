"""How far to trust an estimated class prior: empirical-Bayes shrinkage of its logarithm towards uniform.

An estimate ``log pi_hat`` of the target's log prior (centred: only differences between classes matter to a
logit adjustment) is the truth plus an error of known covariance ``S``: the estimate's sampling error on the
images at hand (``prior_estimators.log_prior_covariance``) plus the error of the calibration it rests on
(``holdout_statistics.bias_covariance``, or an assumed one). With the truth drawn from ``N(0, tau^2 I)`` on
the centred subspace, the estimate is ``N(0, tau^2 I + S)``; ``tau^2``, the spread of the log prior that the
data support, is its maximum-likelihood value (empirical Bayes), and the posterior mean of the truth,

    tau^2 (tau^2 I + S)^-1 log pi_hat,

pulls every direction towards uniform by as much as its error is large against ``tau^2``. A balanced set
whose estimate differs from uniform by no more than its errors gets ``tau^2 = 0`` and the uniform prior; a
strong shift keeps almost all of its estimate. The posterior mean minimises the expected squared error of
the log prior, the quantity a logit adjustment adds to the logits.

This module is also shipped as remote code next to a saved model: it imports torch only.
"""

from __future__ import annotations

import torch

# Above this many classes the covariances are used through their diagonals: a (C, C) eigendecomposition and
# sandwich per estimate cost too much for ImageNet-LT's thousand classes in a deployment loop.
FULL_COVARIANCE_CLASSES = 256
# The spread tau^2 is searched on a log grid from 1e-6 to 1e2 (log-prior units squared), then refined.
_TAU2_GRID = torch.logspace(-6, 2, 161, dtype=torch.float64)


def centred_basis(num_classes: int) -> torch.Tensor:
    """An orthonormal basis ``(C, C - 1)`` of the vectors whose entries sum to zero."""
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return torch.linalg.eigh(centring).eigenvectors[:, 1:]  # eigenvalue 0 (the ones vector) comes first


def _best_spread(squares: torch.Tensor, variances: torch.Tensor) -> float:
    """The ``tau^2 >= 0`` that maximises ``-sum_k log(tau^2 + v_k) + y_k^2 / (tau^2 + v_k)`` (``squares``
    are ``y_k^2``), 0 included: a grid in ``log tau^2``, then a finer grid around its best point."""

    def log_likelihood(spreads: torch.Tensor) -> torch.Tensor:
        total = spreads[:, None] + variances[None, :]
        return -(total.log() + squares[None, :] / total).sum(dim=1)

    grid = _TAU2_GRID
    for _ in range(2):
        values = log_likelihood(grid)
        best = int(values.argmax())
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        grid = torch.logspace(float(low.log10()), float(high.log10()), 33, dtype=torch.float64)
    values = log_likelihood(grid)
    best = int(values.argmax())
    zero = float(log_likelihood(torch.zeros(1, dtype=torch.float64))[0])
    return float(grid[best]) if float(values[best]) > zero else 0.0


def shrink_log_prior(log_prior: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The posterior mean of a centred log prior given its estimate and the estimate's error covariance.

    ``log_prior`` ``(C,)`` is the estimate (centred here), ``covariance`` ``(C, C)`` its error's covariance.
    Returns the shrunk, centred log prior ``(C,)`` and ``tau^2``, the fitted spread of the true log prior
    (0: no shift beyond the errors, and the result is all zeros). Above ``FULL_COVARIANCE_CLASSES`` classes
    the classes are treated as independent, with the diagonal of ``covariance`` (or ``covariance`` itself,
    given as ``(C,)`` variances) as their variances.
    """
    estimate = log_prior.to(torch.float64) - log_prior.to(torch.float64).mean()
    num_classes = estimate.numel()
    floor = 1e-12  # a direction the errors leave exact keeps a tiny variance, so nothing divides by zero
    if num_classes > FULL_COVARIANCE_CLASSES:
        variances = (covariance if covariance.ndim == 1 else covariance.diagonal()).to(torch.float64)
        variances = variances.clamp_min(floor)
        spread = _best_spread(estimate.square(), variances)
        shrunk = spread / (spread + variances) * estimate
        return shrunk - shrunk.mean(), spread
    basis = centred_basis(num_classes)
    eigenvalues, eigenvectors = torch.linalg.eigh(basis.T @ covariance.to(torch.float64) @ basis)
    coordinates = eigenvectors.T @ (basis.T @ estimate)
    variances = eigenvalues.clamp_min(floor)
    spread = _best_spread(coordinates.square(), variances)
    return basis @ (eigenvectors @ (spread / (spread + variances) * coordinates)), spread
