"""The data of a run: where the images come from, long-tailed and shifted splits, transforms and loaders.

``loading`` reads the images (the Hub, parquet, imagefolder, split lists, Fashion-MNIST's IDX files) and a
recipe's training data; ``splits`` draws long-tailed training splits, held-out splits and shifted test sets;
``transforms``, ``device_data`` and ``loaders`` turn them into batches; ``prepare`` writes a dataset as
parquet files (``balpoe-prepare-data``).
"""

from .loading import TrainingData, load_fashion_mnist, load_split, load_training_data
from .prepare import prepare_data
from .splits import (
    class_counts,
    holdout_split,
    imbalance_ratio,
    make_long_tailed,
    make_shifted_test,
    shot_groups,
)

__all__ = [
    "TrainingData",
    "class_counts",
    "holdout_split",
    "imbalance_ratio",
    "load_fashion_mnist",
    "load_split",
    "load_training_data",
    "make_long_tailed",
    "make_shifted_test",
    "prepare_data",
    "shot_groups",
]
