"""Image transforms: the training augmentation and the evaluation transform saved with the model.

Training images go through the recipe's augmentation (torchvision transforms on PIL images, in DataLoader
workers, with the optional AutoAugment, RandAugment and Cutout policies); evaluation images through the image
processor saved with the model (``build_processor``), so that a pipeline loaded from the saved folder sees
exactly what the run's evaluation saw. Every image is converted to RGB, so every backbone sees 3 channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .loading import LoaderSplit, TrainingData
from .recipes import Recipe

if TYPE_CHECKING:
    import datasets
    from transformers.image_processing_utils import BaseImageProcessor


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

    ``crop_pct == 1`` (CIFAR-like recipes): ``balpoe_hf.processing.build_image_processor``, a square resize
    to ``image_size``. ``crop_pct < 1`` (ImageNet-like): the ImageNet protocol of resizing the shorter side
    to ``image_size / crop_pct`` and centre-cropping ``image_size``, with transformers'
    ``ConvNextImageProcessor``, which implements exactly that. Both convert to RGB, rescale and normalise.
    """
    from transformers import ConvNextImageProcessor
    from transformers.image_utils import PILImageResampling

    from .processing import build_image_processor

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
