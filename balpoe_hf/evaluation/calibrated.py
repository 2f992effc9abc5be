"""What a run's held-out calibration would change if it were applied to the predictions, on the balanced test
set and under label shift: whether the uniform-prior logits lean towards some classes.

    from balpoe_hf.evaluation.calibrated import format_calibrated_table, run_calibrated_shifts

    print(format_calibrated_table(run_calibrated_shifts("runs/cifar10-lt")))

A model predicts from its uniform-prior logits ``z`` (plus ``log(C * pi_t)`` for a target prior ``pi_t``); the
held-out BCTS calibration ``z / T + b`` (``config.calibration``) serves only the estimate of an unknown prior.
Biases ``b`` far from zero say that ``z`` leans: negative biases on the head classes mean ``z`` over-states
them, and a head-heavy target prior added on top over-corrects, so that even the true prior can cost accuracy
on a mild forward shift. The package does not apply the biases to predictions: they are fitted on the held-out
split, which holds few images of the tail classes, and on some models they cost accuracy (the benchmarks
doc's label-shift section has both kinds). This measures it for one model: the accuracy of ``none`` (``z``),
``oracle`` (``z + log(C pi_t)`` with the true prior of the set), ``calibrated`` (``z / T + b``) and
``calibrated+oracle`` (``z / T + b + log(C pi_t)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.splits import ALL_SHIFTS
from ..errors import EvaluationError
from ..metrics import percent
from ..models.balpoe.calibration import apply_calibration
from .model_loading import load_run
from .shifts import shifted_rows, with_target_prior

VARIANTS = ("none", "oracle", "calibrated", "calibrated+oracle")


def calibrated_shift_accuracy(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                              calibration: Mapping[str, Any], shifts: Sequence[str] = ALL_SHIFTS,
                              seed: int = 0) -> dict[str, dict[str, float]]:
    """Top-1 accuracy of each of ``VARIANTS`` on each shifted test set (``shifted_rows`` of ``labels``),
    from the uniform-prior logits ``(N, C)`` and a ``config.calibration`` (its BCTS ``temperature`` and
    ``bias``)."""
    uniform_logits = uniform_logits.double()
    calibrated = apply_calibration(uniform_logits, calibration["temperature"], calibration["bias"])
    results: dict[str, dict[str, float]] = {}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        targets = torch.from_numpy(np.asarray(labels)[rows])
        prior = torch.bincount(targets, minlength=uniform_logits.shape[1]).double() / len(targets)
        variants = {"none": uniform_logits[rows], "oracle": with_target_prior(uniform_logits[rows], prior),
                    "calibrated": calibrated[rows],
                    "calibrated+oracle": with_target_prior(calibrated[rows], prior)}
        results[shift] = {name: float((logits.argmax(1) == targets).double().mean())
                          for name, logits in variants.items()}
    return results


def run_calibrated_shifts(run_dir: str | Path, shifts: Sequence[str] = ALL_SHIFTS, device: str = "cpu",
                          seed: int = 0) -> dict[str, Any]:
    """``calibrated_shift_accuracy`` of a run's model on its recipe's test set (``"accuracy"``; ``seed``: of
    the shifted sets, as ``balpoe-evaluate --seed``), with the calibration it applied (``"temperature"``,
    ``"bias"``) and the class names (``"classes"``)."""
    run = load_run(run_dir, device)
    calibration = run.model.config.calibration
    if calibration is None:
        raise EvaluationError(f"the model in {run_dir} has no held-out calibration (config.calibration), so "
                              "there is none to apply: train it with a held-out split (--holdout-fraction, "
                              "e.g. 0.1).")
    logits, _ = run.predict(run.data.test)
    accuracy = calibrated_shift_accuracy(logits, run.labels(run.data.test), run.train_counts, calibration,
                                         shifts, seed)
    return {"accuracy": accuracy, "temperature": float(calibration["temperature"]),
            "bias": [float(b) for b in calibration["bias"]], "classes": run.class_names}


def format_calibrated_table(result: Mapping[str, Any]) -> str:
    """``run_calibrated_shifts``'s accuracies as a Markdown table in percent, one row per shifted set, under a
    line with the calibration's temperature and each class's bias."""
    biases = ", ".join(f"{name} {bias:+.2f}" for name, bias in zip(result["classes"], result["bias"],
                                                                    strict=True))
    lines = [f"BCTS temperature {result['temperature']:.3f}; biases: {biases}", "",
             "| test set | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    for shift, row in result["accuracy"].items():
        lines.append(f"| {shift} | " + " | ".join(percent(row[name]) for name in VARIANTS) + " |")
    return "\n".join(lines)
