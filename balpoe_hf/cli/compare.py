"""``balpoe-compare``: several methods trained at one budget and compared (``balpoe_hf.compare``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..compare.budgets import BUDGETS, DEFAULT_METHODS, Budget, budget_values
from ..compare.runs import EVALUATION_RESERVE, compare, seed_dir, seed_summaries
from ..compare.tables import format_comparison, format_seed_table
from ..errors import TrainingError
from ..recipes import SEED_LIMIT, Recipe, make_recipe
from ..recipes.methods import EVERY_METHOD_FIELDS, METHOD_DESCRIPTIONS, METHODS, parse_methods
from .arguments import build_parser, parse_recipe_flags
from .parsing import option, run_command

COMPARE_DESCRIPTION = f"""Train several methods at the same budget and compare them (balanced accuracy,
many/medium/few, ECE, MCE, NLL; accuracy on label-shifted test sets under each prior mode).

    balpoe-compare --budget quick
    balpoe-compare --budget cpu --train-file D/train.parquet --test-file D/test.parquet
    balpoe-compare --budget paper --train-file ... --test-file ... --time-limit 540

Methods: {', '.join(f'{m} ({METHOD_DESCRIPTIONS[m]})' for m in METHODS)}.
Budgets: {'; '.join(f'{name}: {b.description}' for name, b in BUDGETS.items())}.
Every recipe flag changes the shared base recipe (e.g. --epochs 8 --mixup-alpha 0.4; the mixup of the
'balpoe' method is the base recipe's). Each method trains into OUTPUT_DIR/METHOD as an ordinary resumable run;
a rerun skips finished methods and resumes the others, so a long budget can be run in several jobs with
--time-limit. Results: OUTPUT_DIR/comparison.json, comparison.md and comparison.png.
"""


@dataclass
class CompareArguments:
    """The options of ``balpoe-compare`` that are not recipe fields."""

    _argument_group_name = "comparison"

    budget: Literal["quick", "cpu", "cpu-long", "paper"] = field(default="quick", metadata=option(
        "The base recipe: " + "; ".join(f"{name}: {b.description}" for name, b in BUDGETS.items()) + "."))
    methods: str = field(default=",".join(DEFAULT_METHODS), metadata=option(
        f"Comma list of methods out of {', '.join(METHODS)}."))
    output_dir: str | None = field(default=None, metadata=option(
        "Where every method's run and the comparison go (default: runs/compare-BUDGET)."))
    time_limit: float | None = field(default=None, metadata=option(
        "Wall-clock limit in seconds for this invocation: trainings stop cleanly after an epoch checkpoint "
        f"(keeping {EVALUATION_RESERVE:.0f} s for evaluation); rerun to continue."))
    prior: str | None = field(default=None, metadata=option(
        "Comma list of prior modes to evaluate, or 'all' (default: none, oracle and auto; em instead of auto "
        "without --holdout-fraction)."))
    shifts: str = field(default="all", metadata=option("'all' or a comma list of shifted test sets."))
    seeds: str | None = field(default=None, metadata=option(
        "Comma list of seeds, e.g. 0,1: the comparison once per seed, into OUTPUT_DIR/seed-S, then the mean "
        "and range of each method over the seeds finished so far (replaces --seed)."))


def parse_compare_args(argv: Sequence[str] | None = None) -> tuple[CompareArguments, Recipe, Budget]:
    """The options, the base recipe (budget < command-line flags) and the budget."""
    parser = build_parser(COMPARE_DESCRIPTION, CompareArguments,
                          "%(prog)s [--budget NAME] [--methods LIST] [--FIELD VALUE ...]")
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--budget", default="quick", choices=list(BUDGETS))
    known, _ = first.parse_known_args(argv)
    namespace, settings, given = parse_recipe_flags(parser, argv, budget_values(known.budget))
    args = CompareArguments(**{f.name: getattr(namespace, f.name) for f in fields(CompareArguments)})
    try:
        parse_methods(args.methods)
    except ValueError as error:
        raise TrainingError(f"--methods: {error}") from None
    per_method = [name for name in ("method", *EVERY_METHOD_FIELDS) if name in given]
    if per_method:
        flags = ", ".join("--" + name.replace("_", "-") for name in per_method)
        raise TrainingError(f"{flags}: every method sets these itself; choose the methods with --methods.")
    budget = BUDGETS[args.budget]
    base = make_recipe(settings)
    if budget.needs_files and base.train_file is None:
        raise TrainingError(f"the {args.budget} budget reads CIFAR-10 from local parquet files: pass "
                            "--train-file PATH/train.parquet --test-file PATH/test.parquet (the Hub layout, "
                            "columns img/label).")
    if args.time_limit is not None and args.time_limit <= EVALUATION_RESERVE:
        raise TrainingError(f"--time-limit must exceed {EVALUATION_RESERVE:.0f} s (the time kept for "
                            f"evaluation), got {args.time_limit}.")
    if args.seeds is not None:
        if "seed" in given:
            raise TrainingError("--seed and --seeds: give one of them (--seeds 0,1 runs each seed).")
        parse_seeds(args.seeds)
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / f"compare-{args.budget}")
    return args, base, budget


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; a ``TrainingError`` for anything but distinct integers in ``[0, 2**32)``
    (``recipes.SEED_LIMIT``, numpy's seeds)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) >= SEED_LIMIT or len(set(seeds)) != len(seeds):
        raise TrainingError(f"--seeds must be a comma list of distinct integers from 0 to 2**32 - 1 (numpy's "
                            f"seeds), e.g. 0,1; got {text!r}.")
    return seeds


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-compare``: parse, compare (``balpoe_hf.compare.compare``), print the tables."""
    start = time.time()
    return run_command(lambda: _compare(argv, start), "the finished methods and every run's checkpoints are "
                                                      "kept: rerun the same command to continue.")


def _compare(argv: Sequence[str] | None, start: float) -> None:
    from accelerate import PartialState

    args, base, budget = parse_compare_args(argv)
    deadline = None if args.time_limit is None else start + args.time_limit
    seeds = [base.seed] if args.seeds is None else parse_seeds(args.seeds)
    for seed in seeds:
        recipe = base if args.seeds is None else make_recipe({**base.to_dict(), "seed": seed})
        output_dir = args.output_dir if args.seeds is None else seed_dir(args.output_dir, seed)
        comparison = compare(recipe, args.methods, output_dir, shifts=args.shifts, priors=args.prior,
                             deadline=deadline)
        if PartialState().is_main_process:
            print("\n" + format_comparison(comparison, recipe, budget))
            if comparison.files:
                print(f"\nwrote {', '.join(comparison.files.values())}")
    if args.seeds is not None and PartialState().is_main_process:
        summaries = seed_summaries(args.output_dir, parse_methods(args.methods), seeds)
        print(f"\nBalanced test set over seeds {args.seeds} (mean, range in brackets; seeds finished so "
              "far):\n")
        print(format_seed_table(summaries))
