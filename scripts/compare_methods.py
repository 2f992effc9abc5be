"""Train several methods at the same budget and compare them: ``scripts/compare_methods.py --budget quick``.

A thin command line over ``balpoe_hf.compare``; ``--help`` lists the budgets, methods and every option.
"""

import sys

from balpoe_hf.compare import main

if __name__ == "__main__":
    sys.exit(main())
