"""Evaluate a BalPoE model on a balanced test set and on label-shifted versions of it, as a Python API.

    from balpoe_hf.data import load_split
    from balpoe_hf.evaluation import evaluate_model, load_model

    model, processor = load_model("runs/fashion-mnist-lt-quick")
    test, _ = load_split(dataset="fashion-mnist")
    result = evaluate_model(model, processor, test, shifts="all", priors=["none", "oracle", "em"])

The model runs once per balanced test image, with a uniform target prior (``predictions.predict``); every
shifted set (the LADE/SADE protocol of ``make_shifted_test``: forward50 ... uniform ... backward50) is a
selection of those cached logits, and every prior mode adds ``log(C * pi_t)`` to them, which is exactly
what ``model.set_target_prior(pi_t)`` does inside the model (``shifts``, which lists the prior modes).
Beside the full shifted sets, ``shifts.deployment_batches`` adapts on small batches drawn from them and
``shifts.stream_batches`` on a stream of batches (``label_shift.PriorStream``), as deployments do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from ..data.loading import align_labels
from ..metrics import accuracy_report, calibration_report, long_tail_report
from ..models.balpoe.calibration import apply_calibration
from ..models.balpoe.modeling_balpoe import BalPoEForImageClassification
from .model_loading import run_shot_thresholds
from .predictions import predict
from .shifts import (
    check_calibration_for,
    check_deployment_sizes,
    check_shifts,
    default_priors,
    deployment_batches,
    describe_estimator,
    evaluate_shifts,
    parse_priors,
    parse_shifts,
    stream_batches,
)


def calibration_effect(logits: torch.Tensor, labels: torch.Tensor | np.ndarray, calibration: dict[str, Any],
                       n_bins: int = 15) -> dict[str, float]:
    """ECE and NLL of uniform-prior logits ``(N, C)`` on a balanced set after the held-out calibration.

    ``calibration`` is a model's ``config.calibration``: ``*_temperature_scaling`` use ``softmax(z / T_ts)``,
    ``*_bcts`` use ``softmax(z / T + b)``. The labels must follow a uniform prior (a balanced test set), the
    prior these calibrated probabilities are for.
    """
    scaled = calibration_report(apply_calibration(logits.double(), calibration["ts_temperature"]), labels,
                                n_bins)
    bcts = calibration_report(apply_calibration(logits.double(), calibration["temperature"],
                                                calibration["bias"]), labels, n_bins)
    return {"ece_temperature_scaling": scaled["ece"], "nll_temperature_scaling": scaled["nll"],
            "ece_bcts": bcts["ece"], "nll_bcts": bcts["nll"]}


def expert_accuracy(expert_logits: torch.Tensor, labels: np.ndarray, train_counts: Sequence[int],
                    lambdas: Sequence[float], many: int, few: int) -> list[dict[str, Any]]:
    """Each expert's raw-logit accuracy as trained (biased towards the head for lambda > 0, the tail for
    lambda < 0): ``accuracy_report`` without the per-class list, with the expert's ``lambda``."""
    experts = []
    for e, lam in enumerate(lambdas):
        accuracy = accuracy_report(expert_logits[:, e].argmax(1), labels, train_counts, many, few)
        accuracy.pop("per_class_accuracy")
        experts.append({"lambda": lam, **accuracy})
    return experts


def absent_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """The classes without an image among ``labels`` (class indices)."""
    return np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0).tolist()


@dataclass
class EvaluationResult:
    """``evaluate_model``'s output: the JSON-ready ``report`` and the predictions it was computed from."""

    report: dict[str, Any]
    logits: torch.Tensor  # (N, C), adjusted to a uniform target prior
    expert_logits: torch.Tensor  # (N, E, C), raw
    labels: np.ndarray  # (N,), model class indices


def evaluate_model(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset, *,
                   image_column: str = "image", label_column: str = "label",
                   shifts: str | Sequence[str] = "all",
                   priors: str | Sequence[str] | None = None,
                   batch_size: int = 256, n_bins: int = 15, many: int | None = None, few: int | None = None,
                   seed: int = 0, deployment_sizes: Sequence[int] = (),
                   deployment_draws: int = 10, stream_size: int | None = None, stream_length: int = 10,
                   stream_draws: int = 10, drift_forgetting: float = 0.5) -> EvaluationResult:
    """The balanced-test-set report, each expert's accuracy, and the shifted sets under every prior mode.

    ``priors=None``: ``default_priors`` (``none``, ``oracle`` and ``auto``). ``many`` / ``few``: the shot
    thresholds; by default those of the run that trained the model (``run_shot_thresholds``), so that the
    groups are the ones its training printout used.

    The report is a JSON-ready dict: ``balanced`` (``long_tail_report``, plus ``calibration_effect`` when the
    model has a held-out calibration), ``experts`` (raw-logit accuracy of each expert as trained),
    ``shift_accuracy`` (prior mode -> shift -> top-1 accuracy) and ``shifts`` (per shift: its size, true
    prior, each estimator's prior with its error, and a full report per prior mode). ``shift_estimator``
    says what ``auto`` ran. With ``deployment_sizes``, ``deployment_batches`` holds each mode on
    ``deployment_draws`` small batches per shift (``deployment_batches``); with ``stream_size``, ``stream``
    holds each mode on streams of ``stream_length`` batches of that size (``stream_batches``,
    ``stream_draws`` streams per shift, and the drift scenario with ``drift_forgetting``).
    ``classes_without_test_images`` lists the classes the test set lacks, which the averages leave out
    (``absent_classes_warning`` says so).
    """
    calibration = model.config.calibration
    if many is None or few is None:
        run_many, run_few = run_shot_thresholds(model)
        many, few = run_many if many is None else many, run_few if few is None else few
    shifts, priors = parse_shifts(shifts), parse_priors(priors or default_priors(), calibration)
    shift_estimator = model.config.shift_estimator
    check_calibration_for(priors, calibration, "the model")
    train_counts = [int(c) for c in model.config.class_counts]
    id2label = model.config.id2label
    labels = align_labels(ds, label_column, [id2label[i] for i in range(len(id2label))])
    check_shifts(labels, train_counts, shifts, seed)
    if deployment_sizes:
        check_deployment_sizes(deployment_sizes, deployment_draws, len(train_counts))
    report_kwargs = {"n_bins": n_bins, "many": many, "few": few}

    start = time.perf_counter()
    uniform_logits, expert_logits = predict(model, processor, ds, image_column, batch_size)
    seconds = time.perf_counter() - start
    balanced = long_tail_report(uniform_logits, labels, train_counts, **report_kwargs)
    if calibration is not None:
        balanced.update(calibration_effect(uniform_logits, labels, calibration, n_bins))
    experts = expert_accuracy(expert_logits, labels, train_counts, model.config.lambdas, many, few)
    shift_results = evaluate_shifts(uniform_logits, labels, train_counts, shifts, priors, seed, calibration,
                                    shift_estimator, **report_kwargs)
    shift_accuracy = {mode: {shift: shift_results[shift]["reports"][mode]["accuracy"] for shift in shifts}
                      for mode in priors}
    report = {
        "num_test_samples": len(labels),
        "classes_without_test_images": absent_classes(labels, len(train_counts)),
        "inference_seconds": round(seconds, 2),
        "train_counts": train_counts,
        "settings": {"n_bins": n_bins, "many": many, "few": few, "seed": seed},
        "balanced": balanced,
        "experts": experts,
        "shift_accuracy": shift_accuracy,
        "shift_estimator": describe_estimator(model.config) if "auto" in priors else None,
        "shifts": shift_results,
    }
    if deployment_sizes:
        report["deployment_batches"] = deployment_batches(
            uniform_logits, labels, train_counts, shifts, priors, deployment_sizes, deployment_draws, seed,
            calibration, shift_estimator)
    if stream_size is not None:
        report["stream"] = stream_batches(uniform_logits, labels, train_counts, shifts, priors, stream_size,
                                          batches=stream_length, draws=stream_draws, seed=seed,
                                          drift_forgetting=drift_forgetting,
                                          calibration=calibration, shift_estimator=shift_estimator)
    return EvaluationResult(report, uniform_logits, expert_logits, labels)



