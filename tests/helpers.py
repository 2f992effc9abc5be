"""Plain functions several test modules share (not collected: no test_ prefix); the fixtures that use them
are in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from balpoe_hf import recipes

# The tiny recipe on the synthetic data of train_synthetic.py (60 training images: 7 batches of 8 an epoch):
# ResNet-20 on 16x16 images, 3 epochs in about a second. Tests change a field with ``tiny_recipe(data,
# field=value)``.
TINY = {"image_column": "picture", "label_column": "target", "image_size": 16, "backbone": "resnet20_cifar",
        "epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0, "lr_schedule": "cosine",
        "mixup_alpha": 0.2, "rotation": 0.0, "num_workers": 0, "eval_batch_size": 32, "eval_every": 0,
        "many_threshold": 20, "few_threshold": 6}
# The shared trained run (tests/conftest.py ``tiny_run``) is also evaluated after every epoch, logs every step
# and keeps a step checkpoint every 3 optimizer steps: epoch-0000-step-000003/6, epoch-0001-step-000002/5,
# epoch-0002-step-000001/4 and one per epoch.
TINY_RUN = {**TINY, "eval_every": 1, "logging_steps": 1, "checkpoint_every_steps": 3,
            "checkpoints_total_limit": 20}


def tiny_recipe(data: tuple[Path, Path], **changes) -> recipes.Recipe:
    """The tiny recipe on ``data`` (the train and test parquet files), with ``changes``."""
    train_file, test_file = data
    return recipes.make_recipe({"train_file": [str(train_file)], "test_file": [str(test_file)], **TINY,
                                **changes})


def tiny_run_recipe(data: tuple[Path, Path], **changes) -> recipes.Recipe:
    """The recipe of the shared trained run (``TINY_RUN``) on ``data``, with ``changes``."""
    return tiny_recipe(data, **{**TINY_RUN, **changes})


def flags(settings: dict) -> list[str]:
    """Recipe settings as balpoe-train flags."""
    return [word for name, value in settings.items() for word in ("--" + name.replace("_", "-"), str(value))]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes: what "touches nothing" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def copy_run(run: Path, target: Path) -> Path:
    """A copy of the run folder ``run`` to change, its checkpoints as hard links (the package never changes a
    checkpoint file in place: it writes new ones and renames them); a test that damages a checkpoint file
    copies that one."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    if (run / "checkpoints").is_dir():
        shutil.copytree(run / "checkpoints", target / "checkpoints", copy_function=os.link)
    return target


def assert_same_weights(got_dir: Path, expected_dir: Path) -> None:
    """The ``model.safetensors`` of the two folders hold the same tensors, bit for bit."""
    expected, got = load_file(expected_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def metrics_from_scratch(run_dir: Path, test_file: Path) -> dict:
    """Accuracy, balanced accuracy and mean confidence of the model saved in ``run_dir`` on the parquet
    ``test_file`` (columns picture and target), computed here from scratch with the transformers auto classes,
    and its config."""
    import datasets
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import balpoe_hf  # noqa: F401  (registers "balpoe" with the auto classes)

    model = AutoModelForImageClassification.from_pretrained(run_dir).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir)
    test = datasets.load_dataset("parquet", data_files=str(test_file), split="train")
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in test["picture"]], return_tensors="pt")
        probabilities = model(**pixels).logits.softmax(-1).numpy()
    predictions, labels = probabilities.argmax(-1), np.asarray(test["target"])
    per_class = [np.mean(predictions[labels == c] == c) for c in range(model.config.num_labels)]
    return {"accuracy": float(np.mean(predictions == labels)), "balanced_accuracy": float(np.mean(per_class)),
            "mean_confidence": float(probabilities.max(-1).mean()), "config": model.config}


def gaussian_logits(prior, num_samples: int, rng: np.random.Generator, means, scale: float = 1.0,
                    class_bias=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from ``prior``, x ~ N(means[y], 1), and the float64 logits
    ``scale * log p(x | y) + class_bias`` (up to a constant): exact uniform-prior logits for ``scale = 1``
    without bias, so that ``softmax(logits + log source_prior)`` are the exact posteriors under a source
    prior; ``(T, b) = (scale, -class_bias / scale)`` calibrates the others."""
    means = np.asarray(means, dtype=float)
    labels = rng.choice(len(means), size=num_samples, p=prior)
    x = rng.normal(means[labels], 1.0)
    log_likelihood = -0.5 * (x[:, None] - means[None, :]) ** 2
    return torch.from_numpy(scale * log_likelihood + np.asarray(class_bias)), torch.from_numpy(labels)


def load_script(name: str):
    """The module of ``scripts/NAME.py``, imported from its file (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
