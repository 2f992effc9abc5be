"""The console scripts: ``balpoe-train``, ``-evaluate``, ``-push``, ``-demo``, ``-describe-split``,
``-compare`` and ``-prepare-data``."""

from .commands import (
    compare_main,
    demo_main,
    describe_split_main,
    evaluate_main,
    prepare_data_main,
    push_main,
    train_main,
)

__all__ = ["compare_main", "demo_main", "describe_split_main", "evaluate_main", "prepare_data_main",
           "push_main", "train_main"]
