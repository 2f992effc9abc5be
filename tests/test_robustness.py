"""Bad input and faults (issue 14): each gets a clear error naming the problem, or leaves files untouched.

One section per item of the issue; checkpoints and resume (items 6, 7, 9 and the step checkpoints of issue
15) are in test_checkpoints.py. Runs are in-process on the tiny dataset of ``train_synthetic``.
"""

from __future__ import annotations

import importlib.util
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
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_imagefolder, write_parquet

from balpoe_hf import (
    BalPoEConfig,
    BalPoEForImageClassification,
    BalPoELoss,
    build_image_processor,
    checkpoints,
    cli,
    evaluation,
    hub,
    loading,
    recipes,
    training,
    transforms,
)
from balpoe_hf.data import long_tailed_counts, make_long_tailed, make_shifted_test
from balpoe_hf.recipes import TrainingError

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
    checkpoints.record_outputs(out, [out / "eval" / "report.json"])
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
        checkpoints.check_output_dir(out, resume=False, overwrite=True,
                                     inputs=[out / "logs" / "train.parquet"])
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "# my notes\n")
    with pytest.raises(TrainingError, match=r"--overwrite would delete \['recipe.yaml'\] .* changed since "
                                            r"balpoe-hf wrote them"):
        checkpoints.check_output_dir(out, resume=False, overwrite=True)
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
    with pytest.raises(hub.HubFolderError, match=r"holds \['README.md'\], which balpoe-hf did not write"):
        hub.prepare_hub_folder(model_dir)
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 1
    assert "Nothing was written" in capsys.readouterr().err
    assert _snapshot(model_dir) == before


def test_hub_folder_is_checked_before_anything_is_written(model_dir):
    (model_dir / "preprocessor_config.json").unlink()
    before = _snapshot(model_dir)
    with pytest.raises(hub.HubFolderError, match=r"no preprocessor_config\.json"):
        hub.prepare_hub_folder(model_dir)
    assert _snapshot(model_dir) == before  # no README.md, no images/


def test_hub_folder_rewrites_its_own_card_but_not_an_edited_one(model_dir):
    hub.prepare_hub_folder(model_dir)
    hub.prepare_hub_folder(model_dir, "me/renamed")  # its own files: replaced
    assert "me/renamed" in (model_dir / "README.md").read_text()
    (model_dir / "images" / "class_counts.png").write_bytes(b"my picture")
    with pytest.raises(hub.HubFolderError, match=r"\['images/class_counts.png'\].*or which were edited"):
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
    ({"image_size": 0}, "image_size must be at least 1, got 0"),
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
    guard = checkpoints.NonFiniteLossGuard(torch.device("cpu"))
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
    loader = torch.utils.data.DataLoader(train_set, batch_size=8, num_workers=1)
    with pytest.raises(loading.DataError) as error:
        list(loader)
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
    assert f"cannot write --output {argv[3]}: {tmp_path / 'a-file'} is a file, not a directory" in \
        capsys.readouterr().err
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
    with pytest.raises(evaluation.EvaluationError, match=r"the weights in .* cannot be read .*truncated or "
                                                         r"damaged; save the model again"):
        evaluation.load_model(copy)


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
    with pytest.raises(evaluation.EvaluationError, match=r"need matplotlib: .*'balpoe-hf\[plots\]'"):
        evaluation.check_output(tmp_path / "report.json")
    with pytest.raises(hub.HubFolderError, match=r"needs matplotlib: pip install 'balpoe-hf\[hub\]'"):
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
