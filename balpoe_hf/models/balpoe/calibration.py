"""Post-hoc calibration of logits on held-out labelled data: temperature scaling and BCTS.

Temperature scaling (Guo et al., ICML 2017) fits one ``T > 0`` so that ``softmax(z / T)`` minimises the
negative log-likelihood (NLL) of held-out labels. Bias-corrected temperature scaling (BCTS, Alexandari et
al., ICML 2020, "Maximum likelihood with bias-corrected calibration is hard-to-beat at label shift
adaptation") adds one bias per class, ``softmax(z / T + b)``, which corrects the class-by-class
miscalibration that makes EM prior estimation drift.

Held-out data must follow the prior the calibrated probabilities are meant for. A BalPoE model's default
logits are adjusted to a *uniform* prior while held-out data follow the *training* prior ``pi_train``; pass
``offset=log(pi_train)`` so the fit is ``softmax(z / T + b + log pi_train)`` and the returned ``(T, b)``
calibrate the uniform-prior logits themselves (``z / T + b``; ``T`` then scales the learned part only).

This module is also shipped as remote code next to a saved model: it imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# LBFGS stops when every gradient entry of the mean NLL is below this; the fit is then checked against
# CONVERGED_GRADIENT (looser, so that round-off at the optimum does not raise).
LBFGS_TOLERANCE_GRAD = 1e-10
CONVERGED_GRADIENT = 1e-5


def validate_logits(logits: torch.Tensor, name: str = "logits") -> torch.Tensor:
    """Check that ``logits`` is a finite floating-point ``(N, C)`` array with ``N >= 1``, ``C >= 2``.

    Returns a float64 CPU copy; a ``TypeError`` or ``ValueError`` names the problem otherwise.
    """
    tensor = torch.as_tensor(logits).detach().cpu()
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}.")
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] < 2:
        raise ValueError(f"{name} must have shape (num_samples, num_classes) with num_samples > 0 and "
                         f"num_classes >= 2, got {tuple(tensor.shape)}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contain NaN or infinite values; drop those rows or fix the model output.")
    return tensor.to(torch.float64)


def validate_labels(labels: torch.Tensor | Sequence[int], num_classes: int, num_samples: int | None = None,
                    name: str = "labels") -> torch.Tensor:
    """Check class indices ``(N,)`` in ``[0, num_classes)``, ``N = num_samples`` when given (one per row of
    the scores they go with); return them as an ``int64`` CPU tensor.

    The one label check of the package (calibration, metrics, label-shift estimation): a ``TypeError`` for
    values that are not integers, a ``ValueError`` naming the shape or the range otherwise.
    """
    tensor = torch.as_tensor(labels).detach().cpu()
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, got dtype {tensor.dtype}.")
    if tensor.ndim != 1 or (num_samples is not None and tensor.numel() != num_samples):
        expected = "(num_samples,)" if num_samples is None else f"({num_samples},), one per sample"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}.")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, got values "
                         f"from {int(tensor.min())} to {int(tensor.max())}.")
    return tensor.long()


def _check_class_vector(values: torch.Tensor | Sequence[float], num_classes: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if tensor.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), one value per class, "
                         f"got {tuple(tensor.shape)}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return tensor


def _fit(logits: torch.Tensor, labels: torch.Tensor | Sequence[int],
         offset: torch.Tensor | Sequence[float] | None, with_bias: bool, bias_std: float | None,
         max_iter: int) -> tuple[float, torch.Tensor]:
    """Minimise ``mean NLL(softmax(z * exp(-s) + b + offset))`` over ``s = log T`` (and ``b``) with LBFGS."""
    z = validate_logits(logits)
    num_samples, num_classes = z.shape
    y = validate_labels(labels, num_classes, num_samples)
    shift = torch.zeros(num_classes, dtype=torch.float64) if offset is None else (
        _check_class_vector(offset, num_classes, "offset"))
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
    if bias_std is not None and not bias_std > 0:
        raise ValueError(f"bias_std must be a positive number or None, got {bias_std}.")
    if with_bias and bias_std is None:
        empty = torch.nonzero(torch.bincount(y, minlength=num_classes) == 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"classes {empty} have no held-out sample, so their BCTS bias has no maximum-likelihood "
                "value (the NLL falls as the bias goes to -inf). Pass bias_std (a Gaussian prior on the "
                "biases, e.g. 1.0) or hold out samples of every class.")
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=with_bias)
    params = [log_temperature, bias] if with_bias else [log_temperature]

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(z * torch.exp(-log_temperature) + bias + shift, y)
        if with_bias and bias_std is not None:
            # A N(0, bias_std^2) prior on each bias, scaled by 1/N like the mean NLL (MAP estimate).
            loss = loss + 0.5 * bias.square().sum() / (bias_std**2 * num_samples)
        return loss

    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=LBFGS_TOLERANCE_GRAD,
                                  tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    gradients = torch.autograd.grad(objective(), params)
    largest = max(float(g.abs().max()) for g in gradients)
    temperature = float(torch.exp(log_temperature.detach()))
    if not (largest <= CONVERGED_GRADIENT and 0 < temperature < float("inf")):
        raise RuntimeError(
            f"calibration did not converge in {max_iter} LBFGS iterations (largest gradient {largest:.2e}, "
            f"temperature {temperature:.3g}); raise max_iter, or check that the logits predict the labels.")
    # Adding a constant to every bias leaves softmax unchanged; report the representative with mean 0
    # (the Gaussian prior's optimum already has it).
    fitted_bias = bias.detach() - bias.detach().mean()
    return temperature, fitted_bias


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor | Sequence[int], *,
                    offset: torch.Tensor | Sequence[float] | None = None, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al., ICML 2017): ``T = argmin_T -sum_i log softmax(z_i / T + o)[y_i]``.

    ``logits`` ``(N, C)`` and integer ``labels`` ``(N,)`` are held-out data; ``offset`` ``o`` ``(C,)`` is a
    fixed per-class term added after scaling (``log pi_train`` for uniform-prior logits, see the module
    docstring; default 0). Fitted in float64 with LBFGS (strong Wolfe line search) over ``log T``, so ``T``
    stays positive. Returns ``T`` as a float.
    """
    temperature, _ = _fit(logits, labels, offset, with_bias=False, bias_std=None, max_iter=max_iter)
    return temperature


def fit_bcts(logits: torch.Tensor, labels: torch.Tensor | Sequence[int], *,
             offset: torch.Tensor | Sequence[float] | None = None, bias_std: float | None = None,
             max_iter: int = 200) -> tuple[float, torch.Tensor]:
    """Bias-corrected temperature scaling (Alexandari et al., ICML 2020).

    Fits ``(T, b)`` minimising ``-sum_i log softmax(z_i / T + b + o)[y_i] + |b|^2 / (2 bias_std^2)`` on
    held-out ``logits`` ``(N, C)`` and integer ``labels`` ``(N,)``, with ``o`` the fixed ``offset`` ``(C,)``
    (``log pi_train`` for uniform-prior logits, see the module docstring; default 0). Float64, LBFGS with a
    strong Wolfe line search over ``(log T, b)``.

    ``bias_std=None`` is the plain maximum-likelihood fit of the paper; it then needs every class in the
    held-out labels, since a class with no sample has no finite maximum-likelihood bias (its NLL keeps
    falling as ``b_c -> -inf``, which would zero that class's prior downstream) and a ``ValueError`` says so.
    A positive ``bias_std`` puts a ``N(0, bias_std^2)`` prior on each bias (MAP fit): every bias is then
    finite, and biases of classes with few held-out samples shrink towards 0 (temperature scaling only).

    Returns ``(T, b)``: a float and a float64 tensor ``(C,)`` with mean 0 (a constant added to every bias
    does not change softmax). Calibrated logits are ``apply_calibration(z, T, b) = z / T + b``.
    """
    return _fit(logits, labels, offset, with_bias=True, bias_std=bias_std, max_iter=max_iter)


def bcts_bias_covariance(logits: torch.Tensor, temperature: float, bias: torch.Tensor | Sequence[float], *,
                         offset: torch.Tensor | Sequence[float] | None = None,
                         bias_std: float | None = None) -> torch.Tensor:
    """Covariance ``(C, C)`` of BCTS biases fitted by ``fit_bcts`` on ``logits`` (Laplace approximation).

    Minus the Hessian of the summed log-likelihood in ``b`` is ``sum_i diag(p_i) - p_i p_i^T`` with
    ``p_i = softmax(z_i / T + b + o)``, plus ``I / bias_std^2`` for the Gaussian prior. The biases are
    reported with mean 0, so the covariance is that of the centred biases, ``P H^+ P`` with ``P = I - 11^T /
    C`` (``H^+`` the pseudo-inverse: without a prior, adding a constant to every bias changes nothing). The
    temperature is held at its fitted value. A class with a handful of held-out images gets a large
    variance; the biases of classes the model confuses are strongly correlated (their difference is known
    better than either), which is why ``auto`` shrinks an estimate by the full covariance
    (``label_shift``, ``holdout_statistics.bias_covariance``).
    """
    z = validate_logits(logits)
    num_classes = z.shape[1]
    shift = torch.zeros(num_classes, dtype=torch.float64) if offset is None else (
        _check_class_vector(offset, num_classes, "offset"))
    probs = torch.softmax(apply_calibration(z, temperature, bias) + shift, dim=1)
    information = torch.diag(probs.sum(dim=0)) - probs.T @ probs
    if bias_std is not None:
        information = information + torch.eye(num_classes, dtype=torch.float64) / bias_std**2
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return centring @ torch.linalg.pinv(information, hermitian=True) @ centring


def apply_calibration(logits: torch.Tensor, temperature: float,
                      bias: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Calibrated logits ``z / T + b`` for ``logits`` ``(..., C)``, in the dtype and device of ``logits``.

    ``bias=None`` is temperature scaling alone. Raises a ``ValueError`` for a temperature that is not a
    positive finite number or a bias that is not one finite value per class.
    """
    if not (isinstance(temperature, int | float) or torch.is_tensor(temperature)) or not (
            0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension (..., num_classes), got a scalar.")
    calibrated = logits / float(temperature)
    if bias is not None:
        calibrated = calibrated + _check_class_vector(bias, logits.shape[-1], "bias").to(logits)
    return calibrated
