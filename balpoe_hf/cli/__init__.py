"""The console scripts, a module each: ``balpoe-train`` (``train``, with the recipe flags of ``arguments``),
``-evaluate``, ``-push``, ``-demo``, ``-describe-split``, ``-compare`` and ``-prepare-data``; every one reads
its options and ends as ``parsing`` says (one parser style, one exit-status convention)."""

from .compare import compare_main
from .demo import demo_main
from .describe_split import describe_split_main
from .evaluate import evaluate_main
from .prepare_data import prepare_data_main
from .push import push_main
from .train import train_main

__all__ = ["compare_main", "demo_main", "describe_split_main", "evaluate_main", "prepare_data_main",
           "push_main", "train_main"]
