"""How a finished run fits its own training split and its test set, as a table.

    python scripts/training_fit.py runs/compare-paper/balpoe

One row per split (the long-tailed training split the run trained on, seen without augmentation or mixup, and
its recipe's test set): balanced accuracy, accuracy, mean confidence, ECE, NLL and each expert's raw-logit
balanced accuracy (balpoe_hf.evaluation.fit). Far better on the training split than on the test set is
over-fitting; mean confidence below the accuracy on both is under-confidence.
"""

import argparse
import sys

from balpoe_hf.cli.parsing import run_command
from balpoe_hf.evaluation.fit import format_fit_table, run_fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder (balpoe-train or balpoe-compare OUTPUT/METHOD)")
    parser.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(format_fit_table(run_fit(args.run, args.device))), "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
