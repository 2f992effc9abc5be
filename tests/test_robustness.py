"""Bad input and faults (issue 14): each gets a clear error naming the problem, or leaves files untouched.

One section per item of the issue; checkpoints and resume (items 6, 7, 9 and the step checkpoints of issue
15) are in test_checkpoints.py. Runs are in-process on the tiny dataset of ``train_synthetic``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_imagefolder, write_parquet

from balpoe_hf import (
    BalPoEConfig,
    BalPoEForImageClassification,
    BalPoELoss,
    build_image_processor,
    cli,
    hub,
    recipes,
    run_folder,
)
from balpoe_hf.cli import arguments
from balpoe_hf.data import loading, transforms
from balpoe_hf.data.splits import long_tailed_counts, make_long_tailed, make_shifted_test
from balpoe_hf.errors import EvaluationError, HubFolderError, TrainingError
from balpoe_hf.evaluation import evaluate as evaluation
from balpoe_hf.evaluation import model_loading, reports
from balpoe_hf.training import checkpoints, non_finite, resume
from balpoe_hf.training import loop as training

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"image_column": "picture", "label_column": "target", "image_size": 16,
            "backbone": "resnet20_cifar", "epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0,
            "lr_schedule": "cosine", "mixup_alpha": 0.0, "rotation": 0.0, "num_workers": 0,
            "eval_batch_size": 32, "eval_every": 0, "many_threshold": 20, "few_threshold": 6}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    return write_parquet(tmp_path_factory.mktemp("robust_data"))


def _recipe(data, **changes) -> recipes.Recipe:
    train_file, test_file = data
    return recipes.make_recipe({"train_file": [str(train_file)], "test_file": [str(test_file)],
                                **SETTINGS, **changes})


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A trained run (3 epochs: about 94 % balanced accuracy, so that a wrong label order shows)."""
    out = tmp_path_factory.mktemp("robust_run") / "run"
    result = training.train(_recipe(data), out)
    assert result.eval_report["balanced_accuracy"] > 0.5
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _write(path: Path, images: list, labels: list, feature: datasets.features.FeatureType) -> Path:
    features = datasets.Features({"picture": datasets.Image(), "target": feature})
    datasets.Dataset.from_dict({"picture": images, "target": labels}, features=features).to_parquet(path)
    return path


def _plain_parquet(source: Path, target: Path, relabel=lambda labels: labels) -> Path:
    """``source`` with its labels as plain integers (no ClassLabel), transformed by ``relabel``."""
    ds = datasets.load_dataset("parquet", data_files=str(source), split="train")
    labels = relabel(np.asarray(ds["target"])).tolist()
    return _write(target, list(ds["picture"]), labels, datasets.Value("int64"))


# --------------------------------------------------------------------------- 1: test labels matched by name


def _reordered(test_file: Path, target: Path, names: list[str]) -> Path:
    """The test set with its ClassLabel listing ``names`` (the same classes in another order)."""
    ds = datasets.load_dataset("parquet", data_files=str(test_file), split="train")
    old = ds.features["target"].names
    labels = [names.index(old[label]) for label in ds["target"]]
    return _write(target, list(ds["picture"]), labels, datasets.ClassLabel(names=names))


def test_test_set_with_classes_in_another_order_gives_the_same_metrics_everywhere(run, data, tmp_path,
                                                                                  capsys):
    order = ["blue", "yellow", "red", "green"]
    reordered = _reordered(data[1], tmp_path / "test.parquet", order)
    raw = np.asarray(datasets.load_dataset("parquet", data_files=str(reordered), split="train")["target"])
    assert (raw != np.repeat(np.arange(4), TEST_PER_CLASS)).mean() == 1.0  # every raw index differs

    # Training-time evaluation (eval_results.json), the same weights: the same numbers.
    other = training.train(_recipe(data, test_file=[str(reordered)]), tmp_path / "run")
    expected = json.loads((run / "eval_results.json").read_text())
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text()) == expected
    assert other.eval_report["balanced_accuracy"] == expected["eval_balanced_accuracy"]

    # balpoe-evaluate on the reordered file agrees with both.
    argv = ["--model", str(run), "--test-file", str(reordered), "--shifts", "uniform", "--prior", "none",
            "--output", str(tmp_path / "report.json"), "--device", "cpu"]
    assert cli.evaluate_main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())["balanced"]
    for key in ("accuracy", "balanced_accuracy", "nll"):
        assert report[key] == pytest.approx(expected[f"eval_{key}"], abs=1e-6), key
    capsys.readouterr()


def test_test_set_naming_a_class_the_training_data_lacks_is_refused(data, tmp_path):
    reordered = _reordered(data[1], tmp_path / "test.parquet", ["red", "green", "blue", "yellow"])
    ds = datasets.load_dataset("parquet", data_files=str(reordered), split="train")
    renamed = _write(tmp_path / "renamed.parquet", list(ds["picture"]), ds["target"],
                     datasets.ClassLabel(names=["red", "green", "blue", "purple"]))
    with pytest.raises(loading.DataError, match=r"test classes \['purple'\] are not classes of the model"):
        loading.load_training_data(_recipe(data, test_file=[str(renamed)]))


# --------------------------------------------------------------------------- 2: the number of classes


def test_out_of_range_integer_labels_do_not_become_extra_classes(data, tmp_path):
    # Plain integer labels, 10 added to a few training labels (a typo, an offset): not a 14-class model.
    train = _plain_parquet(data[0], tmp_path / "train.parquet",
                           lambda labels: np.where(np.arange(len(labels)) % 7 == 0, labels + 10, labels))
    test = _plain_parquet(data[1], tmp_path / "test.parquet")
    recipe = _recipe((train, test))
    with pytest.raises(loading.DataError, match=r"class count comes from the largest label, but the training "
                                                r"labels go up to 13 and the test labels up to 3"):
        loading.load_training_data(recipe)
    # With --num-classes the out-of-range labels are named.
    with pytest.raises(loading.DataError, match=r"train split has labels \[10, 11, 12, 13\] outside the "
                                                r"class range \[0, 3\]"):
        loading.load_training_data(_recipe((train, test), num_classes=4))


def test_a_class_without_training_images_is_refused_saying_where_the_count_comes_from(data, tmp_path):
    # Class 2 relabelled as class 1: labels 0, 1, 3 and a gap at 2.
    train = _plain_parquet(data[0], tmp_path / "train.parquet",
                           lambda labels: np.where(labels == 2, 1, labels))
    test = _plain_parquet(data[1], tmp_path / "test.parquet")
    with pytest.raises(loading.DataError, match=r"classes \[2\] have no training image, but the model "
                                                r"would have 4 classes \(inferred from the largest label"):
        loading.load_training_data(_recipe((train, test)))
    good = _plain_parquet(data[0], tmp_path / "good.parquet")
    loaded = loading.load_training_data(_recipe((good, test)))
    assert loaded.class_counts == TRAIN_COUNTS
    assert loaded.class_count_source.startswith("inferred from the largest label")


# --------------------------------------------------------------------------- 3: --overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_run(data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = _snapshot(mine)
    argv = ["--train-file", str(data[0]), "--test-file", str(data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(mine), "--overwrite"]
    assert cli.train_main(argv) == 2
    assert "is not the directory of a balpoe-hf run (it has no balpoe_outputs.json" in capsys.readouterr().err
    assert _snapshot(mine) == before


def test_overwrite_deletes_only_what_the_run_wrote(run, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    train_file, test_file = shutil.copy(data[0], out / "data"), shutil.copy(data[1], out / "data")
    # A report of the old model inside the run, listed by balpoe-evaluate: stale after the overwrite.
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text("{}")
    run_folder.record_outputs(out, [out / "eval" / "report.json"])
    kept = {"notes.txt": b"mine", "data/train.parquet": data[0].read_bytes(),
            "data/test.parquet": data[1].read_bytes()}

    training.train(_recipe((Path(train_file), Path(test_file)), epochs=1), out, overwrite=True)
    after = _snapshot(out)
    assert {name: after[name] for name in kept} == kept
    assert not (out / "eval").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]  # the old run's are gone
    assert json.loads((out / "train_results.json").read_text())["epochs"] == 1


def test_overwrite_never_deletes_an_input_or_an_edited_output(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "logs" / "train.parquet").parent.mkdir(exist_ok=True)
    (out / "logs" / "train.parquet").write_bytes(b"data")
    before = _snapshot(out)
    with pytest.raises(TrainingError, match=r"--overwrite would delete .*logs, which holds the input "
                                            r".*train\.parquet.*\(nothing was deleted\)"):
        resume.check_output_dir(out, resume=False, overwrite=True,
                                     inputs=[out / "logs" / "train.parquet"])
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "# my notes\n")
    with pytest.raises(TrainingError, match=r"--overwrite would delete \['recipe.yaml'\] .* changed since "
                                            r"balpoe-hf wrote them"):
        resume.check_output_dir(out, resume=False, overwrite=True)
    assert {k: v for k, v in _snapshot(out).items() if k != "recipe.yaml"} == \
        {k: v for k, v in before.items() if k != "recipe.yaml"}


# --------------------------------------------------------------------------- 4: the Hub folder


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", class_counts=TRAIN_COUNTS,
                          id2label=dict(enumerate(CLASS_NAMES)), image_size=16)
    path = tmp_path / "model"
    BalPoEForImageClassification(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


def test_hub_folder_never_replaces_a_card_it_did_not_write(model_dir, capsys):
    (model_dir / "README.md").write_text("# My own card\n")
    before = _snapshot(model_dir)
    with pytest.raises(HubFolderError, match=r"holds \['README.md'\], which balpoe-hf did not write"):
        hub.prepare_hub_folder(model_dir)
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2  # bad input: the folder
    assert "Nothing was written" in capsys.readouterr().err
    assert _snapshot(model_dir) == before


def test_hub_folder_is_checked_before_anything_is_written(model_dir):
    (model_dir / "preprocessor_config.json").unlink()
    before = _snapshot(model_dir)
    with pytest.raises(HubFolderError, match=r"no preprocessor_config\.json"):
        hub.prepare_hub_folder(model_dir)
    assert _snapshot(model_dir) == before  # no README.md, no images/


def test_hub_folder_rewrites_its_own_card_but_not_an_edited_one(model_dir):
    hub.prepare_hub_folder(model_dir)
    hub.prepare_hub_folder(model_dir, "me/renamed")  # its own files: replaced
    assert "me/renamed" in (model_dir / "README.md").read_text()
    (model_dir / "images" / "class_counts.png").write_bytes(b"my picture")
    with pytest.raises(HubFolderError, match=r"\['images/class_counts.png'\].*or which were edited"):
        hub.prepare_hub_folder(model_dir)
    assert (model_dir / "images" / "class_counts.png").read_bytes() == b"my picture"


# --------------------------------------------------------------------------- 5: train / test overlap


def test_overlapping_training_and_test_data_are_refused(data, tmp_path):
    train_file = data[0]
    message = "overlap: the model would be evaluated on images it was trained on"
    with pytest.raises(loading.DataError, match=message):
        loading.load_training_data(_recipe(data, test_file=[str(train_file)]))
    with pytest.raises(loading.DataError, match=message):  # a glob that takes the test file too
        loading.load_training_data(_recipe(data, train_file=[str(train_file.parent / "*.parquet")]))
    train_dir, _ = write_imagefolder(tmp_path)
    with pytest.raises(loading.DataError, match=message):  # a test folder inside the training folder
        loading.load_training_data(_recipe(data, train_file=[str(train_dir)],
                                           test_file=[str(train_dir / "red")]))
    hub_recipe = recipes.make_recipe({"dataset": "me/data", "train_split": "train", "test_split": "train"})
    with pytest.raises(loading.DataError, match="train_split and test_split are both 'train'"):
        loading.load_training_data(hub_recipe)


# --------------------------------------------------------------------------- 8: numbers and non-finite loss


@pytest.mark.parametrize("values,message", [
    ({"lr": float("nan")}, "lr must be finite, got nan"),
    ({"lr": float("inf")}, "lr must be finite, got inf"),
    ({"lr": -0.1}, "lr must be positive, got -0.1"),
    ({"lr": 0}, "lr must be positive, got 0.0"),
    ({"mixup_alpha": float("nan")}, "mixup_alpha must be finite"),
    ({"mixup_alpha": -1}, "mixup_alpha must be >= 0"),
    ({"image_size": 0}, "image_size must be a positive integer number of pixels, got 0"),
    ({"image_std": [0.2, float("nan"), 0.2]}, "image_std must be finite"),
    ({"image_std": [0.2, 0.0, 0.2]}, "image_std must be positive"),
    ({"lambdas": [1.0, float("inf"), -1.0]}, "lambdas must be finite"),
    ({"momentum": 1.5}, "momentum must be below 1"),
    ({"weight_decay": -1e-4}, "weight_decay must not be negative"),
    ({"max_grad_norm": 0}, "max_grad_norm must be positive"),
    ({"imbalance_ratio": 0.5}, "imbalance_ratio must be >= 1"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must not be negative"),
])
def test_numeric_recipe_fields_are_checked_up_front(values, message):
    with pytest.raises(TrainingError) as error:
        recipes.make_recipe(values)
    assert message in str(error.value)


def test_lr_nan_on_the_command_line_is_refused_before_training(data, tmp_path, capsys):
    argv = ["--train-file", str(data[0]), "--test-file", str(data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(tmp_path / "run"), "--lr", "nan"]
    assert cli.train_main(argv) == 2
    assert "lr must be finite, got nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row,message", [
    ([0.7, 0.5, -0.2], "rows >= 0 summing to 1); row 1 is [0.7, 0.5, -0.2]"),
    ([0.5, 0.4, 0.0], "row 1 is [0.5, 0.4, 0] (sum 0.9)"),
    ([float("nan"), 0.5, 0.5], "row 1 is [nan, 0.5, 0.5]"),
])
def test_soft_targets_that_are_not_probabilities_are_refused_by_the_loss(row, message):
    loss = BalPoELoss([30, 20, 10], [1.0, 0.0, -1.0])
    targets = torch.tensor([[1.0, 0.0, 0.0], row])
    with pytest.raises(ValueError) as error:
        loss(torch.zeros(2, 3, 3), targets)
    assert message in str(error.value)
    assert torch.isfinite(loss(torch.zeros(2, 3, 3), torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])))


def test_non_finite_loss_guard_keeps_the_first_bad_batch():
    guard = non_finite.NonFiniteLossGuard(torch.device("cpu"))
    seen = [guard.update(torch.tensor(value), batch) for batch, value in
            enumerate([1.0, 2.0, float("inf"), 1.0, float("nan")])]
    assert seen == [False, False, True, True, True]
    assert guard.first_bad() == 2


def test_training_stops_at_the_first_non_finite_loss(data, tmp_path, monkeypatch):
    forward, calls = BalPoEForImageClassification.forward, []

    def diverging(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third batch of the first epoch
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BalPoEForImageClassification, "forward", diverging)
    with pytest.raises(TrainingError) as error:
        training.train(_recipe(data, lr=0.2), tmp_path / "run")
    lr = 0.2 * 0.5 * (1 + math.cos(math.pi * 2 / 21))  # cosine over 3 x 7 steps, at the third (step 2)
    assert str(error.value).startswith(
        f"the training loss is not finite (NaN or inf) at epoch 1, batch 3 (optimizer step 3, lr {lr:.4g}); "
        "training stopped there and no checkpoint was saved.")
    assert "lower --lr, set --max-grad-norm" in str(error.value)
    assert len(calls) == 3  # stopped at once, not at the end of the epoch
    assert checkpoints.completed_checkpoints(tmp_path / "run") == []


# --------------------------------------------------------------------------- 9: a corrupt image


@pytest.fixture
def corrupt_parquet(data, tmp_path) -> Path:
    ds = datasets.load_dataset("parquet", data_files=str(data[0]), split="train")
    encoded = [datasets.Image().encode_example(image) for image in ds["picture"]]
    encoded[37] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "img-037.png"}
    features = datasets.Features({"picture": datasets.Image(), "target": ds.features["target"]})
    path = tmp_path / "corrupt.parquet"
    datasets.Dataset.from_dict({"picture": encoded, "target": ds["target"]},
                               features=features).to_parquet(path)
    return path


def test_corrupt_image_is_named_by_row_and_file_even_from_a_worker(data, corrupt_parquet):
    recipe = _recipe((corrupt_parquet, data[1]))
    train_set, _ = transforms.with_transforms(loading.load_training_data(recipe), recipe, None)
    batches = iter(torch.utils.data.DataLoader(train_set, batch_size=8, num_workers=1))
    with pytest.raises(loading.DataError) as error:
        list(batches)
    # Stop the worker now: the loader left to the garbage collector keeps a later test waiting 5 s for it.
    batches._shutdown_workers()
    assert str(error.value).startswith("cannot decode the train image at row 37, file img-037.png (")
    assert "Traceback" not in str(error.value)


def test_corrupt_image_stops_training_with_its_row(data, corrupt_parquet, tmp_path):
    with pytest.raises(TrainingError, match=r"cannot decode the train image at row 37, file img-037\.png"):
        training.train(_recipe((corrupt_parquet, data[1]), epochs=1), tmp_path / "run")


def _seed_caller(seed: int) -> tuple:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def test_training_augmentation_depends_on_seed_epoch_and_row_only(data):
    # timm's RandAugment draws from Python's random and numpy, the crop and rotation from torch.
    recipe = _recipe(data, rotation=15.0, rand_augment="rand-n2-m10-mstd0.5")
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


# --------------------------------------------------------------------------- 10: balpoe-evaluate fails early


@pytest.fixture
def no_inference(monkeypatch):
    def predict(*args, **kwargs):
        raise AssertionError("the inference ran")

    monkeypatch.setattr(evaluation, "predict", predict)


def test_evaluate_checks_the_output_before_the_inference(run, tmp_path, no_inference, capsys):
    (tmp_path / "a-file").write_text("")
    argv = ["--model", str(run), "--output", str(tmp_path / "a-file" / "report.json"), "--device", "cpu"]
    assert cli.evaluate_main(argv) == 2
    a_file = tmp_path / "a-file"
    assert f"cannot write --output into {a_file}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert cli.evaluate_main([*argv[:2], "--output", str(tmp_path), "--device", "cpu"]) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err


def test_evaluate_checks_the_shifts_before_the_inference(run, no_inference, capsys):
    # 8 test images per class: backward50 would keep int(8 / 50) = 0 images of the most frequent class.
    assert cli.evaluate_main(["--model", str(run), "--shifts", "uniform,backward50", "--device", "cpu"]) == 2
    assert "cannot build the backward50 test set" in capsys.readouterr().err


# --------------------------------------------------------------------------- 11: known causes, no tracebacks


def test_data_files_that_cannot_be_read_are_named(data, tmp_path):
    (tmp_path / "empty" / "red").mkdir(parents=True)
    (tmp_path / "other" / "red").mkdir(parents=True)
    with pytest.raises(loading.DataError, match=r"no images found in .*an imagefolder directory holds one"):
        loading.load_training_data(_recipe(data, train_file=[str(tmp_path / "empty")],
                                           test_file=[str(tmp_path / "other")]))
    csv = tmp_path / "train.csv"
    csv.write_text("picture,target\nimg.png,1\n")
    with pytest.raises(loading.DataError, match=r"train\.csv is not a readable parquet file .*a CSV"):
        loading.load_training_data(_recipe(data, train_file=[str(csv)]))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[0].read_bytes()[:5000])
    with pytest.raises(loading.DataError, match=r"truncated\.parquet is not a readable parquet file"):
        loading.load_training_data(_recipe(data, train_file=[str(truncated)]))
    with pytest.raises(TrainingError, match="image_column and label_column are both 'target'"):
        _recipe(data, image_column="target")


def test_truncated_weights_are_named(run, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(EvaluationError, match=r"the weights in .* cannot be read .*truncated or "
                                                         r"damaged; save the model again"):
        model_loading.load_model(copy)


def test_pretrained_backbone_offline_is_explained(data, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = _recipe(data, backbone="resnet18", backbone_pretrained=True)
    stub = SimpleNamespace(class_counts=TRAIN_COUNTS, class_names=CLASS_NAMES)
    with pytest.raises(TrainingError, match=r"cannot build the model: could not load pretrained timm"):
        training.build_model(recipe, stub)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused_before_loading(run, no_inference, capsys):
    assert cli.evaluate_main(["--model", str(run), "--device", "cuda"]) == 2
    assert "--device cuda, but torch sees no CUDA GPU here" in capsys.readouterr().err
    assert cli.evaluate_main(["--model", str(run), "--device", "gpu0"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err


@pytest.mark.parametrize("main,argv,abbreviation", [
    (cli.train_main, ["--recipe", "fashion-mnist-lt-quick", "--epoch", "1"], "--epoch"),
    (cli.evaluate_main, ["--model", "runs/x", "--batch", "8"], "--batch"),
    (cli.push_main, ["runs/x", "me/x", "--dry"], "--dry"),
    (cli.describe_split_main, ["--imbalance", "50"], "--imbalance"),
])
def test_every_command_line_refuses_abbreviated_flags(main, argv, abbreviation, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


# --------------------------------------------------------------------------- optional extras (issue 15.5)


def test_optional_packages_are_extras_and_each_feature_names_its_extra(data, tmp_path, monkeypatch):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for package, extra in (("tensorboard", "train"), ("matplotlib", "plots"), ("matplotlib", "hub"),
                           ("jinja2", "hub")):
        assert package not in required and any(r.startswith(package) for r in extras[extra])
    find_spec = importlib.util.find_spec
    missing = {"tensorboard", "matplotlib"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing
                        else find_spec(name, *a))
    with pytest.raises(TrainingError, match=r"--report-to tensorboard needs .*'balpoe-hf\[train\]'"):
        training.train(_recipe(data), tmp_path / "run", report_to="tensorboard")
    with pytest.raises(EvaluationError, match=r"need matplotlib: .*'balpoe-hf\[plots\]'"):
        reports.check_output(tmp_path / "report.json")
    with pytest.raises(HubFolderError, match=r"needs matplotlib: pip install 'balpoe-hf\[hub\]'"):
        hub.prepare_hub_folder(tmp_path)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- second sweep (issue 21)
# Each case of the second hostile sweep: a clear message naming the problem and the fix, or the right answer.


def test_constructors_refuse_what_would_fail_late_or_silently():
    with pytest.raises(ValueError, match=r"lambdas must hold one bias per expert \(at least one expert\), "
                                         r"got \[\]"):
        BalPoELoss([30, 20, 10], lambdas=[])  # it used to construct and return NaN at the first call
    ds = datasets.Dataset.from_dict({"label": [0] * 8 + [1] * 8 + [2] * 8})
    with pytest.raises(ValueError, match=r"train_counts must be integers >= 0 \(images per class\), but "
                                         r"classes \[1\] have \[-5\]"):
        make_shifted_test(ds, [30, -5, 10], "forward", 2.0)
    for build in (lambda: make_long_tailed(ds, float("nan")),
                  lambda: make_shifted_test(ds, [30, 20, 10], "backward", float("nan")),
                  lambda: long_tailed_counts(100, 10, float("inf"))):
        with pytest.raises(ValueError, match=r"must be >= 1 and finite \(head count / tail count\)"):
            build()
    counts = {"backbone": "resnet20_cifar", "class_counts": [3, 2, 1]}
    for values, message in [({"lambdas": [1.0, "a", -1.0]}, r"must hold numbers .* got lambdas=\[1.0, 'a'"),
                            ({"classifier_scale": None}, "classifier_scale must be positive and finite"),
                            ({"image_size": "32"}, "image_size must be a positive integer number of pixels"),
                            ({"image_mean": "abc"}, "image_mean must be a list of finite numbers"),
                            ({"backbone_kwargs": [1]}, "backbone_kwargs must be a mapping"),
                            ({"backbone_pretrained": "yes"}, "backbone_pretrained must be True or False")]:
        with pytest.raises(ValueError, match=message):
            BalPoEConfig(**counts, **values)


# Lost files: --resume, --output-dir, balpoe-evaluate --output


def test_resume_on_a_folder_that_is_not_a_run_refuses_and_touches_nothing(data, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "checkpoints" / "drafts").mkdir(parents=True)
    (mine / "checkpoints" / "drafts" / "notes.txt").write_text("years of work")
    (mine / "recipe.yaml").write_text("my: settings\n")
    (mine / "config.json").write_text("{}")
    before = _snapshot(mine)
    argv = ["--train-file", str(data[0]), "--test-file", str(data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(mine), "--resume"]
    assert cli.train_main(argv) == 2
    assert "is not the directory of a balpoe-hf run (it has no balpoe_outputs.json listing what a run " \
           "wrote, nor a checkpoint of one in checkpoints/), so --resume will not touch it" in \
           capsys.readouterr().err
    assert _snapshot(mine) == before


def test_resume_never_writes_over_a_file_the_run_did_not_write(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    resume.check_output_dir(out, resume=True, overwrite=False)  # the run's own files: fine
    (out / "holdout_results.json").write_text('{"mine": true}')  # a name the run writes, not written by it
    with pytest.raises(TrainingError, match=r"--resume would write over \['holdout_results.json'\] in .*, "
                                            r"which balpoe-hf did not write there .*\(nothing was written\)"):
        resume.check_output_dir(out, resume=True, overwrite=False)
    with pytest.raises(TrainingError, match=r"--overwrite would write over \['holdout_results.json'\]"):
        resume.check_output_dir(out, resume=False, overwrite=True)
    (out / "holdout_results.json").unlink()
    (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # edited since
    with pytest.raises(TrainingError, match=r"--resume would write over \['config.json'\]"):
        resume.check_output_dir(out, resume=True, overwrite=False)


def test_output_dir_that_takes_no_files_is_refused_before_the_data_load(data, tmp_path, capsys, monkeypatch):
    def load(recipe):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr(training, "load_training_data", load)
    argv = ["--train-file", str(data[0]), "--test-file", str(data[1]), "--image-column", "picture",
            "--label-column", "target"]
    (tmp_path / "a-file").write_text("")
    assert cli.train_main([*argv, "--output-dir", str(tmp_path / "a-file" / "run")]) == 2
    assert f"cannot write --output-dir {tmp_path / 'a-file' / 'run'}: {tmp_path / 'a-file'} is a file" in \
        capsys.readouterr().err

    def read_only(*args, **kwargs):  # what a folder without write permission answers (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", read_only)
    assert cli.train_main([*argv, "--output-dir", str(tmp_path / "locked" / "run")]) == 2
    assert f"{tmp_path} does not take new files (Permission denied); choose a folder you can write to" in \
        capsys.readouterr().err
    assert not (tmp_path / "locked").exists()


def test_evaluate_output_replaces_only_reports_balpoe_evaluate_wrote(run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(run, model, ignore=shutil.ignore_patterns("checkpoints"))
    before = _snapshot(model)
    argv = ["--model", str(model), "--shifts", "uniform", "--prior", "none", "--device", "cpu", "--output"]
    for target in ("model.safetensors", "config.json", "recipe.yaml"):
        assert cli.evaluate_main([*argv, str(model / target)]) == 2
        assert f"would replace ['{model / target}'], which balpoe-evaluate did not write" in \
            capsys.readouterr().err
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "r_reliability.png").write_bytes(b"my picture")
    assert cli.evaluate_main([*argv, str(reports / "r.json")]) == 2
    assert f"would replace ['{reports / 'r_reliability.png'}']" in capsys.readouterr().err
    assert _snapshot(model) == before and (reports / "r_reliability.png").read_bytes() == b"my picture"
    # Its own reports: listed as balpoe-evaluate's (beside them, or in the run's manifest), replaced again.
    for output, owner in ((reports / "s.json", reports), (model / "eval" / "report.json", model)):
        assert cli.evaluate_main([*argv, str(output)]) == 0
        assert cli.evaluate_main([*argv, str(output)]) == 0
        manifest = run_folder.read_manifest(owner)
        assert output.relative_to(owner).as_posix() in manifest["reports"]
    assert "model.safetensors" not in run_folder.read_manifest(model)["reports"]
    capsys.readouterr()


# Silently wrong: gradient accumulation, 16-bit images, mismatched weights, a test set without a class


@pytest.mark.parametrize("batch_size,accumulation,steps", [(24, 4, 1), (8, 2, 4)])
def test_device_pipeline_steps_on_the_last_partial_accumulation(data, tmp_path, capsys, batch_size,
                                                                 accumulation, steps):
    # 60 training images: 2 batches of 24 with 4 accumulation steps, or 7 batches of 8 with 2: one and four
    # optimizer steps (the last accumulation partial), as a hand count and the worker pipeline give.
    recipe = _recipe(data, epochs=1, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     data_pipeline="device")
    training.train(recipe, tmp_path / "run")
    assert f"training 1 epochs of {steps} steps" in capsys.readouterr().out
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch-0001"
    # The lr scheduler, saved in every checkpoint, steps once per optimizer step.
    assert checkpoints.read_state(checkpoint, "scheduler")["last_epoch"] == steps
    assert len(checkpoints.read_state(checkpoint, "optimizer")["state"]) > 0  # momentum: it did step


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


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(run, tmp_path):
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
    model, processor = model_loading.load_model(run)
    logits16, _ = evaluation.predict(model, processor, gray16, image_column="picture")
    logits8, _ = evaluation.predict(model, processor, gray8, image_column="picture")
    torch.testing.assert_close(logits16, logits8, rtol=0, atol=0)


def test_evaluate_refuses_weights_that_do_not_fit_their_config(run, tmp_path, capsys, no_inference):
    model = tmp_path / "model"
    shutil.copytree(run, model, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((model / "config.json").read_text())
    argv = ["--model", str(model), "--device", "cpu"]
    for changes, message in [
            ({"num_experts": 4, "lambdas": [1.0, 0.5, 0.0, -1.5]}, "do not fit the model its config.json "
                                                                   "describes (num_experts 4, 4 classes"),
            ({"num_experts": 2, "lambdas": [1.0, -1.0]}, "do not fit the model its config.json describes"),
            ({"lambdas": [1.0, 0.0]}, "is not a valid BalPoE config: lambdas has 2 entries but there are 3"),
            ({"class_counts": [32, 16, 8]}, "class_counts has 3 entries but the model has 4 classes")]:
        (model / "config.json").write_text(json.dumps({**config, **changes}))
        assert cli.evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "MISSING" not in err, err  # no transformers load report either
    (model / "config.json").unlink()
    assert cli.evaluate_main(argv) == 2
    assert f"{model} has no config.json: a BalPoE model folder holds its config beside the weights" in \
        capsys.readouterr().err
    (model / "config.json").write_text(json.dumps(config))
    (model / "recipe.yaml").write_text("epochs: [\n")
    assert cli.evaluate_main(argv) == 2
    assert f"cannot parse the recipe file {model / 'recipe.yaml'}" in capsys.readouterr().err


def test_test_set_without_a_class_is_named_in_a_warning(run, data, tmp_path, capsys):
    ds = datasets.load_dataset("parquet", data_files=str(data[1]), split="train")
    without = tmp_path / "test.parquet"
    ds.filter(lambda row: row["target"] != 2).to_parquet(without)
    assert cli.evaluate_main(["--model", str(run), "--test-file", str(without), "--shifts", "uniform",
                              "--prior", "none", "--device", "cpu", "--output",
                              str(tmp_path / "report.json")]) == 0
    assert "warning: the test set has no image of classes [2]: balanced accuracy and the many / medium / " \
           "few-shot accuracies average over the 3 of 4 classes it has." in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes_without_test_images"] == [2]
    assert report["balanced"]["per_class_accuracy"][2] is None


# Recipe overrides, class counts, backbone kwargs, recipe and data files


def test_a_backbone_override_resets_what_the_recipe_set_for_its_backbone(tmp_path):
    # The recipe's backbone_kwargs ({zero_init_last: false}) are for its ResNeXt; the CIFAR ResNet has none.
    stale = recipes.make_recipe({**recipes.recipe_values("imagenet-lt-resnext50"),
                                 "backbone": "resnet20_cifar"})
    with pytest.raises(TrainingError, match=r"cannot build the backbone resnet20_cifar with backbone_kwargs "
                                            r"\{'zero_init_last': False\}: .*unexpected keyword argument"):
        training.check_model(stale)
    _, recipe = arguments.parse_args(["--recipe", "imagenet-lt-resnext50", "--backbone", "resnet20_cifar",
                                    "--epochs", "8"])
    assert recipe.backbone_kwargs == {} and recipe.lambdas == [1.0, -0.25, -1.5]
    assert recipe.overridden == ("backbone", "epochs", "backbone_kwargs")
    assert recipe.notes == ("the recipe's backbone_kwargs {'zero_init_last': False} were set for its "
                            "backbone resnext50_32x4d: dropped for resnet20_cifar (set them for it with "
                            "--backbone-kwargs)",)
    assert recipe.description.endswith("180 epochs, cosine lr 0.025, mixup 0.3 (overridden: "
                                       "backbone=resnet20_cifar, epochs=8; reset: backbone_kwargs)")
    training.check_model(recipe)  # builds
    # Set with the override, they are the user's; the Python API resolves the same way.
    _, given = arguments.parse_args(["--recipe", "imagenet-lt-resnext50", "--backbone", "resnet20_cifar",
                                   "--backbone-kwargs", '{"drop_rate": 0.1}'])
    assert given.backbone_kwargs == {"drop_rate": 0.1} and given.notes == ()
    assert recipes.load_recipe("imagenet-lt-resnext50", backbone="resnet20_cifar", epochs=8).to_dict() == \
        recipe.to_dict()
    # recipe.yaml says which fields were overridden, and reads back as the same recipe.
    resume.start_run(tmp_path / "run", recipe)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved[recipes.OVERRIDDEN_KEY] == ["backbone", "epochs", "backbone_kwargs"]
    assert recipes.load_recipe(config=tmp_path / "run" / "recipe.yaml").to_dict() == recipe.to_dict()
    # A config file over its base is an override too.
    (tmp_path / "mine.yaml").write_text("base: imagenet-lt-resnext50\nbackbone: resnet50\nepochs: 2\n")
    mine = recipes.load_recipe(config=tmp_path / "mine.yaml")
    assert mine.backbone_kwargs == {} and mine.overridden == ("backbone", "epochs", "backbone_kwargs")
    unchanged = recipes.load_recipe("imagenet-lt-resnext50")
    assert unchanged.overridden == () and "overridden" not in unchanged.description


def test_class_count_mismatch_is_one_line_naming_the_count_and_the_flag(data):
    # Four classes in the files, a 1,000-class recipe: 996 empty classes, listed as first few, last, count.
    with pytest.raises(loading.DataError) as error:
        loading.load_training_data(_recipe(data, num_classes=1000, imbalance_ratio=10.0))
    assert str(error.value) == (
        "classes [4, 5, 6, 7, 8, ..., 999] (996 classes) have no training image, but the model would have "
        "1000 classes (set by num_classes: the recipe's or --num-classes); BalPoE needs every class in the "
        "training prior. The data hold classes 0 to 3: set --num-classes 4.")
    from balpoe_hf.errors import short_list

    assert short_list([3, 1, 2]) == "[3, 1, 2]"
    assert short_list(range(10, 20), "files") == "[10, 11, 12, 13, 14, ..., 19] (10 files)"


def test_backbone_kwargs_the_backbone_refuses_stop_before_the_data_load(data, tmp_path, capsys, monkeypatch):
    def load(recipe):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr(training, "load_training_data", load)
    argv = ["--train-file", str(data[0]), "--test-file", str(data[1]), "--image-column", "picture",
            "--label-column", "target", "--backbone", "resnet20_cifar", "--output-dir", str(tmp_path / "run")]
    for kwargs, message in [('{"foo": 1}', "unexpected keyword argument 'foo'"),
                            ('{"depth": 56}', "multiple values for keyword argument 'depth'")]:
        assert cli.train_main([*argv, "--backbone-kwargs", kwargs]) == 2
        err = capsys.readouterr().err
        assert "cannot build the backbone resnet20_cifar with backbone_kwargs" in err and message in err
        assert "takes and does not set itself (--backbone-kwargs), or none." in err
    assert cli.train_main([*argv, "--backbone-kwargs", '{"in_chans": 1}']) == 2
    assert "backbone_kwargs sets in_chans=1, but training feeds RGB images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_files_that_are_not_one_yaml_mapping_are_refused(data, tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: cifar10-lt-ir100\nepochs: 3\nbase: imagenet-lt-resnext50\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(data[0].read_bytes()[:2000])
    for config, message in [(twice, f"cannot parse the recipe file {twice}: the key(s) ['base'] are given "
                                     "twice; keep one"),
                            (binary, f"the recipe file {binary} is not a text file"),
                            (tmp_path, f"recipe file {tmp_path} is a folder")]:
        assert cli.train_main(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_empty_parquet_file_is_named(data, tmp_path):
    empty = tmp_path / "empty.parquet"
    datasets.load_dataset("parquet", data_files=str(data[0]), split="train").select([]).to_parquet(empty)
    with pytest.raises(loading.DataError, match=r"empty\.parquet is a parquet file without rows"):
        loading.load_training_data(_recipe(data, train_file=[str(empty)]))


# balpoe-push


def test_push_refuses_bad_input_before_writing_anything(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "data.parquet").write_bytes(b"PAR1\x15\x04\x80\xff")
    before = _snapshot(model_dir)
    cases = [
        (["not a valid id!!"], "'not a valid id!!' is not a Hub repository id"),
        (["me/model", "--eval-report", str(tmp_path / "list.json")], "holds a JSON list, not an object"),
        (["me/model", "--eval-report", str(tmp_path / "broken.json")], "is not valid JSON"),
        (["me/model", "--eval-report", str(tmp_path / "data.parquet")], "is not valid JSON"),
    ]
    for args, message in cases:
        assert cli.push_main([str(model_dir), *args, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Nothing was written" in err, err
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(config[:-20])
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2
    assert f"the model config {model_dir / 'config.json'} is not valid JSON" in capsys.readouterr().err
    (model_dir / "config.json").write_text(config)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", read_only)
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2
    assert f"cannot write the model card into {model_dir}: {model_dir} does not take new files" in \
        capsys.readouterr().err
    assert _snapshot(model_dir) == before
