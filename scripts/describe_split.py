"""Print a long-tailed split: class counts, imbalance ratio and shot groups.

A thin command line over ``balpoe_hf.data`` (the same as ``balpoe-describe-split``); ``--help`` lists every
option.
"""

import sys

from balpoe_hf.cli import describe_split_main as main

if __name__ == "__main__":
    sys.exit(main())
