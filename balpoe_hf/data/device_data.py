"""Small-image datasets held in memory as ``uint8`` and augmented in batches on the training device.

Decoding and augmenting each image with PIL in ``DataLoader`` workers is the bottleneck for 32x32 images
(CIFAR, Fashion-MNIST): the model step is far cheaper than the per-image Python work. Such datasets fit in
memory as ``uint8`` (CIFAR-100's 50,000 training images take 154 MB), so they are

1. decoded once (``decode_to_uint8``: RGB, resized to the model's size) and cached on disk next to the
   ``datasets`` cache, so that later runs skip the decoding;
2. kept on the device as ``uint8`` and augmented one batch at a time (``DeviceAugment``) with the
   ``'cifar'`` recipe of the PIL pipeline (zero-padded random crop, horizontal flip, rotation), each image
   with its own random parameters;
3. served by ``DeviceLoader``, whose epoch (order and every augmentation parameter) is a function of
   ``(seed, epoch)`` only, drawn on the CPU, so that CPU and GPU runs see the same batches and a run
   resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.

Not available on the device (the training loop keeps the PIL pipeline in workers for these): the
``'imagenet'`` augmentation (``RandomResizedCrop`` needs the full-resolution image, and ``ColorJitter``),
evaluation with ``crop_pct < 1`` (resize then centre-crop at evaluation), and datasets too large for memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState

from .splits import labels_array
from .transforms import epoch_seed

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # bump when the decoded content for the same key changes
RESIZE_MODES = ("crop", "squash")
# How each training augmentation of the recipe resizes before its random part: 'cifar' is
# Resize(size) + CenterCrop(size), 'none' is Resize((size, size)); 'imagenet' has no device version.
DECODE_RESIZE = {"cifar": "crop", "none": "squash"}


# --------------------------------------------------------------------------- decoding and the disk cache


def uint8_nbytes(num_images: int, image_size: int) -> int:
    """Bytes that ``num_images`` RGB ``image_size`` x ``image_size`` images and their labels take."""
    return num_images * (3 * image_size * image_size + 8)  # uint8 pixels + an int64 label


def _check_image_column(ds: datasets.Dataset, image_column: str) -> None:
    if image_column not in ds.column_names:
        raise ValueError(f"dataset has no image column {image_column!r}; its columns are {ds.column_names}. "
                         "Pass the right name with image_column=...")
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise TypeError(f"column {image_column!r} holds {feature}, not images (a datasets.Image feature); "
                        "pass the image column with image_column=..., or cast it with "
                        f"ds.cast_column({image_column!r}, datasets.Image()).")


def cache_file(ds: datasets.Dataset, image_column: str, label_column: str, image_size: int,
               resize: str = "crop", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``decode_to_uint8`` caches a split: ``cache_dir`` if given, else the directory of the dataset's
    Arrow cache files, else ``HF_DATASETS_CACHE``.

    The name hashes the dataset's fingerprint (which changes with its content and with every ``select``,
    ``filter`` or ``map``), the two columns, the size, the resize mode and ``CACHE_FORMAT_VERSION``.
    """
    key = {"fingerprint": ds._fingerprint, "image_column": image_column, "label_column": label_column,
           "image_size": image_size, "resize": resize, "version": CACHE_FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    if cache_dir is not None:
        directory = Path(cache_dir)
    elif ds.cache_files:
        directory = Path(ds.cache_files[0]["filename"]).parent
    else:
        directory = Path(datasets.config.HF_DATASETS_CACHE)
    return directory / f"balpoe-uint8-{digest}.safetensors"


def _decode(ds: datasets.Dataset, image_column: str, image_size: int, resize: str) -> torch.Tensor:
    """The images as ``uint8 (N, 3, size, size)``, through the same PIL operations as the training path."""
    from torchvision import transforms as T

    from .transforms import to_rgb

    # The deterministic head of the training transform, so that the device pipeline starts from the same
    # pixels as the PIL one (both are identities for images already at the size).
    if resize == "crop":
        resize_op = T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])
    else:
        resize_op = T.Resize((image_size, image_size))
    out = np.empty((len(ds), image_size, image_size, 3), dtype=np.uint8)
    # with_format(None) drops any transform set on the dataset: the column decodes to PIL images.
    images = ds.select_columns([image_column]).with_format(None)
    start = 0
    for batch in images.iter(batch_size=1000):
        for image in batch[image_column]:
            out[start] = np.asarray(resize_op(to_rgb(image)))
            start += 1
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial file, and
    processes decoding the same split at once each replace the file with the same complete content."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def decode_to_uint8(ds: datasets.Dataset, image_column: str, label_column: str, image_size: int,
                    cache_dir: str | os.PathLike | None = None,
                    resize: str = "crop") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split once into ``(images uint8 (N, 3, size, size), labels int64 (N,))``, with a disk cache.

    Every image is converted to RGB (grayscale images get three equal channels) and resized as the PIL
    training path does before its random part: ``resize="crop"`` is ``Resize(size)`` + ``CenterCrop(size)``
    (the ``'cifar'`` augmentation), ``"squash"`` is ``Resize((size, size))`` (the ``'none'`` augmentation
    and the evaluation processor with ``crop_pct == 1``); for square images both are the same.

    The result is cached in ``cache_file(...)`` (a safetensors file, written atomically), so a second call
    on the same dataset loads it instead of decoding. A cache directory that cannot be written only costs
    the caching (a warning). Under multi-process training, decode on the main process first
    (``accelerator.main_process_first()``) so that the other processes load the cache.
    """
    from safetensors.torch import load_file

    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer number of pixels, got {image_size!r}.")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}.")
    _check_image_column(ds, image_column)
    path = cache_file(ds, image_column, label_column, image_size, resize, cache_dir)
    if path.is_file():
        tensors = load_file(path)
        logger.info("loaded %d decoded images from %s", len(tensors["labels"]), path)
        return tensors["images"], tensors["labels"]
    labels = torch.from_numpy(labels_array(ds, label_column))
    images = _decode(ds, image_column, image_size, resize)
    metadata = {"fingerprint": ds._fingerprint, "image_column": image_column, "label_column": label_column,
                "image_size": str(image_size), "resize": resize, "version": str(CACHE_FORMAT_VERSION)}
    try:
        _write_atomically(path, {"images": images, "labels": labels}, metadata)
        logger.info("decoded %d images into %s", len(labels), path)
    except OSError as error:
        logger.warning("could not cache the decoded images in %s (%s); the next run decodes them again",
                       path, error)
    return images, labels


# --------------------------------------------------------------------------- batched augmentation


@dataclass(frozen=True)
class AugmentParams:
    """Per-image random parameters of ``DeviceAugment``, one row per image.

    ``offsets (N, 2) int64``: the crop's top and left corner in the zero-padded image, in
    ``[0, 2 * padding]``; ``flips (N,) bool``: horizontal flips; ``angles (N,) float32``: rotations in
    degrees, counter-clockwise.
    ``cos`` and ``sin`` (``float32``) of the angles are computed on the CPU once, so that every device
    rotates with the very same numbers.
    """

    offsets: torch.Tensor
    flips: torch.Tensor
    angles: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_values(cls, offsets: torch.Tensor, flips: torch.Tensor, angles: torch.Tensor) -> AugmentParams:
        """Parameters from given crop offsets, flips and angles (CPU tensors of ``N`` rows)."""
        radians = torch.deg2rad(angles.double())
        return cls(offsets.long(), flips.bool(), angles.float(), radians.cos().float(), radians.sin().float())

    def __len__(self) -> int:
        return len(self.flips)

    def __getitem__(self, index: slice | torch.Tensor) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class DeviceAugment:
    """The ``'cifar'`` training augmentation on ``uint8`` batches, with per-image random parameters.

    It equals torchvision's PIL pipeline ``RandomCrop(size, padding=crop_padding)`` (zero padding), then
    ``RandomHorizontalFlip()`` if ``hflip``, then ``RandomRotation(rotation)`` if ``rotation`` (nearest
    neighbour, about the centre, zero fill, same size) in distribution, and pixel for pixel given the same
    parameters (up to the rounding of source coordinates that fall on a pixel border: PIL's fixed-point
    rotation differs on about 1 pixel in 10,000, torchvision's tensor rotation on a few in a million).

    Written by hand because the ecosystem lacks it: torchvision's transforms (v1 and v2) draw one set of
    parameters per call, so a batch tensor gets the same crop, flip and angle for every image, and a
    per-image loop would launch several kernels per image; timm's batch augmentations (mixup, random
    erasing) include no crop, flip or rotation; kornia has per-image ones but is not a dependency. Here
    the three geometric steps compose into one source pixel per output pixel, so a batch costs one
    gather: output pixel ``(y, x)`` reads

    - rotation (the inverse map, as PIL and torchvision compute it): the point ``(x + 0.5, y + 0.5)``
      rotated by ``-angle`` about the image centre, floored to the pixel containing it;
    - flip: column ``c`` -> ``W - 1 - c``;
    - crop: ``(r, c)`` -> ``(r + top - padding, c + left - padding)`` in the unpadded image;

    and is zero where the rotation or the crop reads outside the image.
    """

    crop_padding: int = 4
    hflip: bool = True
    rotation: float = 0.0

    def __post_init__(self):
        padding = self.crop_padding
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}.")
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation must be a number of degrees in [0, 180], got {self.rotation!r}.")

    def sample(self, num: int, generator: torch.Generator) -> AugmentParams:
        """Draw parameters for ``num`` images from a CPU generator, as torchvision's transforms draw theirs
        (offsets uniform on ``[0, 2 * padding]``, flips with probability 0.5, angles uniform on
        ``[-rotation, rotation]``). All three are drawn whatever the settings, so the draws do not depend on
        which steps are switched on."""
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (num, 2), generator=generator)
        flips = torch.rand(num, generator=generator) < 0.5
        angles = torch.empty(num).uniform_(-self.rotation, self.rotation, generator=generator)
        return AugmentParams.from_values(offsets, flips, angles)

    def __call__(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment ``uint8 (B, C, H, W)`` images with ``B`` rows of parameters (on the images' device)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be a uint8 (B, C, H, W) tensor, got {images.dtype} "
                            f"{tuple(images.shape)}.")
        if len(params) != len(images):
            raise ValueError(f"{len(params)} rows of parameters for {len(images)} images.")
        b, c, h, w = images.shape
        device = images.device
        rows = torch.arange(h, device=device).view(1, h, 1).expand(b, h, w)
        cols = torch.arange(w, device=device).view(1, 1, w).expand(b, h, w)
        valid = torch.ones(b, h, w, dtype=torch.bool, device=device)
        if self.rotation:
            # Offsets from the centre are half-integers, exact in float32; each product and sum is its own
            # elementwise op (no fused multiply-add), so CPU and CUDA round them alike.
            dx = (cols.float() + 0.5) - w / 2
            dy = (rows.float() + 0.5) - h / 2
            cos, sin = params.cos.view(b, 1, 1), params.sin.view(b, 1, 1)
            cols = torch.floor((cos * dx - sin * dy) + w / 2).long()
            rows = torch.floor((sin * dx + cos * dy) + h / 2).long()
            valid = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        if self.hflip:
            cols = torch.where(params.flips.view(b, 1, 1), w - 1 - cols, cols)
        if self.crop_padding:
            rows = rows + (params.offsets[:, 0].view(b, 1, 1) - self.crop_padding)
            cols = cols + (params.offsets[:, 1].view(b, 1, 1) - self.crop_padding)
            valid &= (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        out = images.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
        return torch.where(valid.unsqueeze(1), out, 0)


def device_augment(augment: str, crop_padding: int = 4, hflip: bool = True,
                   rotation: float = 0.0) -> DeviceAugment:
    """The device version of a recipe's training augmentation (``'cifar'`` or ``'none'``).

    Decode the split with ``resize=DECODE_RESIZE[augment]``. ``'imagenet'`` (random resized crop from the
    full-resolution image, colour jitter) has none and raises ``ValueError``: keep the PIL pipeline for it.
    """
    if augment == "cifar":
        return DeviceAugment(crop_padding, hflip, rotation)
    if augment == "none":
        return DeviceAugment(0, hflip, 0.0)
    raise ValueError(f"augmentation {augment!r} has no device version (only {sorted(DECODE_RESIZE)}); "
                     "use the DataLoader pipeline for it.")


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``uint8`` images -> ``float32`` ``(x / 255 - mean) / std``, the operations of ``ToTensor`` and
    ``Normalize`` in their order, so the result is the same to the bit. ``mean``, ``std``: ``(C,)``."""
    x = images.float().div(255)
    return x.sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))


# --------------------------------------------------------------------------- the loader


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded with ``transforms.epoch_seed(seed, epoch)``."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _check_loader_inputs(images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                         std: Sequence[float], seed: int, num_processes: int, process_index: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"images must be a uint8 tensor (N, 3, H, W) (see decode_to_uint8), got "
                        f"{_describe(images)}.")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dimension 1, got {_describe(images)}.")
    if len(images) == 0:
        raise ValueError("no images to load.")
    is_tensor = isinstance(labels, torch.Tensor)
    if not is_tensor or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be an int64 tensor of shape ({len(images)},), got "
                         f"{_describe(labels)}.")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values (RGB), std positive; got {list(mean)} and {list(std)}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError("need batch_size >= 1 and 0 <= process_index < num_processes, got batch_size "
                         f"{batch_size}, process_index {process_index}, num_processes {num_processes}.")


class DeviceLoader(DataLoaderStateMixin):
    """Batches of normalised images from ``uint8`` images kept on the device, augmented there.

    Args:
        images: ``uint8 (N, 3, H, W)`` (``decode_to_uint8``); moved to ``device`` once and kept as ``uint8``.
        labels: ``int64 (N,)``.
        batch_size: images per batch and process.
        mean, std: per-channel normalisation (3 values each).
        augment: a ``DeviceAugment``, or ``None`` for none (evaluation).
        seed: with the epoch (``set_epoch``), the only source of the order and of the augmentation.
        shuffle: a new permutation every epoch (else the dataset order).
        drop_last: drop the last, incomplete round of batches. Else every image is served; a single process
            gets a smaller last batch, several processes get full batches, the last round completed with
            images from the start of the epoch (as accelerate does) and ``num_padded`` says how many.
        num_processes, process_index: this process's share. The epoch's batches ``g = 0, 1, ...`` (batch
            ``g`` holds positions ``[g * batch_size, (g + 1) * batch_size)`` of the epoch's order) go round
            robin: process ``p`` gets batches ``p, p + num_processes, ...``, as accelerate's sharded
            ``DataLoader`` hands them out. The order and every image's parameters do not depend on the
            number of processes, so ``num_processes`` runs share one epoch, disjointly.
        device: where the batches are built (default: the images' device).
        channels_last: return ``pixel_values`` in ``torch.channels_last`` memory format.

    ``for batch in loader`` yields ``{"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}`` on the
    device; ``loader.batches(start=k)`` yields batches ``k, k + 1, ...`` of the same epoch (mid-epoch
    resume). Do not pass the loader to ``accelerator.prepare``: it is already sharded and on the device.

    Like accelerate's prepared loaders (``DataLoaderStateMixin``), it tells accelerate's ``GradientState``
    while it is iterated and when it serves its last batch, so that ``accelerator.accumulate`` steps the
    optimizer on the last, partial accumulation of every epoch and ``gather_for_metrics`` drops the images
    that complete the last round of several processes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 mean: Sequence[float], std: Sequence[float], augment: DeviceAugment | None = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, num_processes: int = 1,
                 process_index: int = 0, device: torch.device | str | None = None,
                 channels_last: bool = False):
        _check_loader_inputs(images, labels, batch_size, mean, std, seed, num_processes, process_index)
        self.device = torch.device(device) if device is not None else images.device
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self.shuffle, self.drop_last, self.channels_last = shuffle, drop_last, channels_last
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0
        per_round = batch_size * num_processes
        if drop_last:
            self.num_rounds = len(images) // per_round
            if self.num_rounds == 0:
                raise ValueError(f"{len(images)} images make no full batch of {batch_size} x {num_processes} "
                                 "process(es) with drop_last; lower the batch size.")
        else:
            self.num_rounds = math.ceil(len(images) / per_round)
        # Positions the epoch serves: all of them when a single process keeps its last partial batch.
        single_tail = num_processes == 1 and not drop_last
        self.num_positions = len(images) if single_tail else self.num_rounds * per_round
        self.num_padded = max(0, self.num_positions - len(images))
        self.gradient_state = GradientState()

    def __len__(self) -> int:
        return self.num_rounds

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration serves."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
        self.epoch = epoch

    def _epoch_plan(self) -> tuple[torch.Tensor, AugmentParams | None]:
        """The epoch's image indices by position and their augmentation parameters, on the device."""
        generator = epoch_generator(self.seed, self.epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        params = self.augment.sample(n, generator) if self.augment is not None else None
        if self.num_padded:
            # Wrap around to the start of the epoch, parameters included (accelerate's even batches).
            wrap = torch.arange(self.num_positions) % n
            order, params = order[wrap], params[wrap] if params is not None else None
        return order.to(self.device), params.to(self.device) if params is not None else None

    def batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This process's batches ``start, start + 1, ...`` of the current epoch (``0 <= start <= len``)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be between 0 and {len(self)} batches, got {start}.")
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        order, params = self._epoch_plan()
        self.begin()
        # The real images of the last round (accelerate's `remainder`; -1 with drop_last: none is padded).
        self.remainder = -1 if self.drop_last else len(self.images) % (self.batch_size * self.num_processes)
        try:
            for step in range(start, len(self)):
                first = (step * self.num_processes + self.process_index) * self.batch_size
                positions = slice(first, min(first + self.batch_size, self.num_positions))
                index = order[positions]
                images = self.images[index]
                if params is not None:
                    images = self.augment(images, params[positions])
                pixel_values = normalize_uint8(images, self.mean, self.std)
                if self.channels_last:
                    pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
                self.end_of_dataloader = step + 1 == len(self)
                yield {"pixel_values": pixel_values, "labels": self.labels[index]}
        finally:
            self.end()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()
