"""Serve a Gradio demo of a saved BalPoE model: ``python scripts/demo.py RUN_OR_REPO_ID``.

A thin command line over ``balpoe_hf.demo`` (the same as ``balpoe-demo``); ``--help`` lists every option.
"""

import sys

from balpoe_hf.cli import demo_main as main

if __name__ == "__main__":
    sys.exit(main())
