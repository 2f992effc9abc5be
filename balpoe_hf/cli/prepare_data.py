"""``balpoe-prepare-data``: a dataset written as parquet files (``balpoe_hf.data.prepare_data``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data.prepare import DATASETS
from .parsing import ArgumentParser, option, run_command

PREPARE_DESCRIPTION = """Write a dataset as train.parquet and test.parquet in the Hub's layout (--train-file).

    balpoe-prepare-data cifar10 --source ~/data/cifar-10-batches-py --output-dir data/cifar10   # offline
    balpoe-prepare-data cifar10 --output-dir data/cifar10                                      # from the Hub
    balpoe-prepare-data fashion-mnist --output-dir data/fashion-mnist     # Debian's dataset-fashion-mnist

Then: balpoe-train --recipe cifar10-lt-local --train-file data/cifar10/train.parquet \\
          --test-file data/cifar10/test.parquet
"""


@dataclass
class PrepareDataArguments:
    """``balpoe-prepare-data``'s options."""

    dataset: str = field(metadata=option(f"the dataset: {', '.join(DATASETS)}", positional=True,
                                         choices=DATASETS))
    output_dir: str = field(metadata=option("folder for train.parquet and test.parquet"))
    source: str | None = field(default=None, metadata=option(
        "folder of the original files (CIFAR-10: the unpacked python archive, cifar-10-batches-py; "
        "Fashion-MNIST: the four IDX files), or 'hub' (online). Default: Debian's Fashion-MNIST folder, "
        "the Hub for CIFAR-10."))
    overwrite: bool = field(default=False, metadata=option("replace existing parquet files"))


def prepare_data_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-prepare-data``: ``balpoe_hf.data.prepare_data`` from the command line."""
    (args,) = ArgumentParser([PrepareDataArguments], PREPARE_DESCRIPTION).parse(argv)
    return run_command(lambda: _prepare(args), "rerun with --overwrite to write the parquet files again.")


def _prepare(args: PrepareDataArguments) -> None:
    from ..data.prepare import prepare_data

    files = prepare_data(args.dataset, args.output_dir, args.source, overwrite=args.overwrite)
    print("wrote " + " and ".join(str(path) for path in files.values()))
