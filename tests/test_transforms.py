"""balpoe_hf.data.transforms: the images a model sees (RGB, 8 bits, the saved processor), the seeded
augmentation, and a corrupt image named by its row.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image
from train_synthetic import CLASS_NAMES

from balpoe_hf import (
    recipes,
)
from balpoe_hf.data import loading, transforms
from balpoe_hf.errors import TrainingError
from balpoe_hf.evaluation import evaluate as evaluation
from balpoe_hf.evaluation import model_loading
from balpoe_hf.training import loop as training

REPO = Path(__file__).resolve().parents[1]


def test_transforms_feed_rgb_and_evaluation_matches_the_saved_processor(tiny_data, tmp_path):
    from transformers import AutoImageProcessor

    recipe = tiny_recipe(tiny_data)
    data = loading.load_training_data(recipe)
    processor = transforms.build_processor(recipe)
    train, test = transforms.with_transforms(data, recipe, processor)
    assert data.test[0]["picture"].mode == "L"  # the first image of each class is grayscale
    gray = test[0]["pixel_values"]
    assert gray.shape == (3, 16, 16)
    # Three equal channels before normalisation.
    torch.testing.assert_close(gray[0] * 0.2023 + 0.4914, gray[1] * 0.1994 + 0.4822)
    torch.testing.assert_close(gray[0] * 0.2023 + 0.4914, gray[2] * 0.2010 + 0.4465)
    assert train[0]["pixel_values"].shape == (3, 16, 16)
    processor.save_pretrained(tmp_path)
    images = [data.test[i]["picture"].convert("RGB") for i in range(5)]
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(torch.stack([test[i]["pixel_values"] for i in range(5)]), reloaded)


def test_crop_pct_processor_resizes_the_short_side_and_centre_crops():
    recipe = recipes.make_recipe({"image_size": 8, "crop_pct": 0.5, "image_mean": [0.0] * 3,
                                   "image_std": [1.0] * 3})
    # 40 x 20 image, white in its central 10 x 10 block, black elsewhere: short side -> 16 (8 / 0.5) gives
    # 32 x 16, whose central 8 x 8 crop lies inside the scaled white block (8 x 8 at the centre).
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[5:15, 15:25] = 255
    processor = transforms.build_processor(recipe)
    out = processor(images=[Image.fromarray(pixels)], return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 8, 8)
    assert out[0, :, 1:-1, 1:-1].min() > 0.9  # white (edge pixels blend with the black border)


def _gray16(path: Path, values: np.ndarray) -> Path:
    """A parquet file of one 16-bit grayscale PNG (PIL mode I;16) per row of ``values`` (N, H, W)."""
    encoded = []
    for pixels in values:
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint16)).save(buffer, "PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"picture": datasets.Image(),
                                  "target": datasets.ClassLabel(names=CLASS_NAMES)})
    datasets.Dataset.from_dict({"picture": encoded, "target": [0] * len(values)},
                               features=features).to_parquet(path)
    return path


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(tiny_run, tmp_path):
    from balpoe_hf.data.device_data import decode_to_uint8

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (4, 16, 16))
    gray16 = datasets.load_dataset("parquet", data_files=str(_gray16(tmp_path / "g.parquet", values)),
                                   split="train")
    assert gray16[0]["picture"].mode == "I;16"
    expected = np.round(values / 257).astype(np.uint8)  # 65535 -> 255, linearly
    assert np.array_equal(np.asarray(transforms.to_rgb(gray16[0]["picture"]))[..., 1], expected[0])
    images, _ = decode_to_uint8(gray16, "picture", "target", 16, cache_dir=tmp_path / "cache")
    assert torch.equal(images[:, 0], torch.from_numpy(expected))  # the device pipeline
    # Evaluation sees what it sees for the same image saved with 8 bits.
    gray8 = gray16.cast_column("picture", datasets.Image()).map(
        lambda row, i: {"picture": Image.fromarray(expected[i])}, with_indices=True)
    model, processor = model_loading.load_model(tiny_run)
    logits16, _ = evaluation.predict(model, processor, gray16, image_column="picture")
    logits8, _ = evaluation.predict(model, processor, gray8, image_column="picture")
    torch.testing.assert_close(logits16, logits8, rtol=0, atol=0)


def _seed_caller(seed: int) -> tuple:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def test_training_augmentation_depends_on_seed_epoch_and_row_only(tiny_data):
    # timm's RandAugment draws from Python's random and numpy, the crop and rotation from torch.
    recipe = tiny_recipe(tiny_data, rotation=15.0, rand_augment="rand-n2-m10-mstd0.5")
    train_set, _ = transforms.with_transforms(loading.load_training_data(recipe), recipe, None)
    torch_state, python_state, numpy_state = _seed_caller(1)
    first = train_set.__getitems__([3, 9, 27])
    # The caller's random states are left as they were.
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
    _seed_caller(2)  # another state of the caller (another worker, other batches loaded before) ...
    again = train_set.__getitems__([27, 3, 40])  # ... and other batch companions: the same augmentation
    assert torch.equal(first[0]["pixel_values"], again[1]["pixel_values"])
    assert torch.equal(first[2]["pixel_values"], again[0]["pixel_values"])
    assert torch.equal(first[0]["pixel_values"], train_set[3]["pixel_values"])
    train_set.set_epoch(1)  # a new epoch: new augmentation
    assert not torch.equal(first[0]["pixel_values"], train_set[3]["pixel_values"])
    train_set.set_epoch(0)
    assert torch.equal(first[0]["pixel_values"], train_set[3]["pixel_values"])


@pytest.fixture
def corrupt_parquet(tiny_data, tmp_path) -> Path:
    ds = datasets.load_dataset("parquet", data_files=str(tiny_data[0]), split="train")
    encoded = [datasets.Image().encode_example(image) for image in ds["picture"]]
    encoded[37] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "img-037.png"}
    features = datasets.Features({"picture": datasets.Image(), "target": ds.features["target"]})
    path = tmp_path / "corrupt.parquet"
    datasets.Dataset.from_dict({"picture": encoded, "target": ds["target"]},
                               features=features).to_parquet(path)
    return path


def test_corrupt_image_is_named_by_row_and_file_even_from_a_worker(tiny_data, corrupt_parquet):
    recipe = tiny_recipe((corrupt_parquet, tiny_data[1]))
    train_set, _ = transforms.with_transforms(loading.load_training_data(recipe), recipe, None)
    batches = iter(torch.utils.data.DataLoader(train_set, batch_size=8, num_workers=1))
    with pytest.raises(loading.DataError) as error:
        list(batches)
    # Stop the worker now: the loader left to the garbage collector keeps a later test waiting 5 s for it.
    batches._shutdown_workers()
    assert str(error.value).startswith("cannot decode the train image at row 37, file img-037.png (")
    assert "Traceback" not in str(error.value)


def test_corrupt_image_stops_training_with_its_row(tiny_data, corrupt_parquet, tmp_path):
    with pytest.raises(TrainingError, match=r"cannot decode the train image at row 37, file img-037\.png"):
        training.train(tiny_recipe((corrupt_parquet, tiny_data[1]), epochs=1), tmp_path / "run")
