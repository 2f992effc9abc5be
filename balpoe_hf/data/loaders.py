"""The data loaders of a training run: the device-resident pipeline or PIL in DataLoader workers.

    loaders = build_loaders(recipe, data, processor, accelerator)
    for epoch in range(epochs):
        loaders.set_epoch(epoch)
        for batch in loaders.train:  # {"pixel_values", "labels"} on accelerator.device
            ...

Two pipelines feed the same batches in distribution (``tests/test_device_data.py`` compares them):

- ``"device"``: both splits decoded once to ``uint8`` (``device_data.decode_to_uint8``, cached on disk),
  kept on the training device, and augmented a whole batch at a time there (``DeviceLoader``). No per-image
  Python work and no host-to-device copies: for 32x32 datasets the step, not the data, sets the pace.
- ``"workers"``: each image decoded and augmented with PIL (``transforms.ImageTransform``) in
  ``recipe.num_workers`` DataLoader processes, pinned and copied without blocking on a GPU. The only choice
  for the ``'imagenet'`` augmentation, the policies (AutoAugment, RandAugment, Cutout), evaluation with
  ``crop_pct < 1`` and data too large for memory.

``recipe.data_pipeline="auto"`` (the default) takes the device pipeline whenever it can (``choose_pipeline``).
Either way an epoch's order and augmentation are a function of ``(seed, epoch)`` only, so a resumed run sees
the batches the uninterrupted run would have seen, and under several processes each process draws its own,
disjoint share of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import torch
from torch.utils.data import DataLoader

from ..errors import BadImageError, TrainingError
from .device_data import DECODE_RESIZE, DeviceLoader, decode_to_uint8, device_augment, uint8_nbytes
from .transforms import undecodable_row, with_transforms

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers.image_processing_utils import BaseImageProcessor

    from ..recipes import Recipe
    from .loading import TrainingData

# Largest uint8 size of the two splits together that "auto" keeps on the device. A constant, not a share of
# the device's memory, so that the choice (and with it every batch of the run) depends on the recipe and the
# data only, never on the machine. 4 GiB holds CIFAR-10/100 (0.18 GB with their test sets), Fashion-MNIST,
# SVHN and Tiny-ImageNet (1.2 GB at 64x64) with room to spare on any training GPU, and leaves ImageNet-scale
# data (hundreds of GB at 224x224) to the workers. --data-pipeline device ignores it.
DEVICE_DATA_LIMIT_BYTES = 4 * 2**30


@dataclass(frozen=True)
class PipelineChoice:
    """Which pipeline a run uses (``"device"`` or ``"workers"``) and why, in words for the log."""

    name: str
    reason: str


def device_obstacles(recipe: Recipe) -> list[str]:
    """What in the recipe has no device version (empty when the device pipeline can run it)."""
    obstacles = []
    if recipe.augment not in DECODE_RESIZE:
        obstacles.append(f"the {recipe.augment!r} augmentation (random resized crop from the full-resolution "
                         "image, colour jitter) has none")
    policies = recipe.policy_augmentations()
    if policies:
        obstacles.append(f"the augmentation policies {', '.join(policies)} have none")
    if recipe.crop_pct < 1:
        obstacles.append(f"evaluation with crop_pct {recipe.crop_pct} < 1 (resize, then centre-crop) has "
                         "none")
    return obstacles


def choose_pipeline(recipe: Recipe, num_train: int, num_test: int,
                    limit_bytes: int = DEVICE_DATA_LIMIT_BYTES) -> PipelineChoice:
    """The pipeline ``recipe.data_pipeline`` asks for, for splits of ``num_train`` and ``num_test`` images.

    ``"auto"``: ``"device"`` when the recipe's augmentation and evaluation transform have device versions
    and both splits take at most ``limit_bytes`` as ``uint8`` at ``image_size``, else ``"workers"``.
    ``"device"`` raises ``TrainingError`` when the recipe has no device version; ``"workers"`` is always
    possible.
    """
    nbytes = uint8_nbytes(num_train + num_test, recipe.image_size)
    side = recipe.image_size
    size = f"{num_train + num_test:,} images at {side}x{side} take {nbytes / 1e9:.2f} GB"
    obstacles = device_obstacles(recipe)
    if recipe.data_pipeline == "workers":
        return PipelineChoice("workers", f"--data-pipeline workers, {recipe.num_workers} worker(s)")
    if recipe.data_pipeline == "device":
        if obstacles:
            raise TrainingError(f"--data-pipeline device cannot run this recipe: {'; '.join(obstacles)} on "
                                "the device. Use --data-pipeline workers (or auto, which picks it).")
        return PipelineChoice("device", f"--data-pipeline device; {size} as uint8")
    if obstacles:
        return PipelineChoice("workers", f"auto: no device version ({'; '.join(obstacles)})")
    if nbytes > limit_bytes:
        return PipelineChoice("workers", f"auto: {size} as uint8, over the device pipeline's limit of "
                                         f"{limit_bytes / 2**30:g} GiB (--data-pipeline device ignores it)")
    return PipelineChoice("device", f"auto: {size} as uint8")


def check_batch_fits(recipe: Recipe, num_train: int, num_processes: int) -> None:
    """Refuse a run whose training split makes no full batch (both pipelines drop the last partial one)."""
    if num_train < recipe.batch_size * num_processes:
        raise TrainingError(f"{num_train} training images make no full batch of {recipe.batch_size} x "
                            f"{num_processes} processes; lower --batch-size.")


def decode_split(recipe: Recipe, ds: datasets.Dataset, split: str, resize: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_to_uint8`` of a split; an image that cannot be decoded raises ``BadImageError`` naming its
    row and file, as the worker pipeline does."""
    try:
        return decode_to_uint8(ds, recipe.image_column, recipe.label_column, recipe.image_size, resize=resize)
    except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for a broken image file
        # The worker pipeline's search for the culprit, row by row (only once decoding has failed).
        bad = undecodable_row(ds, recipe.image_column, range(len(ds)))
        if bad is None:
            raise
        raise BadImageError(f"cannot decode the {split} image at row {bad} ({error}); repair or remove it "
                            "from the data.") from None


def device_loaders(recipe: Recipe, data: TrainingData, *, device: torch.device | str, num_processes: int = 1,
                   process_index: int = 0) -> tuple[DeviceLoader, DeviceLoader]:
    """The device pipeline's training and test loaders: this process's share of every batch round.

    The training split is decoded as the recipe's augmentation resizes (``DECODE_RESIZE``), the test split
    as the evaluation processor does (a square resize, ``crop_pct == 1``). Training batches are shuffled and
    augmented from ``(recipe.seed, epoch)``, the last partial round dropped (mixup needs full, even batches);
    test batches keep the dataset order, and under several processes the last round is completed with images
    from the start (``DeviceLoader.num_padded``): keep the first ``len(data.test)`` gathered rows.
    """
    train_images, train_labels = decode_split(recipe, data.train, "train", DECODE_RESIZE[recipe.augment])
    test_images, test_labels = decode_split(recipe, data.test, "test", "squash")
    common = {"mean": recipe.image_mean, "std": recipe.image_std, "num_processes": num_processes,
              "process_index": process_index, "device": device, "channels_last": recipe.channels_last}
    augment = device_augment(recipe.augment, recipe.crop_padding, recipe.hflip, recipe.rotation)
    train = DeviceLoader(train_images, train_labels, recipe.batch_size, augment=augment, seed=recipe.seed,
                         shuffle=True, drop_last=True, **common)
    test = DeviceLoader(test_images, test_labels, recipe.eval_batch_size, shuffle=False, drop_last=False,
                        **common)
    return train, test


def worker_loaders(recipe: Recipe, data: TrainingData, processor: BaseImageProcessor, *,
                   generator: torch.Generator, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """The worker pipeline's training and test ``DataLoader``s (not yet sharded: ``accelerator.prepare``).

    Training order comes from ``generator`` and each image's augmentation from ``(seed, epoch, row)``
    (``transforms.LoaderSplit``), both set every epoch by ``Loaders.set_epoch``, so an epoch's batches depend
    on ``(seed, epoch)`` only.
    """
    train_set, test_set = with_transforms(data, recipe, processor)
    options = {"num_workers": recipe.num_workers, "pin_memory": pin_memory}
    # drop_last: mixup pairs each batch with its reverse and needs an even, full batch.
    train = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                       generator=generator, **options)
    test = DataLoader(test_set, batch_size=recipe.eval_batch_size, persistent_workers=recipe.num_workers > 0,
                      **options)
    return train, test


@dataclass
class Loaders:
    """A run's training and test loaders, ready to iterate on the training device, and their pipeline."""

    train: DeviceLoader | DataLoader
    test: DeviceLoader | DataLoader
    pipeline: PipelineChoice
    seed: int
    shuffle_generator: torch.Generator | None = None  # the worker pipeline's

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over ``train`` epoch ``epoch`` of the run (its order and augmentation)."""
        if self.shuffle_generator is not None:
            self.shuffle_generator.manual_seed(self.seed + epoch)
        # DeviceLoader's own; a prepared DataLoader passes it on to its LoaderSplit (the augmentation).
        self.train.set_epoch(epoch)


def build_loaders(recipe: Recipe, data: TrainingData, processor: BaseImageProcessor,
                  accelerator: Accelerator) -> Loaders:
    """The loaders of ``recipe.data_pipeline`` (``choose_pipeline``) for this process of ``accelerator``.

    Device loaders are built sharded and on ``accelerator.device`` (they must not go through
    ``accelerator.prepare``); the main process decodes first, so that the others read its disk cache.
    Worker loaders go through ``accelerator.prepare``, which shards them and moves their batches (pinned,
    non-blocking where the ``Accelerator`` was told so).
    """
    check_batch_fits(recipe, len(data.train), accelerator.num_processes)
    choice = choose_pipeline(recipe, len(data.train), len(data.test))
    if choice.name == "device":
        with accelerator.main_process_first():
            train, test = device_loaders(recipe, data, device=accelerator.device,
                                         num_processes=accelerator.num_processes,
                                         process_index=accelerator.process_index)
        return Loaders(train, test, choice, recipe.seed)
    generator = torch.Generator()
    train, test = worker_loaders(recipe, data, processor, generator=generator,
                                 pin_memory=accelerator.device.type == "cuda")
    train, test = accelerator.prepare(train, test)
    return Loaders(train, test, choice, recipe.seed, generator)
