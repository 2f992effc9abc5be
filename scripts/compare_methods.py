"""Train several methods at the same budget and compare them: ``scripts/compare_methods.py --budget quick``.

A thin command line over ``balpoe_hf.compare`` (the same as ``balpoe-compare``); ``--help`` lists the
budgets, methods and every option.
"""

import sys

from balpoe_hf.cli import compare_main as main

if __name__ == "__main__":
    sys.exit(main())
