"""What a run's held-out calibration would change if applied to its predictions, as a table.

    python scripts/calibrated_shifts.py runs/compare-cpu-long/bs

Top-1 accuracy on the balanced test set and the shifted ones (as balpoe-evaluate --shifts builds them) of the
uniform-prior logits (none), with the set's true prior added (oracle), with the held-out BCTS calibration
applied (calibrated), and both (calibrated+oracle); above the table, the calibration's temperature and biases
(balpoe_hf.evaluation.calibrated). A run trained without a held-out split has no calibration to apply.
"""

import argparse
import sys

from balpoe_hf.cli.parsing import run_command
from balpoe_hf.evaluation.calibrated import format_calibrated_table, run_calibrated_shifts
from balpoe_hf.evaluation.shifts import parse_shifts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder trained with a held-out split")
    parser.add_argument("--shifts", default="all",
                        help="the test sets, as balpoe-evaluate --shifts (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the shifted sets, as balpoe-evaluate --seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    args = parser.parse_args(argv)
    return run_command(lambda: print(format_calibrated_table(run_calibrated_shifts(
        args.run, parse_shifts(args.shifts), args.device, args.seed))), "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
