"""Learning curves of several runs (finished or still going), as a table and a picture.

    python scripts/training_curves.py runs/paper/balpoe runs/paper/bs runs/paper/balpoe-erm \\
        --every 20 --output docs/images/paper-curves.png [--paper]

Prints how many epochs each run has done and a Markdown table of the balanced test set's accuracy and ECE
every --every epochs (balpoe_hf.evaluation.curves), and with --output draws them against the epoch; --paper
adds the BalPoE paper's CIFAR-10-LT IR100 figures of runs named like its methods (bs, balpoe, balpoe-erm, ce)
as dashed lines.
"""

import argparse
import sys
from pathlib import Path

from balpoe_hf.cli.parsing import run_command
from balpoe_hf.compare.budgets import PAPER_CIFAR10_LT_IR100
from balpoe_hf.evaluation.curves import epochs_done, eval_history, format_curve_table
from balpoe_hf.evaluation.plots import training_curves_plot


def curves(runs: list[str], every: int, output: str | None, paper: bool) -> None:
    histories = {Path(run).name: eval_history(run) for run in runs}
    for run in runs:
        print(f"{Path(run).name}: {epochs_done(run)} epochs done")
    print(format_curve_table(histories, every=every))
    if output:
        reference = None
        if paper:
            keys = ("balanced_accuracy", "ece")
            reference = {name: {key: row[key] for key in keys if key in row}
                         for name, row in PAPER_CIFAR10_LT_IR100.items()}
        print(f"wrote {training_curves_plot(histories, output, reference)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (balpoe-train or balpoe-compare OUTPUT/METHOD)")
    parser.add_argument("--every", type=int, default=20, help="a table row every this many epochs")
    parser.add_argument("--output", help="write the picture here (PNG)")
    parser.add_argument("--paper", action="store_true", help="the paper's final figures as dashed lines")
    args = parser.parse_args(argv)
    return run_command(lambda: curves(args.runs, args.every, args.output, args.paper), "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
