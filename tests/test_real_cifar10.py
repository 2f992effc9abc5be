"""The cifar10-lt-local recipe on the real CIFAR-10 copy beside the repository (../shared, read-only).

Skipped where that copy is absent: the package never needs it, the tests only check against it.
"""

import os
from pathlib import Path

import pytest
import torch

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, recipes
from balpoe_hf.data import loading, transforms

CIFAR10_DIR = Path(os.environ.get("BALPOE_CIFAR10_DIR",
                                  Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"))
pytestmark = pytest.mark.skipif(not (CIFAR10_DIR / "train.parquet").is_file(),
                                reason=f"no CIFAR-10 parquet files under {CIFAR10_DIR}")


@pytest.fixture(scope="module")
def recipe_and_data():
    values = recipes.recipe_values("cifar10-lt-local")
    values.update(train_file=[str(CIFAR10_DIR / "train.parquet")],
                  test_file=[str(CIFAR10_DIR / "test.parquet")])
    recipe = recipes.make_recipe(values)
    return recipe, loading.load_training_data(recipe)


def test_published_cifar10_lt_ir100_split(recipe_and_data):
    _, data = recipe_and_data
    # CIFAR-10-LT with imbalance 100 (Cao et al. 2019): 12,406 training images, 5000 down to 50 per class.
    assert len(data.train) == 12_406
    assert data.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(data.test) == 10_000
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]


def test_real_images_through_transforms_and_model(recipe_and_data):
    recipe, data = recipe_and_data
    processor = transforms.build_processor(recipe)
    train, test = transforms.with_transforms(data, recipe, processor)
    batch = [train[i] for i in (0, 6000, 12_405)]
    pixels = torch.stack([row["pixel_values"] for row in batch])
    assert pixels.shape == (3, 3, 32, 32)
    # Normalised with the CIFAR statistics: roughly zero-mean, unit-scale values.
    assert abs(float(pixels.mean())) < 1.0 and 0.3 < float(pixels.std()) < 2.0
    assert [row["labels"] for row in batch] == [0, 1, 9]
    assert test[0]["pixel_values"].shape == (3, 32, 32)

    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, lambdas=[1.0, 0.0, -1.0],
                          class_counts=data.class_counts, id2label=dict(enumerate(data.class_names)))
    model = BalPoEForImageClassification(config)
    out = model(pixels, labels=torch.tensor([row["labels"] for row in batch]))
    assert out.logits.shape == (3, 10) and out.expert_logits.shape == (3, 3, 10)
    assert torch.isfinite(out.loss)
