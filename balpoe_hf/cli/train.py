"""``balpoe-train`` (and ``python -m balpoe_hf.train``): the run options and the recipe flags
(``arguments``), then ``balpoe_hf.training.train``."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..training.resume import resume_hint
from .arguments import parse_args
from .parsing import EXIT_OK, run_command

TRAIN_DESCRIPTION = """Train a BalPoE model (Balanced Product of Calibrated Experts) with Accelerate.

    balpoe-train --list-recipes                 # the shipped recipes, one line each
    accelerate launch -m balpoe_hf.train --recipe fashion-mnist-lt-quick --output-dir runs/fmnist
    accelerate launch -m balpoe_hf.train --recipe cifar10-lt-local \\
        --train-file data/cifar10/train.parquet --test-file data/cifar10/test.parquet
    accelerate launch --multi_gpu --num_processes 4 -m balpoe_hf.train --recipe cifar100-lt-ir100 --epochs 5
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m balpoe_hf.train --config my.yaml

Every recipe field has a flag (--lambdas 1 0 -1 --mixup-alpha 0.4 ...); after --recipe/--config, --help shows
the resolved values. The output directory gets the model (save_pretrained, loadable with
AutoModelForImageClassification) with its image processor, recipe.yaml, train_results.json, eval_results.json
(the balanced test set) and one checkpoint per epoch (--checkpoint-every-steps N adds some inside epochs;
the last few are kept) for --resume.

A refused setting or input stops the run with a short message and exit status 2, before any work where it
can be seen up front; a failure part-way (a full disk, a diverged run) exits with 1. accelerate's launcher
follows a failed run with its own traceback: `accelerate launch --quiet` (-q) leaves the message alone.
"""


def list_recipes() -> str:
    """The shipped recipes, one ``name  description`` line each (``balpoe-train --list-recipes``)."""
    from ..recipes import available_recipes, recipe_values

    names = available_recipes()
    width = max(len(name) for name in names)
    return "\n".join(f"{name:<{width}}  {recipe_values(name).get('description', '')}" for name in names)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-train``: parse the run options and the recipe, then ``balpoe_hf.training.train``."""
    from ..training.loop import train

    if "--list-recipes" in (sys.argv[1:] if argv is None else argv):
        print(list_recipes())
        return EXIT_OK
    start, output_dir = time.time(), []

    def body() -> None:
        run, recipe = parse_args(argv, description=TRAIN_DESCRIPTION)
        output_dir.append(Path(run.output_dir))
        deadline = None if run.time_limit is None else start + run.time_limit
        train(recipe, output_dir[0], resume=run.resume, overwrite=run.overwrite, report_to=run.report_to,
              push_to_hub=run.push_to_hub, hub_model_id=run.hub_model_id, deadline=deadline)

    return run_command(body, lambda: resume_hint(output_dir[0]) if output_dir else "")
