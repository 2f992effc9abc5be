"""The model a recipe trains (its config from the training data, the checks before any data is read) and the
optimizer's side of it: the parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..data.loading import TrainingData
from ..errors import TrainingError
from ..models.balpoe.modeling_balpoe import BalPoEForImageClassification
from ..recipes import Recipe


def _model_error(recipe: Recipe, error: Exception) -> TrainingError:
    if isinstance(error, TypeError):  # timm passes backbone_kwargs on to the model class
        return TrainingError(f"cannot build the backbone {recipe.backbone} with backbone_kwargs "
                             f"{recipe.backbone_kwargs}: {error}. Pass only arguments that "
                             f"timm.create_model({recipe.backbone!r}, ...) takes and does not set itself "
                             "(--backbone-kwargs), or none.")
    return TrainingError(f"cannot build the model: {error}")


def build_model(recipe: Recipe, data: TrainingData) -> BalPoEForImageClassification:
    """A freshly initialised BalPoE model whose training prior is the long-tailed split's class counts."""
    try:
        return BalPoEForImageClassification(recipe.model_config(data.class_counts, data.class_names))
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as error:  # OSError: pretrained offline
        raise _model_error(recipe, error) from None


def check_model(recipe: Recipe) -> None:
    """Build the recipe's model on the meta device (no memory, no weights, no download: a fraction of a
    second), so that settings the backbone refuses stop a run before its data are loaded."""
    try:
        config = recipe.model_config()
        with torch.device("meta"):
            BalPoEForImageClassification(config)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise _model_error(recipe, error) from None


def parameter_groups(model: BalPoEForImageClassification, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one, or with ``recipe.scale_expert_lr`` and E > 1 experts two, the
    experts' own parameters at ``E x lr`` and ``weight_decay / E``.

    The loss is the mean of the E expert losses, so an expert's parameters get 1/E of its gradient; the
    scaled group makes their SGD step ``lr * (grad_e + weight_decay * w)``, that of the expert trained alone.
    """
    scale = recipe.num_experts if recipe.scale_expert_lr else 1
    if scale == 1:
        return [{"params": list(model.parameters())}]
    experts = list(model.balpoe.experts.parameters())
    expert_ids = {id(p) for p in experts}
    shared = [p for p in model.parameters() if id(p) not in expert_ids]
    return [{"params": shared},
            {"params": experts, "lr": recipe.lr * scale, "weight_decay": recipe.weight_decay / scale}]


def optimizer_steps_done(epoch: int, batch: int, steps_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps taken before batch ``batch`` (0-based) of epoch ``epoch`` (0-based): the position in
    ``lr_lambda``'s schedule. An epoch ends with a step, also when its last accumulation is partial."""
    return epoch * steps_per_epoch + batch // accumulation


def lr_lambda(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``).

    A linear warm-up over ``warmup_epochs``, then the recipe's schedule: ``multistep`` multiplies by
    ``lr_gamma`` at each milestone epoch, ``cosine`` decays to 0 at the last step, ``constant`` stays.
    """
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.lr_schedule == "multistep":
            epoch = step // steps_per_epoch
            return recipe.lr_gamma ** sum(epoch >= m for m in recipe.lr_milestones)
        if recipe.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return multiplier
