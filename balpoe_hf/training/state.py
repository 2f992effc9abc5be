"""What a run holds while it trains: the prepared objects (``Run``), the progress and statistics a checkpoint
keeps (``TrainState``), and what ``train`` returns (``TrainOutput``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.data import Mixup
from torch.utils.data import DataLoader

from ..data.loaders import Loaders
from ..data.loading import TrainingData
from ..recipes import Recipe
from . import checkpoints, non_finite
from .model import lr_lambda


@dataclass
class TrainOutput:
    """What ``train`` returns: where the run is, its balanced-test-set report and its training statistics."""

    output_dir: Path
    eval_report: dict[str, Any] | None  # None when the run stopped at its deadline before the last epoch
    train_results: dict[str, Any]
    finished: bool = True  # False: stopped at the deadline; ``train(..., resume=True)`` continues it


@dataclass
class TrainState:
    """A run's progress and statistics, saved in every checkpoint (``trainer_state.json``) so that a resumed
    run goes on exactly where it stopped and reports the whole run."""

    epoch: int = 0  # epochs done
    step: int = 0  # batches done of the next epoch (a step checkpoint; 0 after a whole epoch)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None  # mean loss of the last whole epoch
    train_runtime: float = 0.0  # seconds of training so far, over every resume
    images_seen: int = 0
    epoch_loss_sum: float = 0.0  # summed loss of the ``step`` batches done of the next epoch
    model: dict[str, Any] | None = None  # model_signature of the model, checked on resume
    batches_per_epoch: int | None = None  # a step checkpoint's resume skips ``step`` of them
    gradient_accumulation_steps: int | None = None  # a step checkpoint's phase of the accumulation
    num_processes: int | None = None  # a step checkpoint's random-number states are per process
    epoch_expert_loss_sums: list[float] | None = None  # each expert's ``epoch_loss_sum``
    train_expert_losses: list[float] | None = None  # each expert's ``train_loss``

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state of a checkpoint's ``trainer_state.json`` (one saved before a field existed gets its
        default)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class Run:
    """What ``set_up`` prepares for the phases of a run: its settings, the prepared model, optimizer and
    loaders, and the figures the printouts use."""

    recipe: Recipe
    output_dir: Path
    accelerator: Accelerator
    data: TrainingData
    groups: dict[str, list[int]]  # shot groups of the training counts
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loaders: Loaders
    holdout_loader: DataLoader | None
    processor: Any  # the evaluation transform, saved with the model
    mixup: Mixup | None
    guard: non_finite.NonFiniteLossGuard
    steps_per_epoch: int  # optimizer steps
    run_start: float  # time.perf_counter() at the run's start, counting the sessions before a resume

    @property
    def global_batch(self) -> int:
        recipe = self.recipe
        return recipe.batch_size * self.accelerator.num_processes * recipe.gradient_accumulation_steps

    def stop_if_diverged(self) -> None:
        """Raise the non-finite-loss error if a loss so far was NaN or infinite (one device sync)."""
        bad = self.guard.first_bad()
        if bad is not None:
            multiplier = lr_lambda(self.recipe, self.steps_per_epoch)
            raise non_finite.non_finite_loss_error(
                bad, len(self.loaders.train), self.recipe.gradient_accumulation_steps,
                lambda step: self.recipe.lr * multiplier(step), self.output_dir)

    def save_checkpoint(self, state: TrainState) -> None:
        """Save the model, optimizer, scheduler and RNG states with ``state`` as a checkpoint."""
        checkpoints.save_checkpoint(self.accelerator, self.output_dir, asdict(state),
                                    self.recipe.checkpoints_total_limit,
                                    checkpoints.TrainingObjects(self.model, self.optimizer, self.scheduler))
