"""The budgets of a comparison (the base recipes: quick, cpu, cpu-long, paper) and each method's recipe on top
of one, with the paper's own figures for the budget that reproduces it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import TrainingError
from ..recipes import Recipe, make_recipe, recipe_values

DEFAULT_METHODS = ("ce", "ce-la", "bs", "lade", "balpoe-erm", "balpoe")
# The paper's CIFAR-10-LT IR100 rows (ResNet-32, 200 epochs; Tables 8 and 9), in percent.
PAPER_CIFAR10_LT_IR100 = {
    "ce": {"balanced_accuracy": 71.3, "ece": 19.1, "mce": 33.9},
    "bs": {"balanced_accuracy": 83.1},
    "balpoe-erm": {"balanced_accuracy": 80.5, "ece": 11.0, "mce": 27.7},
    "balpoe": {"balanced_accuracy": 84.2, "ece": 6.3, "mce": 15.8},
}


@dataclass(frozen=True)
class Budget:
    """A comparison's base recipe: a shipped recipe and the settings changed for the budget."""

    recipe: str
    settings: Mapping[str, Any]
    description: str
    needs_files: bool = False  # the data comes from --train-file / --test-file
    paper: Mapping[str, Mapping[str, float]] | None = None  # published rows to print beside the measured ones


CPU_SETTINGS = {"backbone": "resnet20_cifar", "epochs": 12, "lr_schedule": "cosine", "warmup_epochs": 1.0,
                "eval_every": 0, "checkpoints_total_limit": 1, "num_workers": 2, "holdout_fraction": 0.1,
                "scale_expert_lr": True}
BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        # mixup_alpha for the 'balpoe' method only: the main job's recipe trains without mixup.
        "fashion-mnist-lt-quick", {"eval_every": 0, "mixup_alpha": 0.2},
        "Fashion-MNIST-LT IR100 (a tenth held out), ResNet-20, 4 epochs, experts at their own lr, mixup 0.2: "
        "a few minutes a method on 2 CPU cores"),
    "cpu": Budget(
        "cifar10-lt-local",
        CPU_SETTINGS,
        "CIFAR-10-LT IR100 from parquet (a tenth held out), ResNet-20, 12 epochs cosine, experts at their "
        "own lr, mixup 0.8: about an hour for five methods on 2 CPU cores",
        needs_files=True, paper=PAPER_CIFAR10_LT_IR100),
    # The cpu budget run four times as long: where the ensemble's lead over single experts shows on 2 cores.
    "cpu-long": Budget(
        "cifar10-lt-local",
        {**CPU_SETTINGS, "epochs": 48},
        "the cpu budget for 48 epochs: about 20 min a single-expert and 40 min a 3-expert method on 2 CPU "
        "cores",
        needs_files=True, paper=PAPER_CIFAR10_LT_IR100),
    "paper": Budget(
        "cifar10-lt-local", {"eval_every": 0, "checkpoints_total_limit": 1},
        "CIFAR-10-LT IR100 from parquet, the paper's schedule: ResNet-32, 200 epochs, mixup 0.8 (a GPU)",
        needs_files=True, paper=PAPER_CIFAR10_LT_IR100),
}


def budget_recipe(budget: str, **overrides: Any) -> Recipe:
    """The base recipe of a budget (``method`` unset), with field overrides (e.g. ``train_file=[...]``)."""
    if budget not in BUDGETS:
        raise TrainingError(f"unknown budget {budget!r}; the budgets are {', '.join(BUDGETS)}.")
    return make_recipe(budget_values(budget) | overrides)


def budget_values(budget: str) -> dict[str, Any]:
    spec = BUDGETS[budget]
    return {**recipe_values(spec.recipe), **spec.settings, "name": f"compare-{budget}"}


def method_recipe(base: Recipe, method: str) -> Recipe:
    """``base`` with the preset of ``method`` on top, named ``<base name>-<method>``."""
    return make_recipe({**base.to_dict(), "method": method, "name": f"{base.name}-{method}"})
