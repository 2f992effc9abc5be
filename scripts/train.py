"""Train a BalPoE model with Accelerate: ``accelerate launch scripts/train.py --recipe NAME ...``.

A thin command line over ``balpoe_hf.training.train`` (the same as ``balpoe-train`` and
``python -m balpoe_hf.train``); ``--help`` lists every option.
"""

import sys

from balpoe_hf.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
