"""The image processor saved next to a BalPoE model, so ``pipeline("image-classification", model=dir)`` works.

It is a standard transformers ``ViTImageProcessor`` (no remote code): convert to RGB (grayscale images such
as Fashion-MNIST become three identical channels, matching the training transforms), resize to a square
``image_size``, scale to [0, 1] and normalise with the backbone's (or the recipe's) mean and std.
``BalPoEPreTrainedModel.save_pretrained`` saves it from the config when the folder has none.

This module is also shipped as remote code next to a saved model (the model module imports it): it imports
transformers only.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedConfig, ViTImageProcessor
from transformers.image_utils import PILImageResampling

RESAMPLE = {"nearest": PILImageResampling.NEAREST, "bilinear": PILImageResampling.BILINEAR,
            "bicubic": PILImageResampling.BICUBIC}


def build_image_processor(config_or_size: PreTrainedConfig | int, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None,
                          resample: str = "bilinear") -> ViTImageProcessor:
    """An image processor for a BalPoE model.

    Args:
        config_or_size: a BalPoE model's config (its ``image_size``, ``image_mean``, ``image_std``) or the
            square input size in pixels.
        mean, std: per-channel RGB normalisation; override the config's values, required with a bare size.
        resample: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``.

    ``processor.save_pretrained(model_dir)`` next to ``model.save_pretrained(model_dir)`` makes the folder
    usable with ``pipeline("image-classification", model=model_dir)``.
    """
    # Any transformers config, not only this module's BalPoEConfig: a model loaded with trust_remote_code has
    # its config class from another remote-code module (another hash) than the one that imports this file.
    if isinstance(config_or_size, PreTrainedConfig):
        size = getattr(config_or_size, "image_size", None)
        mean = getattr(config_or_size, "image_mean", None) if mean is None else mean
        std = getattr(config_or_size, "image_std", None) if std is None else std
    else:
        size = config_or_size
    if mean is None or std is None:
        raise ValueError("pass mean and std with a bare image size, or a BalPoE model's config (which has "
                         "image_mean and image_std).")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image size must be a positive integer number of pixels, got {size!r}.")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"mean and std need one value per RGB channel (images are converted to RGB), got {mean} and "
            f"{std}."
        )
    if any(v <= 0 for v in std):
        raise ValueError(f"std must be positive, got {std}.")
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}.")
    return ViTImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"height": size, "width": size},
        resample=RESAMPLE[resample], do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=mean, image_std=std,
    )
