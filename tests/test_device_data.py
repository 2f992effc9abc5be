"""The in-memory, on-device image pipeline: decoding and its cache, batched augmentation against
torchvision's PIL pipeline (in distribution and pixel for pixel), and the loader's order, sharding and resume.

Synthetic images and the CPU only. The distribution tests draw a few thousand augmentations of one image
whose pixels encode their own coordinates (channel 0 = column + 1, channel 1 = row + 1, 0 = padding), so
that each output tells which crop, flip or rotation produced it.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from torch.utils.data import BatchSampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from balpoe_hf.data import device_data
from balpoe_hf.data.device_data import (
    AugmentParams,
    DeviceAugment,
    DeviceLoader,
    decode_to_uint8,
    device_augment,
)

SIZE, PAD, DEG = 32, 4, 15.0
DRAWS = 4050  # 50 per crop offset of the 9 x 9 possible ones
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_image(size: int = SIZE) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([cols + 1, rows + 1, torch.full_like(rows, 200)]).to(torch.uint8)


def device_draws(augment: DeviceAugment, image: torch.Tensor, draws: int = DRAWS, seed: int = 0,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """``draws`` augmentations of ``image`` through the loader (one epoch of copies, batches of 500)."""
    images = image.expand(draws, *image.shape).contiguous()
    loader = DeviceLoader(images, torch.zeros(draws, dtype=torch.long), 500, mean=mean, std=std,
                          augment=augment, seed=seed, drop_last=False)
    return torch.cat([batch["pixel_values"] for batch in loader])


def pil_draws(steps: list, image: torch.Tensor, draws: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """``draws`` augmentations of ``image`` through torchvision's PIL transforms (uint8 (draws, 3, H, W))."""
    torch.manual_seed(seed)
    transform, pil = T.Compose(steps), F.to_pil_image(image)
    return torch.stack([torch.from_numpy(np.array(transform(pil))).permute(2, 0, 1) for _ in range(draws)])


def as_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    return (pixel_values * 255).round().to(torch.uint8)


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 3.719 is the normal's 1 - 1e-4 quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


KS_C = 1.949  # Kolmogorov-Smirnov critical constant at level 0.001


def crop_offsets(out: torch.Tensor) -> torch.Tensor:
    """(top, left) of the crop that produced each coordinate-image output (no flip, no rotation)."""
    centre = SIZE // 2
    rows = out[:, 1, centre, centre].long() - 1 - centre + PAD
    cols = out[:, 0, centre, centre].long() - 1 - centre + PAD
    return torch.stack([rows, cols], 1)


def rotation_angles(out: torch.Tensor) -> torch.Tensor:
    """Least-squares rotation angle (degrees, counter-clockwise) of each output of the coordinate image:
    source point v = R(angle) u for every output pixel u that shows the image (centred coordinates)."""
    n = len(out)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    ux, uy = (cols + 0.5 - SIZE / 2).expand(n, -1, -1), (rows + 0.5 - SIZE / 2).expand(n, -1, -1)
    vx, vy = out[:, 0].double() - 0.5 - SIZE / 2, out[:, 1].double() - 0.5 - SIZE / 2
    shown = (out[:, 0] > 0).double()
    sin = ((ux * vy - uy * vx) * shown).sum((1, 2))
    cos = ((ux * vx + uy * vy) * shown).sum((1, 2))
    return torch.rad2deg(torch.atan2(sin, cos))


def ks_uniform(samples: torch.Tensor, low: float, high: float) -> float:
    x = samples.double().sort().values
    n = len(x)
    cdf = ((x - low) / (high - low)).clamp(0, 1)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((upper - cdf).max().item(), (cdf - (upper - 1 / n)).max().item())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    grid = torch.cat([a, b]).double().sort().values
    cdf_a = torch.searchsorted(a.double().sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.double().sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


# --------------------------------------------------------------------------- augmentation in distribution


def test_crop_offsets_uniform_like_pil():
    expected = DRAWS / (2 * PAD + 1) ** 2
    critical = chi_square_critical((2 * PAD + 1) ** 2 - 1)
    outputs = {"device": as_uint8(device_draws(DeviceAugment(PAD, hflip=False), coordinate_image())),
               "pil": pil_draws([T.RandomCrop(SIZE, padding=PAD)], coordinate_image())}
    for name, out in outputs.items():
        offsets = crop_offsets(out)
        assert offsets.min() >= 0 and offsets.max() <= 2 * PAD, name
        counts = torch.bincount(offsets[:, 0] * (2 * PAD + 1) + offsets[:, 1], minlength=(2 * PAD + 1) ** 2)
        chi_square = (((counts - expected) ** 2) / expected).sum().item()
        assert chi_square < critical, (name, chi_square, critical)
        # Each image is the padded image cropped at its offsets: the centre pixel fixes all others.
        top, left = offsets[:, :1, None], offsets[:, 1:, None]
        rows, cols = torch.arange(SIZE).view(1, -1, 1), torch.arange(SIZE).view(1, 1, -1)
        source_rows, source_cols = rows + top - PAD, cols + left - PAD
        inside = (source_rows >= 0) & (source_rows < SIZE) & (source_cols >= 0) & (source_cols < SIZE)
        assert torch.equal(out[:, 0].long(), torch.where(inside, source_cols + 1, 0)), name
        assert torch.equal(out[:, 1].long(), torch.where(inside, source_rows + 1, 0)), name


def test_flip_rate_one_half_like_pil():
    tolerance = 4 * math.sqrt(0.25 / DRAWS)
    outputs = {"device": as_uint8(device_draws(DeviceAugment(0, hflip=True), coordinate_image())),
               "pil": pil_draws([T.RandomHorizontalFlip()], coordinate_image())}
    image = coordinate_image()
    for name, out in outputs.items():
        flipped = (out == image.flip(-1)).all(dim=(1, 2, 3))
        assert ((out == image).all(dim=(1, 2, 3)) | flipped).all(), name  # nothing but the two
        assert abs(flipped.double().mean().item() - 0.5) < tolerance, name


def test_sampled_parameters_follow_torchvision_distributions():
    params = DeviceAugment(PAD, True, DEG).sample(DRAWS, torch.Generator().manual_seed(3))
    assert params.offsets.dtype == torch.int64 and params.flips.dtype == torch.bool
    cells = torch.bincount(params.offsets[:, 0] * (2 * PAD + 1) + params.offsets[:, 1])
    assert len(cells) == (2 * PAD + 1) ** 2 and params.offsets.min() == 0
    expected = DRAWS / (2 * PAD + 1) ** 2
    assert (((cells - expected) ** 2) / expected).sum() < chi_square_critical((2 * PAD + 1) ** 2 - 1)
    assert abs(params.flips.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / DRAWS)
    assert params.angles.abs().max() <= DEG
    assert ks_uniform(params.angles, -DEG, DEG) < KS_C / math.sqrt(DRAWS)
    radians = torch.deg2rad(params.angles.double())
    assert torch.allclose(params.cos.double(), radians.cos(), atol=1e-7)
    assert torch.allclose(params.sin.double(), radians.sin(), atol=1e-7)


def test_rotations_distributed_like_pil():
    """The rotation estimated from each output has the same distribution for both pipelines. (It is not the
    drawn angle: below about 1.8 degrees a nearest-neighbour rotation of a 32x32 image is the identity.)"""
    device = rotation_angles(as_uint8(device_draws(DeviceAugment(0, False, DEG), coordinate_image())))
    pil = rotation_angles(pil_draws([T.RandomRotation(DEG)], coordinate_image()))
    for name, angles in {"device": device, "pil": pil}.items():
        assert DEG - 1 < angles.abs().max() < DEG + 0.1, name
    assert ks_two_sample(device, pil) < KS_C * math.sqrt(2 / DRAWS)


def test_pixel_mean_and_std_maps_match_pil_pipeline():
    """Full pipeline (crop, flip, rotation, normalisation) on one natural-ish image: the per-pixel mean and
    variance over 2,000 draws agree with the PIL pipeline's within 5 standard errors."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=SIZE,
                                             mode="bilinear", align_corners=False)
    image = (smooth[0] * 255).round().to(torch.uint8)
    n = 2000
    device = device_draws(DeviceAugment(PAD, True, DEG), image, n, mean=CIFAR_MEAN, std=CIFAR_STD).double()
    steps = [T.RandomCrop(SIZE, padding=PAD), T.RandomHorizontalFlip(), T.RandomRotation(DEG), T.ToTensor(),
             T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    torch.manual_seed(1)
    pil_image = F.to_pil_image(image)
    pil = torch.stack([T.Compose(steps)(pil_image) for _ in range(n)]).double()
    mean_d, mean_p = device.mean(0), pil.mean(0)
    var_d, var_p = device.var(0), pil.var(0)
    se_mean = (var_d / n + var_p / n).sqrt() + 1e-9
    assert ((mean_d - mean_p).abs() / se_mean).max() < 5
    # Standard error of a sample variance: sqrt((m4 - var^2) / n).
    m4_d, m4_p = ((device - mean_d) ** 4).mean(0), ((pil - mean_p) ** 4).mean(0)
    se_var = ((m4_d - var_d**2) / n + (m4_p - var_p**2) / n).clamp_min(0).sqrt() + 1e-9
    assert ((var_d - var_p).abs() / se_var).max() < 5
    assert var_d.mean() > 0.1  # the augmentation does move the pixels


# --------------------------------------------------------------------------- augmentation pixel for pixel


def torchvision_reference(image, top: int, left: int, flip: bool, angle: float):
    """The PIL training pipeline's functional ops with given parameters (PIL image or uint8 tensor)."""
    size = F.get_image_size(image)[::-1]
    out = F.crop(F.pad(image, PAD, fill=0), top, left, *size)
    if flip:
        out = F.hflip(out)
    return F.rotate(out, angle, interpolation=InterpolationMode.NEAREST, fill=0)


@pytest.mark.parametrize("shape", [(32, 32), (28, 28), (31, 33)])
def test_augment_equals_torchvision_functional_ops(shape):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (3, 3, *shape), dtype=torch.uint8, generator=generator)
    offsets, flips = torch.tensor([[1, 7], [8, 0], [4, 4]]), torch.tensor([True, False, True])
    params = AugmentParams.from_values(offsets, flips, torch.tensor([10.0, -13.5, 0.0]))
    out = DeviceAugment(PAD, True, DEG)(images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(3):
        args = (*params.offsets[i].tolist(), bool(params.flips[i]), float(params.angles[i]))
        assert torch.equal(out[i], torchvision_reference(images[i], *args))
        pil = torch.from_numpy(np.array(torchvision_reference(F.to_pil_image(images[i]), *args)))
        # PIL rotates in fixed point: a source coordinate within ~1e-4 of a pixel border may round the
        # other way. Without rotation (angle 0) the two are identical.
        mismatched = (pil.permute(2, 0, 1) != out[i]).any(0).sum().item()
        assert mismatched <= (0 if args[3] == 0 else 2)


def test_augment_agrees_with_torchvision_on_random_parameters():
    generator = torch.Generator().manual_seed(2)
    augment = DeviceAugment(PAD, True, 30.0)
    images = torch.randint(1, 256, (64, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    params = augment.sample(64, generator)
    out = augment(images, params)
    mismatched = 0
    for i in range(64):
        reference = torchvision_reference(images[i], *params.offsets[i].tolist(), bool(params.flips[i]),
                                          float(params.angles[i]))
        mismatched += (reference != out[i]).any(0).sum().item()
    assert mismatched <= 64 * SIZE * SIZE // 10_000  # border rounding only (measured: ~2 per million)


def test_augment_without_steps_is_identity_and_checks_input():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    params = DeviceAugment(2, True, 10.0).sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(DeviceAugment(0, False, 0.0)(images, params), images)
    with pytest.raises(TypeError, match="uint8"):
        DeviceAugment()(images.float(), params)
    with pytest.raises(ValueError, match="rows of parameters"):
        DeviceAugment()(images[:3], params)
    with pytest.raises(ValueError, match="crop_padding"):
        DeviceAugment(-1)
    with pytest.raises(ValueError, match="rotation"):
        DeviceAugment(4, True, -5.0)


def test_device_augment_from_recipe_settings():
    assert device_augment("cifar", 4, True, 15.0) == DeviceAugment(4, True, 15.0)
    assert device_augment("none", 4, False, 15.0) == DeviceAugment(0, False, 0.0)
    assert device_data.DECODE_RESIZE == {"cifar": "crop", "none": "squash"}
    with pytest.raises(ValueError, match="no device version"):
        device_augment("imagenet")


def test_normalisation_equals_to_tensor_and_normalize_bitwise():
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    loader = DeviceLoader(image[None], torch.tensor([3]), 1, mean=CIFAR_MEAN, std=CIFAR_STD, augment=None,
                          shuffle=False, drop_last=False)
    (batch,) = list(loader)
    expected = T.Normalize(CIFAR_MEAN, CIFAR_STD)(T.ToTensor()(F.to_pil_image(image)))
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][0], expected)
    assert batch["labels"].tolist() == [3]


# --------------------------------------------------------------------------- the loader


def make_loader(n: int = 103, batch_size: int = 8, **kwargs) -> DeviceLoader:
    """``n`` random images whose labels are their indices, so that batches tell which images they hold."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    options = {"mean": CIFAR_MEAN, "std": CIFAR_STD, "augment": DeviceAugment(2, True, 10.0), "seed": 5}
    return DeviceLoader(images, torch.arange(n), batch_size, **{**options, **kwargs})


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["pixel_values"], y["pixel_values"])


def test_epoch_is_a_function_of_seed_and_epoch():
    first, second = make_loader(), make_loader()
    first.set_epoch(3)
    second.set_epoch(3)
    epoch3 = list(first)
    assert len(epoch3) == len(first) == 103 // 8
    assert_same_batches(epoch3, list(second))
    assert_same_batches(epoch3, list(first))  # iterating again repeats the epoch
    first.set_epoch(4)
    epoch4 = list(first)
    assert not torch.equal(epoch4[0]["labels"], epoch3[0]["labels"])
    other_seed = make_loader(seed=6)
    other_seed.set_epoch(3)
    assert not torch.equal(next(iter(other_seed))["labels"], epoch3[0]["labels"])
    ids = torch.cat([b["labels"] for b in epoch3])
    assert len(set(ids.tolist())) == len(ids) == 96  # a permutation, minus the dropped remainder
    # Per-image randomness: copies of one image in one batch come out different.
    white = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    copies = DeviceLoader(white, torch.zeros(64, dtype=torch.long), 64, mean=[0, 0, 0], std=[1, 1, 1],
                          augment=DeviceAugment(2, True, 10.0))
    assert len(torch.unique(next(iter(copies))["pixel_values"], dim=0)) > 32


def test_resume_skips_to_the_same_batches():
    loader = make_loader()
    loader.set_epoch(2)
    full = list(loader)
    for start in (0, 1, 5, len(loader)):
        assert_same_batches(list(loader.batches(start)), full[start:])
    with pytest.raises(ValueError, match="start"):
        loader.batches(len(loader) + 1)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


def accelerate_shard(order: list[int], batch_size: int, num_processes: int, index: int,
                     drop_last: bool) -> list[list[int]]:
    sampler = BatchSampler(order, batch_size, drop_last)
    return list(BatchSamplerShard(sampler, num_processes=num_processes, process_index=index))


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_processes_share_the_epoch_like_accelerate(drop_last):
    single = make_loader(drop_last=True)
    single.set_epoch(1)
    single_batches = list(single)
    whole = make_loader(batch_size=103, augment=None)  # the epoch's order in one batch
    whole.set_epoch(1)
    order = next(iter(whole))["labels"].tolist()
    shards = []
    for index in range(2):
        loader = make_loader(drop_last=drop_last, num_processes=2, process_index=index)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == (103 // 16 if drop_last else math.ceil(103 / 16))
        assert [b["labels"].tolist() for b in batches] == accelerate_shard(order, 8, 2, index, drop_last)
        # The same global epoch as one process: batch s of process p is its batch 2s + p, augmentation too.
        assert_same_batches(batches[:6], single_batches[index::2][:6])
        shards.append(torch.cat([b["labels"] for b in batches]))
    if drop_last:
        assert not set(shards[0].tolist()) & set(shards[1].tolist())
        assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(order[:96])
    else:
        assert loader.num_padded == 7 * 16 - 103
        assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(103))


def _accumulated_training(loader_kind: str, batches: int, accumulation: int, epochs: int = 2
                          ) -> tuple[int, torch.Tensor]:
    """Optimizer steps and final weights of the training loop's accumulation (``accelerator.accumulate``)
    over ``epochs`` epochs of ``batches`` fixed batches, served by a DeviceLoader or a prepared DataLoader."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batches * 4, 3, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (batches * 4,), generator=generator)
    model = torch.nn.Linear(48, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 48, generator=generator))
        model.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = []
    step = optimizer.step
    optimizer.step = lambda *args, **kwargs: (steps.append(1), step(*args, **kwargs))[1]
    model, optimizer = accelerator.prepare(model, optimizer)
    if loader_kind == "device":
        loader = DeviceLoader(images, labels, 4, mean=[0, 0, 0], std=[1, 1, 1], shuffle=False)
    else:
        rows = [{"pixel_values": image.float() / 255, "labels": label} for image, label in zip(images, labels,
                                                                                                 strict=True)]
        loader = accelerator.prepare(torch.utils.data.DataLoader(rows, batch_size=4, drop_last=True))
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                logits = model(batch["pixel_values"].flatten(1))
                accelerator.backward(torch.nn.functional.cross_entropy(logits, batch["labels"]))
                optimizer.step()
                optimizer.zero_grad()
    return len(steps), accelerator.unwrap_model(model).weight.detach().clone()


@pytest.mark.parametrize("batches,accumulation", [(2, 4), (7, 2), (7, 3)])
def test_gradient_accumulation_steps_on_the_last_partial_accumulation_of_every_epoch(batches, accumulation):
    # The loader tells accelerate where the epoch ends: ceil(batches / accumulation) steps per epoch, as the
    # prepared DataLoader of the worker pipeline gets (the last accumulation of an epoch is partial).
    steps, weights = _accumulated_training("device", batches, accumulation)
    assert steps == 2 * math.ceil(batches / accumulation)
    worker_steps, worker_weights = _accumulated_training("workers", batches, accumulation)
    assert worker_steps == steps
    torch.testing.assert_close(weights, worker_weights, rtol=0, atol=0)


def test_eval_mode_keeps_order_and_the_last_partial_batch():
    loader = make_loader(n=10, batch_size=4, augment=None, shuffle=False, drop_last=False,
                         channels_last=True)
    batches = list(loader)
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loader.num_padded == 0
    pixel_values = batches[0]["pixel_values"]
    assert pixel_values.is_contiguous(memory_format=torch.channels_last)
    expected = T.Normalize(CIFAR_MEAN, CIFAR_STD)(T.ToTensor()(F.to_pil_image(loader.images[0])))
    assert torch.equal(pixel_values[0], expected)
    assert loader.images.dtype == torch.uint8


def test_loader_rejects_bad_input():
    images, labels = torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10)
    options = {"mean": CIFAR_MEAN, "std": CIFAR_STD}
    with pytest.raises(ValueError, match="no full batch"):
        DeviceLoader(images, labels, 11, **options)
    with pytest.raises(ValueError, match="no full batch"):
        DeviceLoader(images, labels, 6, num_processes=2, **options)
    assert len(DeviceLoader(images, labels, 11, drop_last=False, **options)) == 1
    with pytest.raises(TypeError, match="uint8"):
        DeviceLoader(images.float(), labels, 2, **options)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        DeviceLoader(images[:, :1], labels, 2, **options)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images, labels[:9], 2, **options)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images, labels.int(), 2, **options)
    with pytest.raises(ValueError, match="process_index"):
        DeviceLoader(images, labels, 2, num_processes=2, process_index=2, **options)
    with pytest.raises(ValueError, match="mean and std"):
        DeviceLoader(images, labels, 2, mean=[0.5], std=[0.5])


# --------------------------------------------------------------------------- decoding and the cache


def image_dataset(images: list[Image.Image]) -> datasets.Dataset:
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3),
                                  "name": datasets.Value("string")})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(len(images))],
                                       "name": [f"x{i}" for i in range(len(images))]}, features=features)


def test_decode_to_uint8_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    wide = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    ds = image_dataset([Image.fromarray(rgb), Image.fromarray(gray, mode="L"), wide])
    images, labels = decode_to_uint8(ds, "img", "label", SIZE, cache_dir=tmp_path)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, SIZE, SIZE)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2]
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), rgb)  # already at size: untouched
    assert all(np.array_equal(images[1, c].numpy(), gray) for c in range(3))  # grayscale -> 3 equal channels
    # A non-square image: what the PIL training path makes of it before the random crop.
    expected = T.CenterCrop(SIZE)(T.Resize(SIZE)(wide))
    assert np.array_equal(images[2].permute(1, 2, 0).numpy(), np.asarray(expected))

    cached = list(tmp_path.glob("balpoe-uint8-*.safetensors"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(device_data, "_decode", no_decoding)
    again = decode_to_uint8(ds, "img", "label", SIZE, cache_dir=tmp_path)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    # A different fingerprint (another subset), size or resize mode misses the cache.
    for call in (lambda: decode_to_uint8(ds.select([0, 1]), "img", "label", SIZE, cache_dir=tmp_path),
                 lambda: decode_to_uint8(ds, "img", "label", 16, cache_dir=tmp_path),
                 lambda: decode_to_uint8(ds, "img", "label", SIZE, cache_dir=tmp_path, resize="squash")):
        with pytest.raises(AssertionError, match="decoded again"):
            call()


def test_decode_cache_lives_next_to_the_dataset_cache(tmp_path):
    image_dataset([Image.new("RGB", (8, 8), (1, 2, 3))] * 4).save_to_disk(tmp_path / "saved")
    ds = datasets.load_from_disk(str(tmp_path / "saved"))
    path = device_data.cache_file(ds, "img", "label", 8)
    assert path.parent.resolve() == (tmp_path / "saved").resolve()
    images, _ = decode_to_uint8(ds, "img", "label", 8)
    assert path.is_file() and images[:, :, 0, 0].tolist() == [[1, 2, 3]] * 4


def test_decode_without_a_writable_cache_still_decodes(tmp_path, monkeypatch, caplog):
    def read_only(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(device_data, "_write_atomically", read_only)
    ds = image_dataset([Image.new("RGB", (8, 8), (9, 9, 9))] * 2)
    images, labels = decode_to_uint8(ds, "img", "label", 8, cache_dir=tmp_path)
    assert images.shape == (2, 3, 8, 8) and int(images.max()) == 9 and labels.tolist() == [0, 1]
    assert "could not cache" in caplog.text


def test_decode_rejects_bad_input(tmp_path):
    ds = image_dataset([Image.new("RGB", (8, 8))] * 2)
    with pytest.raises(TypeError, match="not images"):
        decode_to_uint8(ds, "name", "label", 8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no image column 'image'"):
        decode_to_uint8(ds, "image", "label", 8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="integer class indices"):
        decode_to_uint8(ds, "img", "name", 8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        decode_to_uint8(ds, "img", "label", 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="resize"):
        decode_to_uint8(ds, "img", "label", 8, cache_dir=tmp_path, resize="stretch")
