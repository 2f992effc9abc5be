"""A stop at the first non-finite training loss, without a host-device synchronisation per step, so that no
checkpoint or evaluation ever sees diverged weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import TrainingFailure
from .checkpoints import completed_checkpoints
from .model import optimizer_steps_done

if TYPE_CHECKING:
    pass


class NonFiniteLossGuard:
    """Notices the first non-finite training loss without a host-device synchronisation per step.

    ``update(loss, batch)`` records, on the device, the number of the first batch whose loss is NaN or
    infinite, and copies a "seen one" flag into pinned host memory with a non-blocking copy, which the host
    reads without waiting. On the CPU the flag is exact at once; on a GPU it turns up as soon as the device
    has run that step (a step or two later at most, since the host runs ahead by that much); ``first_bad``
    then reads the exact batch. Call ``first_bad`` (one synchronisation) before anything leaves the device,
    such as a checkpoint or an evaluation, so that diverged weights are never saved.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.flag = torch.zeros((), dtype=torch.bool, pin_memory=device.type == "cuda")

    def update(self, loss: torch.Tensor, batch: int) -> bool:
        """Record ``loss`` of batch number ``batch``; whether a non-finite loss has been seen so far."""
        keep = torch.isfinite(loss.detach()) | (self.first >= 0)
        self.first = torch.where(keep, self.first, batch)
        self.flag.copy_(self.first >= 0, non_blocking=True)
        return bool(self.flag)

    def first_bad(self) -> int | None:
        """The number of the first batch with a non-finite loss, ``None`` if there was none."""
        first = int(self.first)
        return None if first < 0 else first


def non_finite_loss_error(batch: int, batches_per_epoch: int, accumulation: int,
                          lr_at: Callable[[int], float], output_dir: str | Path) -> TrainingFailure:
    """The error for a non-finite loss at global batch number ``batch``: where, the lr there, and hints.

    ``lr_at(step)`` is the learning rate at optimizer step ``step`` (0-based).
    """
    epoch, index = divmod(batch, batches_per_epoch)
    step = optimizer_steps_done(epoch, index, -(-batches_per_epoch // accumulation), accumulation)
    saved = completed_checkpoints(output_dir)
    where = f"the latest checkpoint, {saved[-1]}, is from before it" if saved else "no checkpoint was saved"
    return TrainingFailure(
        f"the training loss is not finite (NaN or inf) at epoch {epoch + 1}, batch {index + 1} (optimizer "
        f"step {step + 1}, lr {lr_at(step):.4g}); training stopped there and {where}. The run diverged or "
        "the data holds bad values: lower --lr, set --max-grad-norm (e.g. 5), prefer --mixed-precision bf16 "
        "to fp16, or check the images and labels; then --resume (or start over).")
