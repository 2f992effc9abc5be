"""The label-shift figures of several models, one row each, from their balpoe-evaluate reports.

    balpoe-evaluate --model RUN --shifts all --prior all --deployment-sizes 300 --stream 300 \\
        --output RUN/eval/shift.json
    python scripts/label_shift_table.py runs/a/eval/shift.json runs/b/eval/shift.json [--mode auto]

Prints a Markdown table (balpoe_hf.evaluation.shift_summary): the mode's worst gain over 'none' on the full
shifted sets, the oracle's gain it recovers on forward50 / backward50, its worst mean gain on 300-image
batches, on streams of ten such batches, and in the drift scenario.
"""

import argparse
import json
from pathlib import Path

from balpoe_hf.evaluation.shift_summary import format_shift_summaries, shift_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="balpoe-evaluate --output JSON reports")
    parser.add_argument("--mode", default="auto", help="the prior mode to summarise (default: auto)")
    parser.add_argument("--name", action="append", help="a row name per report (default: the run folder)")
    args = parser.parse_args()
    names = args.name or [Path(path).resolve().parent.parent.name for path in args.reports]
    if len(names) != len(args.reports):
        parser.error(f"give one --name per report ({len(args.reports)}), or none.")
    summaries = {name: shift_summary(json.loads(Path(path).read_text()), args.mode)
                 for name, path in zip(names, args.reports, strict=True)}
    print(format_shift_summaries(summaries))


if __name__ == "__main__":
    main()
