"""``python -m balpoe_hf.train``: the training command line, for ``accelerate launch -m balpoe_hf.train ...``.

The same as the ``balpoe-train`` console script (``balpoe_hf.cli.train_main``).
"""

import sys

from balpoe_hf.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
