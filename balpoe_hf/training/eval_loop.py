"""The evaluations inside a run, over every process: the balanced test set after each epoch and the held-out
split whose calibration goes into the model's config after the last one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from timm.utils import distribute_bn
from torch.utils.data import DataLoader

from ..evaluation.calibrate import fit_holdout_calibration
from ..evaluation.evaluate import calibration_effect
from ..metrics import long_tail_report
from ..recipes import Recipe


@torch.no_grad()
def gather_logits(model: torch.nn.Module, loader: Iterable[dict], accelerator: Accelerator,
                  num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits ``(N, C)`` and the labels ``(N,)`` of the ``num_images`` images of ``loader``, once
    each, on CPU.

    Every process gets all of them. The logits are adjusted to the config's target prior (uniform in
    training).
    """
    if accelerator.num_processes > 1:
        # Every process evaluates its share with process 0's batch-norm statistics, those of the saved model:
        # without SyncBatchNorm each process has updated its own copy since DDP's last broadcast.
        distribute_bn(model, accelerator.num_processes, reduce=False)
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        # gather_for_metrics drops the samples repeated to even out the last batch across processes.
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    # Under several processes the last round is completed with images from the start; gather_for_metrics
    # drops them (both loaders report the round's real images to accelerate), and the gathered rows are the
    # images in order, so the first num_images are the test set whatever a loader reports.
    return torch.cat(all_logits)[:num_images], torch.cat(all_labels)[:num_images]


def evaluate(model: torch.nn.Module, loader: Iterable[dict], accelerator: Accelerator, recipe: Recipe,
             class_counts: list[int], num_test: int) -> tuple[dict, int]:
    """``long_tail_report`` of the balanced test set of ``num_test`` images and its size; every test image
    is counted once.

    The logits ``(N, C)`` are the model's, adjusted to a uniform prior. When the model has a held-out
    calibration, the report adds the ECE and NLL after it (``calibration_effect``).
    """
    logits, labels = gather_logits(model, loader, accelerator, num_test)
    report = long_tail_report(logits, labels, class_counts, n_bins=15, many=recipe.many_threshold,
                              few=recipe.few_threshold)
    calibration = accelerator.unwrap_model(model).config.calibration
    if calibration is not None:
        report.update(calibration_effect(logits, labels, calibration, n_bins=15))
    return report, len(labels)


def calibrate_on_holdout(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator,
                         recipe: Recipe, class_counts: list[int]) -> dict[str, Any]:
    """Fit the held-out calibration into the model's config; return the held-out ``long_tail_report``.

    Every process fits the same ``holdout_calibration`` on the same gathered logits (float64).
    """
    logits, labels = gather_logits(model, loader, accelerator, len(loader.dataset))
    fit_holdout_calibration(accelerator.unwrap_model(model), logits, labels)
    report = long_tail_report(logits, labels, class_counts, n_bins=15, many=recipe.many_threshold,
                              few=recipe.few_threshold)
    return {"holdout_samples": len(labels), **{f"holdout_{k}": v for k, v in report.items()}}
