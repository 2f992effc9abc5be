"""Label-shifted evaluation: shifted test sets as selections of the balanced set's cached logits, and every
prior mode on them, on the full sets, on small deployment batches and on streams of batches.

Prior modes: ``none`` (uniform target prior), ``oracle`` (the shifted set's true label distribution), and
the estimators of ``label_shift.PRIOR_ESTIMATORS``, which estimate that distribution from the model's
logits on the unlabelled shifted set (``label_shift.estimate_prior``, as ``model.adapt_to_unlabeled``
does): ``auto`` (the default), ``em``, ``em-bcts``, ``bbse`` and ``rlls``. ``em-bcts``, ``bbse`` and
``rlls`` need the held-out calibration that a run trained with ``holdout_fraction > 0`` saves in
``config.calibration``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from ..data.splits import ALL_SHIFTS, make_shifted_test, split_shift
from ..errors import EvaluationError
from ..metrics import long_tail_report
from ..models.balpoe.label_shift import (
    NEEDS_CALIBRATION,
    PRIOR_ESTIMATORS,
    PriorEstimate,
    PriorStream,
    describe_auto,
    estimate_prior,
    resolve_estimator,
)
from ..models.balpoe.priors import adjust_logits

PRIOR_MODES = ("none", "oracle", *PRIOR_ESTIMATORS)


def parse_shifts(shifts: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma list like ``"forward50,uniform,backward10"`` or a list of names -> shift names."""
    if isinstance(shifts, str):
        if shifts.strip() == "all":
            return list(ALL_SHIFTS)
        shifts = shifts.split(",")
    names = [name.strip() for name in shifts if name.strip()]
    bad = []
    for name in names:
        try:
            split_shift(name)
        except ValueError:
            bad.append(name)
    if bad or not names:
        raise EvaluationError(f"unknown shifts {bad or shifts!r}; use 'all' or names like forward50, "
                              "uniform, backward10 (forward/backward followed by an imbalance ratio >= 1).")
    return names


def parse_priors(priors: str | Sequence[str], calibration: dict[str, Any] | None = None) -> list[str]:
    """A comma list (or a list) of prior modes out of ``PRIOR_MODES``; ``"all"`` is every one of them that a
    model with this ``config.calibration`` can run (``NEEDS_CALIBRATION`` left out without one)."""
    if isinstance(priors, str) and priors.strip() == "all":
        return [mode for mode in PRIOR_MODES if calibration is not None or mode not in NEEDS_CALIBRATION]
    if isinstance(priors, str):
        priors = priors.split(",")
    modes = [mode.strip() for mode in priors if mode.strip()]
    bad = [mode for mode in modes if mode not in PRIOR_MODES]
    if bad or not modes:
        raise EvaluationError(f"unknown prior modes {bad or priors!r}; choose from {', '.join(PRIOR_MODES)}.")
    return modes


def check_shifts(labels: np.ndarray, train_counts: list[int], shifts: list[str], seed: int = 0) -> None:
    """Build every shifted test set from the labels alone, so that a test set too small for a shift is
    refused before the inference (``shifted_rows`` reads no image)."""
    for shift in shifts:
        shifted_rows(labels, train_counts, shift, seed)


def shifted_rows(labels: np.ndarray, train_counts: list[int], shift: str, seed: int = 0) -> np.ndarray:
    """Row indices of the balanced test set that make up one shifted test set."""
    kind, ratio = split_shift(shift)
    # make_shifted_test reads only the label column: give it the labels and a row number, no images.
    table = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    try:
        shifted = make_shifted_test(table, train_counts, kind, ratio, label_column="label", seed=seed)
    except ValueError as error:
        raise EvaluationError(f"cannot build the {shift} test set: {error}") from None
    return np.asarray(shifted["row"], dtype=np.int64)


def with_target_prior(uniform_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C)`` for target prior ``pi_t`` from logits with a uniform target: ``+ log(C * pi_t)``."""
    # A class the prior gives exactly zero (EM can drive one there) would get -inf and an infinite NLL;
    # the smallest positive float keeps it finite.
    floor = torch.finfo(torch.float64).tiny
    # The logits are already adjusted to a uniform target, so no training-prior term is left to remove.
    return adjust_logits(uniform_logits.double(), torch.zeros(()), 0.0, prior.double().clamp_min(floor))


def _estimate_summary(estimate: PriorEstimate, true_prior: torch.Tensor) -> dict[str, Any]:
    return {
        "prior": estimate.prior.tolist(),
        # Total variation distance between the prior the predictions used and the truth. For auto that prior
        # is the shrunk estimate scaled by the calibration's temperature (an adjustment, not an estimate, when
        # the temperature is not 1): "estimate_error" is the estimator's own, before shrinkage and scaling.
        "error": float(0.5 * (estimate.prior - true_prior).abs().sum()),
        "estimate": estimate.estimate.tolist(),
        "estimate_error": float(0.5 * (estimate.estimate - true_prior).abs().sum()),
        "kept_uniform": estimate.kept_uniform,
        "shift_spread": estimate.shift_spread,
    }


def evaluate_shifts(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                    shifts: list[str], priors: list[str], seed: int = 0,
                    calibration: dict[str, Any] | None = None, shift_estimator: dict[str, Any] | None = None,
                    **report_kwargs: Any) -> dict[str, Any]:
    """Per shift: its size, true prior, each estimator's prior, and a long_tail_report per prior mode.

    ``calibration`` is the model's ``config.calibration`` (``NEEDS_CALIBRATION`` lists the modes that cannot
    do without it) and ``shift_estimator`` its ``config.shift_estimator``.
    """
    num_classes = uniform_logits.shape[1]
    results: dict[str, Any] = {}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        logits, targets = uniform_logits[rows], labels[rows]
        true_prior = torch.from_numpy(np.bincount(targets, minlength=num_classes) / len(targets))
        entry: dict[str, Any] = {"num_samples": len(rows), "test_prior": true_prior.tolist(), "estimates": {},
                                 "reports": {}}
        for mode in priors:
            if mode == "none":
                adjusted = logits
            elif mode == "oracle":
                adjusted = with_target_prior(logits, true_prior)
            else:
                estimate = estimate_prior(logits, calibration, mode, shift_estimator=shift_estimator)
                entry["estimates"][mode] = _estimate_summary(estimate, true_prior)
                adjusted = with_target_prior(logits, estimate.prior)
            entry["reports"][mode] = long_tail_report(adjusted, targets, train_counts, **report_kwargs)
        results[shift] = entry
    return results


def deployment_batches(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                       shifts: list[str], priors: list[str], sizes: Sequence[int], draws: int = 10,
                       seed: int = 0, calibration: dict[str, Any] | None = None,
                       shift_estimator: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prior modes adapting on small unlabelled batches, as a deployment would: per batch size and shift,
    ``draws`` batches drawn without replacement from the shifted test set, each adapted on its own images and
    scored on them. Returns size -> shift -> mode -> ``{"mean_gain", "worst_gain"}``, the top-1 gain over
    ``none`` (fractions) averaged over the draws and the worst draw. A size larger than a shifted set is
    skipped for that set."""
    num_classes = uniform_logits.shape[1]
    check_deployment_sizes(sizes, draws, num_classes)
    rng = np.random.default_rng(seed)
    modes = [mode for mode in priors if mode != "none"]
    results: dict[str, Any] = {}
    for size in sizes:
        results[str(size)] = {}
        for shift in shifts:
            rows = shifted_rows(labels, train_counts, shift, seed)
            if len(rows) < size:
                continue
            gains: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(draws):
                batch = rng.choice(rows, size, replace=False)
                logits, targets = uniform_logits[batch], labels[batch]
                baseline = float((logits.argmax(1).numpy() == targets).mean())
                for mode in modes:
                    if mode == "oracle":
                        prior = torch.from_numpy(np.bincount(targets, minlength=num_classes) / size)
                    else:
                        prior = estimate_prior(logits, calibration, mode,
                                               shift_estimator=shift_estimator).prior
                    adjusted = with_target_prior(logits, prior)
                    gains[mode].append(float((adjusted.argmax(1).numpy() == targets).mean()) - baseline)
            results[str(size)][shift] = {
                mode: {"mean_gain": float(np.mean(values)), "worst_gain": min(values)}
                for mode, values in gains.items()}
    return results


# The drift scenario of ``stream_batches``: a stream that switches from one shift to its opposite.
DRIFT_SCHEDULE = (("forward50", 5), ("backward50", 10))


def _batch_gain(logits: torch.Tensor, targets: np.ndarray, prior: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits + log(C prior)`` minus that of ``logits`` on one batch."""
    adjusted = with_target_prior(logits, prior)
    before = (logits.argmax(1).numpy() == targets).mean()
    return float((adjusted.argmax(1).numpy() == targets).mean() - before)


def _stream_gains(uniform_logits: torch.Tensor, labels: np.ndarray,
                  schedule: Sequence[tuple[np.ndarray, int]], modes: Sequence[str], batch_size: int,
                  draws: int, forgetting: float, rng: np.random.Generator, calibration: dict[str, Any] | None,
                  shift_estimator: dict[str, Any] | None) -> dict[str, list[float]]:
    """Mean gain over ``none`` per batch of a stream (``schedule``: row pools and how many batches to draw
    from each, in turn), averaged over ``draws`` streams; ``oracle`` predicts with the pool's label
    distribution. Each batch is drawn without replacement from its pool, independently of the others."""
    num_classes = uniform_logits.shape[1]
    total = sum(count for _, count in schedule)
    gains = {mode: np.zeros(total) for mode in modes}
    for _ in range(draws):
        stream, step = PriorStream(forgetting), 0
        for rows, count in schedule:
            truth = torch.from_numpy(np.bincount(labels[rows], minlength=num_classes) / len(rows))
            for _ in range(count):
                batch = rng.choice(rows, batch_size, replace=False)
                logits, targets = uniform_logits[batch], labels[batch]
                stream.add(logits)
                for mode in modes:
                    prior = truth if mode == "oracle" else estimate_prior(
                        stream.logits, calibration, mode, weights=stream.weights,
                        shift_estimator=shift_estimator).prior
                    gains[mode][step] += _batch_gain(logits, targets, prior) / draws
                step += 1
    return {mode: values.tolist() for mode, values in gains.items()}


def stream_batches(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                   shifts: list[str], priors: list[str], batch_size: int, *, batches: int = 10,
                   draws: int = 10, seed: int = 0, drift_forgetting: float = 0.5,
                   calibration: dict[str, Any] | None = None,
                   shift_estimator: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prior modes adapting on a stream of unlabelled batches, as a deployment that keeps its evidence would.

    Per shift, ``draws`` streams of ``batches`` batches of ``batch_size`` images from the shifted set; after
    each batch every mode estimates the prior from all the batches so far (``label_shift.PriorStream``, no
    forgetting) and predicts that batch. Then the drift scenario (``DRIFT_SCHEDULE``: batches from forward50,
    then from backward50) with ``drift_forgetting``. Returns ``{"batch_size", "batches", "draws",
    "shifts": {shift: {mode: [mean gain over none per batch]}}, "drift": {"schedule", "forgetting",
    "gains"}}`` (fractions); a shift whose set is smaller than a batch is left out."""
    if batch_size < 1 or batches < 1 or draws < 1:
        raise EvaluationError(f"stream batch size, batches and draws must be positive, got {batch_size}, "
                              f"{batches} and {draws}.")
    if not 0 < drift_forgetting <= 1:
        raise EvaluationError(f"the drift scenario's forgetting must lie in (0, 1], got {drift_forgetting}.")
    rng = np.random.default_rng(seed)
    modes = [mode for mode in priors if mode != "none"]
    context = {"modes": modes, "batch_size": batch_size, "draws": draws, "rng": rng,
               "calibration": calibration, "shift_estimator": shift_estimator}
    results: dict[str, Any] = {"batch_size": batch_size, "batches": batches, "draws": draws, "shifts": {}}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        if len(rows) >= batch_size:
            results["shifts"][shift] = _stream_gains(uniform_logits, labels, [(rows, batches)],
                                                     forgetting=1.0, **context)
    pools = [(shifted_rows(labels, train_counts, shift, seed), count) for shift, count in DRIFT_SCHEDULE]
    if all(len(rows) >= batch_size for rows, _ in pools):
        results["drift"] = {"schedule": [list(step) for step in DRIFT_SCHEDULE],
                            "forgetting": drift_forgetting,
                            "gains": _stream_gains(uniform_logits, labels, pools, forgetting=drift_forgetting,
                                                   **context)}
    return results


def check_deployment_sizes(sizes: Sequence[int], draws: int, num_classes: int) -> None:
    """Refuse deployment batches smaller than the number of classes (or no draws): such a batch cannot hold
    every class, and its ``oracle`` prior (the batch's own label counts) all but gives the answers away."""
    small = [size for size in sizes if size < num_classes]
    if draws < 1 or small:
        raise EvaluationError(f"deployment batches must hold at least as many images as the model has "
                              f"classes ({num_classes}), and --deployment-draws must be positive; got sizes "
                              f"{list(sizes)} and {draws} draws. A smaller batch cannot hold every class, "
                              "and its 'oracle' prior (the batch's own labels) would give the answers away.")


def default_priors() -> list[str]:
    """``none``, ``oracle`` and the default unknown-prior mode ``auto`` (which works with or without a
    held-out calibration)."""
    return ["none", "oracle", "auto"]


def check_calibration_for(priors: Sequence[str], calibration: dict[str, Any] | None, model_id: str) -> None:
    """Raise an ``EvaluationError`` when a prior mode needs the held-out calibration the model lacks."""
    needy = [mode for mode in priors if mode in NEEDS_CALIBRATION]
    if needy and calibration is None:
        raise EvaluationError(
            f"prior modes {needy} need the held-out calibration (config.calibration), which {model_id} "
            "lacks: train it with --holdout-fraction 0.1 (balpoe-train), or evaluate with --prior "
            "none,oracle,auto,em.")


def describe_estimator(config: Any) -> str:
    """What ``auto`` runs for a model with this config, in one line."""
    name, _ = resolve_estimator("auto", config.shift_estimator)
    if name != "auto":
        return f"{name}: the settings in config.shift_estimator"
    return describe_auto(config.calibration)
