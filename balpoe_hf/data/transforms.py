"""Image transforms: the training augmentation and the evaluation transform saved with the model, and the
splits of the worker pipeline's ``DataLoader`` (``LoaderSplit``), which apply them.

Training images go through the recipe's augmentation (torchvision transforms on PIL images, in DataLoader
workers, with the optional AutoAugment, RandAugment and Cutout policies); evaluation images through the image
processor saved with the model (``build_processor``), so that a pipeline loaded from the saved folder sees
exactly what the run's evaluation saw. Every image is converted to RGB, so every backbone sees 3 channels.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from PIL import Image

from ..errors import BadImageError

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

    from ..recipes import Recipe
    from .loading import TrainingData


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, the input of every pipeline (grayscale becomes three equal channels).

    16-bit grayscale (PIL's modes ``I;16``, ``I;16B``, ...; and ``I``, as which PIL reads some 16-bit files,
    when a value exceeds 255) is scaled from 0-65535 to 0-255 first: PIL's ``convert`` clips it at 255
    instead, which turns a 16-bit PNG into a nearly white image.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or pixels.max(initial=0) > 255:
            pixels = pixels / 257
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def build_processor(recipe: Recipe) -> BaseImageProcessor:
    """The image processor saved with the model, and the evaluation transform of the training run.

    ``crop_pct == 1`` (CIFAR-like recipes): ``balpoe_hf.build_image_processor``, a square resize
    to ``image_size``. ``crop_pct < 1`` (ImageNet-like): the ImageNet protocol of resizing the shorter side
    to ``image_size / crop_pct`` and centre-cropping ``image_size``, with transformers'
    ``ConvNextImageProcessor``, which implements exactly that. Both convert to RGB, rescale and normalise.
    """
    from transformers import ConvNextImageProcessor
    from transformers.image_utils import PILImageResampling

    from ..models.balpoe.processing import build_image_processor

    if recipe.crop_pct == 1:
        return build_image_processor(recipe.image_size, recipe.image_mean, recipe.image_std)
    return ConvNextImageProcessor(
        do_convert_rgb=True, size={"shortest_edge": recipe.image_size}, crop_pct=recipe.crop_pct,
        resample=PILImageResampling.BILINEAR, image_mean=recipe.image_mean, image_std=recipe.image_std,
    )


# AutoAugment fills what rotations, shears and translations uncover with grey, as the official BalPoE code's
# CIFAR10Policy does (torchvision's default is black).
AUTO_AUGMENT_FILL = [128, 128, 128]


def policy_steps(recipe: Recipe) -> list[Callable]:
    """The recipe's AutoAugment or RandAugment step on PIL images (empty when neither is on).

    AutoAugment is torchvision's ``AutoAugment`` with the named policy (the CIFAR-10 policy is the one the
    official BalPoE code applies for the longer CIFAR training). RandAugment is timm's
    ``rand_augment_transform``, not torchvision's ``RandAugment``: the official code (through PaCo) uses a
    copy of timm's, whose ops, 0.5 chance per op and Gaussian magnitude noise (``mstd``) torchvision's
    lacks. Its fill colour is the recipe's mean, timm's convention.
    """
    from timm.data import rand_augment_transform
    from torchvision import transforms as T

    if recipe.auto_augment != "none":
        policy = T.AutoAugmentPolicy(recipe.auto_augment)
        return [T.AutoAugment(policy, fill=AUTO_AUGMENT_FILL)]
    if recipe.rand_augment is not None:
        fill = tuple(min(255, round(255 * m)) for m in recipe.image_mean)
        return [rand_augment_transform(recipe.rand_augment, {"img_mean": fill})]
    return []


def cutout(side: int, image_size: int) -> Callable:
    """Cutout (DeVries & Taylor, 2017) of one ``side`` x ``side`` square on a ``[0, 1]`` tensor, set to 0.

    torchvision's ``RandomErasing`` with a fixed square area: unlike the original Cutout, whose square may
    hang over the border (and so erase less), it always erases the full square inside the image.
    """
    from torchvision import transforms as T

    area = side * side / (image_size * image_size)
    return T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)


class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: images -> normalised RGB tensors ``(3, H, W)``.

    Training images go through the recipe's augmentation (torchvision); evaluation images through the
    image processor saved with the model, so that the pipeline sees exactly what the evaluation saw.
    """

    def __init__(self, recipe: Recipe, processor: BaseImageProcessor | None = None):
        from torchvision import transforms as T

        self.image_column, self.label_column = recipe.image_column, recipe.label_column
        self.processor, self.transform = processor, None
        if processor is not None:
            return
        size = recipe.image_size
        if recipe.augment == "cifar":
            steps = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=recipe.crop_padding)]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
            if recipe.rotation:
                steps.append(T.RandomRotation(recipe.rotation))
        elif recipe.augment == "imagenet":
            steps = [T.RandomResizedCrop(size)]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
            if recipe.color_jitter:
                steps.append(T.ColorJitter(recipe.color_jitter, recipe.color_jitter, recipe.color_jitter))
        else:
            steps = [T.Resize((size, size))]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
        steps += policy_steps(recipe)
        steps.append(T.ToTensor())
        if recipe.cutout:
            steps.append(cutout(recipe.cutout, size))
        steps.append(T.Normalize(recipe.image_mean, recipe.image_std))
        self.transform = T.Compose(steps)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [to_rgb(image) for image in batch[self.image_column]]
        if self.processor is not None:
            pixel_values = list(self.processor(images=images, return_tensors="pt")["pixel_values"])
        else:
            pixel_values = [self.transform(image) for image in images]
        return {"pixel_values": pixel_values, "labels": batch[self.label_column]}


# --------------------------------------------------------------------------- a split for a DataLoader


def epoch_seed(seed: int, epoch: int) -> int:
    """The 64-bit seed of epoch ``epoch`` of a run seeded ``seed``, from which both data pipelines draw the
    epoch's order and augmentation (``LoaderSplit``, ``device_data.DeviceLoader``).

    Through numpy's ``SeedSequence``, so that no two pairs share a stream (``seed + epoch`` would give seed
    1 / epoch 0 the stream of seed 0 / epoch 1).
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def _caller_random_state_kept() -> Iterator[None]:
    """Run the block and restore the states of torch's CPU generator, numpy's and Python's ``random``."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _seed_generators(seed: int) -> None:
    """Seed torch's CPU generator, Python's ``random`` and numpy's global generator with a 63-bit seed."""
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed >> 32, seed & 0xFFFFFFFF])


class LoaderSplit(torch.utils.data.Dataset):
    """A split and its transform as the dataset of a ``DataLoader``: reproducible, and bad images named.

    ``transform`` maps a batch ``{column: values}`` of ``columns`` (images decoded by the ``datasets.Image``
    feature) to a batch of model inputs, like a ``Dataset.with_transform`` function. With a ``seed``
    (training) every image is transformed with the global generators that augmentations draw from (torch's
    CPU generator for torchvision, Python's ``random`` and numpy's for timm's RandAugment) seeded from
    ``(seed, epoch, row)`` (``set_epoch``; accelerate's prepared loaders pass their ``set_epoch`` on, and
    ``DataLoader`` workers, started afresh every epoch, receive it); the caller's states of the three are
    restored afterwards. An image's augmentation is then a function of the seed, the epoch and its row
    only: not of the batch it is drawn in, the worker or process that loads it, nor the batches loaded
    before it, so a run resumed inside an epoch (``skip_first_batches`` skips batches without loading them)
    and a run on another number of processes augment every image as the uninterrupted single-process run
    does. Without a seed (evaluation) a batch is transformed at once. An image that cannot be decoded
    raises ``BadImageError`` naming the split, the row and the image file instead of a bare PIL error.
    """

    def __init__(self, ds: datasets.Dataset, transform: Callable[[dict], dict], columns: Sequence[str],
                 split: str, seed: int | None = None):
        self.ds, self.transform = ds.select_columns(list(columns)), transform
        self.split, self.seed, self.image_column = split, seed, columns[0]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation the next batches get."""
        self.epoch = epoch
        # A 63-bit base per (seed, epoch); rows add to it, as DataLoader workers add their id to a base seed.
        self._base = epoch_seed(self.seed or 0, epoch) >> 1

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(index) for index in indices]
        try:
            batch = self.ds[indices]
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for a broken image file
            bad = undecodable_row(self.ds, self.image_column, indices)
            if bad is None:
                raise
            raise BadImageError(f"cannot decode the {self.split} image at row {bad} ({error}); repair or "
                                "remove it from the data.") from None
        if self.seed is None:
            out = self.transform(batch)
        else:
            parts = []
            with _caller_random_state_kept():
                for position, row in enumerate(indices):
                    _seed_generators(self._base + row)
                    one = {column: [values[position]] for column, values in batch.items()}
                    parts.append(self.transform(one))
            out = {key: [value for part in parts for value in part[key]] for key in parts[0]}
        return [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]


def undecodable_row(ds: datasets.Dataset, image_column: str, indices: Iterable[int]) -> str | None:
    """The first of ``indices`` whose image in ``ds`` does not decode, with its file name where known (for the
    message of a ``BadImageError``); ``None`` if they all decode."""
    images = ds.select_columns([image_column])
    for index in indices:
        try:
            images[index]
        except (OSError, ValueError, SyntaxError):  # PIL's errors for a broken image file
            encoded = images.cast_column(image_column, datasets.Image(decode=False))
            path = encoded[index][image_column].get("path")
            return f"{index}" + (f", file {path}" if path else "")
    return None


def with_transforms(data: TrainingData, recipe: Recipe, processor: BaseImageProcessor
                    ) -> tuple[LoaderSplit, LoaderSplit]:
    """The two splits with their on-the-fly transforms (only the image and label columns are read), as
    ``DataLoader`` datasets; the training augmentation is seeded per image from ``(seed, epoch, row)``
    (``LoaderSplit``: call ``set_epoch`` every epoch)."""
    columns = [recipe.image_column, recipe.label_column]
    train = LoaderSplit(data.train, ImageTransform(recipe), columns, "train", seed=recipe.seed)
    return train, evaluation_split(data.test, recipe, processor, "test")


def evaluation_split(ds: datasets.Dataset, recipe: Recipe, processor: BaseImageProcessor, name: str
                     ) -> LoaderSplit:
    """An evaluated split (test, held out) as a ``DataLoader`` dataset through the evaluation transform."""
    columns = [recipe.image_column, recipe.label_column]
    return LoaderSplit(ds, ImageTransform(recipe, processor), columns, name)
