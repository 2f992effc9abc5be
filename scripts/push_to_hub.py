"""Publish a trained BalPoE run to the Hugging Face Hub: ``python scripts/push_to_hub.py RUN_DIR USER/NAME``.

A thin command line over ``balpoe_hf.hub`` (the same as ``balpoe-push``); ``--help`` lists every option.
"""

import sys

from balpoe_hf.cli import push_main as main

if __name__ == "__main__":
    sys.exit(main())
