"""Print a long-tailed split: class counts, imbalance ratio and shot groups.

    python scripts/describe_split.py                       # Fashion-MNIST-LT, imbalance 100
    python scripts/describe_split.py --train-file train.parquet --label-column label --imbalance-ratio 50
"""

from __future__ import annotations

import argparse

import datasets

from balpoe_hf.data import class_counts, imbalance_ratio, load_fashion_mnist, make_long_tailed, shot_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file",
                        help="parquet file of the balanced training split (default: Fashion-MNIST)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--profile", default="exponential", choices=["exponential", "step"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.train_file:
        train = datasets.load_dataset("parquet", data_files={"train": args.train_file}, split="train")
        name = args.train_file
    else:
        train = load_fashion_mnist()["train"]
        name = "Fashion-MNIST"
    split = make_long_tailed(train, args.imbalance_ratio, args.label_column, args.seed, args.profile)
    counts = class_counts(split, args.label_column)
    feature = split.features[args.label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    names = feature.names if is_class_label else [str(i) for i in range(len(counts))]
    groups = shot_groups(counts)

    print(f"{name}-LT ({args.profile}, requested ratio {args.imbalance_ratio:g}, seed {args.seed}): "
          f"{len(split):,} of {len(train):,} training images")
    width = max(len(n) for n in names)
    for cls, (label, count) in enumerate(zip(names, counts, strict=True)):
        group = next(g for g, members in groups.items() if cls in members)
        print(f"  {cls:>3}  {label:<{width}}  {count:>6}  {group}")
    print(f"imbalance ratio {imbalance_ratio(counts):g}; many/medium/few = "
          + "/".join(str(len(groups[g])) for g in ("many", "medium", "few")))


if __name__ == "__main__":
    main()
