"""Evaluate a saved BalPoE model on a balanced test set and on label-shifted versions of it.

A thin command line over ``balpoe_hf.evaluation`` (the same as ``balpoe-evaluate``); ``--help`` lists every
option.
"""

import sys

from balpoe_hf.cli import evaluate_main as main

if __name__ == "__main__":
    sys.exit(main())
