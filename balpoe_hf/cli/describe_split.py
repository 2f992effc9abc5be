"""``balpoe-describe-split``: a long-tailed split class by class (``balpoe_hf.data``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD
from .parsing import ArgumentParser, option, run_command

DESCRIBE_DESCRIPTION = """Print a long-tailed split: class counts, imbalance ratio and shot groups.

    balpoe-describe-split                       # Fashion-MNIST-LT, imbalance 100
    balpoe-describe-split --train-file train.parquet --label-column label --imbalance-ratio 50
"""


@dataclass
class DescribeSplitArguments:
    """``balpoe-describe-split``'s options."""

    train_file: list[str] | None = field(default=None, metadata=option(
        "parquet file(s) or an imagefolder directory of the balanced training split (default: "
        "Fashion-MNIST)"))
    label_column: str = field(default="label", metadata=option("column of the class labels"))
    imbalance_ratio: float = field(default=100.0, metadata=option(
        "largest over smallest class count of the long-tailed split"))
    profile: Literal["exponential", "step"] = field(default="exponential", metadata=option(
        "how the class counts fall from the head to the tail"))
    seed: int = field(default=0, metadata=option("seed of the subsampling"))
    many: int = field(default=MANY_SHOT_THRESHOLD, metadata=option(
        "many-shot: more training images than this"))
    few: int = field(default=FEW_SHOT_THRESHOLD, metadata=option("few-shot: fewer training images than this"))


def describe_split_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-describe-split``: ``make_long_tailed`` of a training split, class by class."""
    (args,) = ArgumentParser([DescribeSplitArguments], DESCRIBE_DESCRIPTION).parse(argv)
    # make_long_tailed's ValueError names a bad ratio or a class it would empty; FileNotFoundError a file.
    return run_command(lambda: _describe(args), "nothing was written.",
                       errors=(ValueError, FileNotFoundError))


def _describe(args: DescribeSplitArguments) -> None:
    import datasets

    from ..data.loading import load_fashion_mnist, load_split
    from ..data.splits import class_counts, imbalance_ratio, make_long_tailed, shot_groups

    if args.train_file:
        train, name = load_split(files=args.train_file, split="train")
    else:
        train, name = load_fashion_mnist()["train"], "Fashion-MNIST"
    split = make_long_tailed(train, args.imbalance_ratio, args.label_column, args.seed, args.profile)
    counts = class_counts(split, args.label_column)
    feature = split.features[args.label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    names = feature.names if is_class_label else [str(i) for i in range(len(counts))]
    groups = shot_groups(counts, args.many, args.few)

    print(f"{name}-LT ({args.profile}, requested ratio {args.imbalance_ratio:g}, seed {args.seed}): "
          f"{len(split):,} of {len(train):,} training images")
    width = max(len(n) for n in names)
    for cls, (label, count) in enumerate(zip(names, counts, strict=True)):
        group = next(g for g, members in groups.items() if cls in members)
        print(f"  {cls:>3}  {label:<{width}}  {count:>6}  {group}")
    print(f"imbalance ratio {imbalance_ratio(counts):g}; many/medium/few = "
          + "/".join(str(len(groups[g])) for g in ("many", "medium", "few")))
