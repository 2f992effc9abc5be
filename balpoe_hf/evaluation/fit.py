"""How a finished run fits its own training split and its test set: over-fitting and the direction of its
miscalibration, which a test-set report alone does not tell apart.

    from balpoe_hf.evaluation.fit import format_fit_table, run_fit

    print(format_fit_table(run_fit("runs/compare-paper/balpoe")))

The training split is the one the run trained on (its ``recipe.yaml``: the same files, imbalance, selection
and held-out part left out), seen as at inference, without augmentation or mixup. Mean confidence below the
accuracy is under-confidence (mixup tends to cause it), above it over-confidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics import long_tail_report, percent
from .evaluate import expert_accuracy
from .model_loading import load_run


def split_fit(logits: torch.Tensor, expert_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
              lambdas: list[float], many: int, few: int) -> dict[str, Any]:
    """The figures of one split from its uniform-prior logits ``(N, C)`` and expert logits ``(N, E, C)``."""
    report = long_tail_report(logits, labels, train_counts, many=many, few=few)
    experts = [expert["balanced_accuracy"]
               for expert in expert_accuracy(expert_logits, labels, train_counts, lambdas, many, few)]
    return {"images": len(labels), "balanced_accuracy": report["balanced_accuracy"],
            "accuracy": report["accuracy"], "mean_confidence": float(logits.softmax(-1).amax(-1).mean()),
            "ece": report["ece"], "nll": report["nll"], "experts_balanced_accuracy": experts}


def run_fit(run_dir: str | Path, device: str = "cpu") -> dict[str, Any]:
    """``split_fit`` of the run's model on its training split (``"train"``) and test set (``"test"``), and
    its experts' ``"lambdas"``."""
    run = load_run(run_dir, device)
    lambdas = list(run.model.config.lambdas)
    fit: dict[str, Any] = {"lambdas": lambdas}
    for name, ds in (("train", run.data.train), ("test", run.data.test)):
        logits, expert_logits = run.predict(ds)
        fit[name] = split_fit(logits, expert_logits, run.labels(ds), run.train_counts, lambdas,
                              run.recipe.many_threshold, run.recipe.few_threshold)
    return fit


def format_fit_table(fit: Mapping[str, Any]) -> str:
    """``run_fit``'s figures as a Markdown table, one row per split, in percent."""
    experts = " | ".join(f"lambda {lam:g}" for lam in fit["lambdas"])
    lines = [f"| split | images | balanced acc. | accuracy | mean confidence | ECE | NLL | {experts} |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(fit["lambdas"])]
    for name in ("train", "test"):
        row = fit[name]
        cells = [percent(row[key]) for key in ("balanced_accuracy", "accuracy", "mean_confidence", "ece")]
        expert_cells = " | ".join(percent(value) for value in row["experts_balanced_accuracy"])
        lines.append(f"| {name} | {row['images']:,} | {' | '.join(cells)} | {row['nll']:.3f} | "
                     f"{expert_cells} |")
    return "\n".join(lines)
