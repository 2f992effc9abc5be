"""Recipes, command line, data loading, transforms, schedules and error cases of the training code.

In-process and fast; the end-to-end runs through ``accelerate launch`` are in test_train_e2e.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_imagefolder, write_parquet

from balpoe_hf import recipes, run_folder
from balpoe_hf.cli import arguments
from balpoe_hf.data import loading, transforms
from balpoe_hf.data.splits import class_counts
from balpoe_hf.errors import TrainingError
from balpoe_hf.recipes import Recipe
from balpoe_hf.training import checkpoints, resume
from balpoe_hf.training import loop as training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> tuple[Path, Path]:
    return write_parquet(tmp_path_factory.mktemp("train_parquet"))


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local(parquet, **fields) -> Recipe:
    train, test = parquet
    values = {"train_file": [str(train)], "test_file": [str(test)], "image_column": "picture",
              "label_column": "target", "image_size": 16, "backbone": "resnet20_cifar"}
    return recipes.make_recipe({**values, **fields})


# --------------------------------------------------------------------------- recipes


def test_fashion_mnist_quick_recipe_shot_groups_cover_every_group():
    from balpoe_hf.data.splits import long_tailed_counts, shot_groups

    recipe = recipes.make_recipe(recipes.recipe_values("fashion-mnist-lt-quick"))
    counts = long_tailed_counts(6000, 10, recipe.imbalance_ratio)
    assert counts == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    # Training counts once a tenth of each class (rounded half up) is held out.
    training = [5400, 3236, 1940, 1163, 697, 418, 250, 149, 90, 54]
    assert recipe.holdout_fraction == 0.1
    groups = shot_groups(training, recipe.many_threshold, recipe.few_threshold)
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert shot_groups(training)["few"] == []  # why the recipe sets its own thresholds


def test_every_recipe_field_has_a_documented_flag():
    help_text = arguments.build_parser().format_help()
    for name, field in recipes.RECIPE_FIELDS.items():
        assert "--" + name.replace("_", "-") in help_text, name
        assert field.metadata["help"]


def test_command_line_overrides_the_recipe():
    args, recipe = arguments.parse_args([
        "--recipe", "cifar100-lt-ir100", "--epochs", "5", "--lambdas", "1", "0", "-1", "--num-experts", "3",
        "--mixup-alpha", "0", "--no-hflip", "--backbone-kwargs", '{"drop_rate": 0.1}',
        "--imbalance-ratio", "none", "--lr-milestones", "3", "4", "--mixed-precision", "bf16",
        "--train-file", "a.parquet", "b.parquet"])
    assert (recipe.epochs, recipe.lambdas, recipe.mixup_alpha) == (5, [1.0, 0.0, -1.0], 0.0)
    assert recipe.hflip is False
    assert recipe.backbone_kwargs == {"drop_rate": 0.1}
    assert recipe.imbalance_ratio is None and recipe.lr_milestones == [3, 4]
    assert recipe.mixed_precision == "bf16" and recipe.train_file == ["a.parquet", "b.parquet"]
    # Fields left alone keep the recipe's value.
    assert recipe.lr == 0.1 and recipe.label_column == "fine_label"
    assert args.output_dir == "runs/cifar100-lt-ir100"
    _, recipe = arguments.parse_args(["--recipe", "cifar100-lt-ir100", "--num-experts", "5",
                                     "--lambdas", "none"])
    assert recipe.lambdas == [1.0, 0.5, 0.0, -0.5, -1.0]  # 5 lambdas evenly spaced from 1 to -1


def test_config_file_starts_from_a_base_recipe(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("base: cifar10-lt-ir50\nname: mine\nepochs: 3\nlambdas: [0.5, -0.5]\nnum_experts: 2\n")
    args, recipe = arguments.parse_args(["--config", str(config), "--epochs", "7"])
    assert (recipe.name, recipe.epochs, recipe.lambdas, recipe.num_experts) == ("mine", 7, [0.5, -0.5], 2)
    assert recipe.imbalance_ratio == 50 and recipe.mixup_alpha == 0.8  # from the base
    assert args.output_dir == "runs/mine"
    # The resolved recipe written to a run reads back as the same recipe.
    recipes.save_recipe(recipe, tmp_path / "recipe.yaml")
    assert recipes.recipe_differences(recipe, tmp_path / "recipe.yaml") == {}
    assert recipes.make_recipe(recipes.recipe_values(config=tmp_path / "recipe.yaml")) == recipe


@pytest.mark.parametrize("values,message", [
    ({"epochs": "many"}, "epochs must be int"),
    ({"colour": 1}, "unknown recipe fields ['colour']"),
    ({"lambdas": [1.0, 0.0]}, "lambdas has 2 entries but there are 3 experts"),
    ({"batch_size": 7, "mixup_alpha": 0.2}, "batch_size must be even"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of ['multistep', 'cosine', 'constant']"),
    ({"few_threshold": 200, "many_threshold": 100}, "few_threshold (200) must not exceed many_threshold"),
    ({"seed": 2**32}, "seed must be below 2**32 = 4294967296 (numpy seeds its generators with 32-bit"),
    ({"split_seed": 10**20}, "split_seed must be below 2**32"),
])
def test_bad_recipe_values_are_explained(values, message):
    with pytest.raises(TrainingError) as error:
        recipes.make_recipe(values)
    assert message in str(error.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(TrainingError) as error:
        recipes.recipe_values("cifar1000")
    assert "unknown recipe 'cifar1000'" in str(error.value)
    for name in recipes.available_recipes():
        assert name in str(error.value)


def test_recipe_files_take_no_yaml_aliases_and_base_names_a_shipped_recipe(tmp_path):
    # A "billion laughs" in backbone_kwargs gave a 40 MB error message.
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("base: cifar10-lt-local\nbackbone_kwargs:\n  a: &a [lol, lol, lol, lol, lol]\n"
                      + "".join(f"  {x}: &{x} [{', '.join([f'*{y}'] * 9)}]\n"
                                for y, x in zip("abcdefgh", "bcdefghi", strict=True)))
    with pytest.raises(TrainingError) as error:
        recipes.load_recipe(config=laughs)
    assert len(str(error.value)) < 400
    assert "the alias *a repeats an anchored value; recipe files take no anchors (&name) or aliases" in str(
        error.value)
    # `base: ../../...` read YAML outside the recipes folder.
    outside = tmp_path / "outside.yaml"
    outside.write_text("epochs: 2\n")
    relative = "../" * 12 + str(outside.with_suffix("")).lstrip("/")  # from the recipes folder to it
    escape = tmp_path / "escape.yaml"
    escape.write_text(f"base: {relative}\n")
    for load in (lambda: recipes.load_recipe(config=escape), lambda: recipes.load_recipe(relative)):
        with pytest.raises(TrainingError, match=r"unknown recipe '\.\./\.\./.*outside'; the known recipes"):
            load()


def test_the_largest_seed_trains_past_its_first_epoch(parquet, tmp_path):
    # seed + epoch passed 2**32 in epoch 2 (numpy's seeds): epoch seeds wrap, the same below that.
    assert training.epoch_global_seed(7, 3) == 10
    # Below 2**32 also with accelerate's process index added.
    assert 0 <= training.epoch_global_seed(2**32 - 1, 1) + 2**16 - 1 < 2**32
    recipe = _local(parquet, seed=2**32 - 1, epochs=2, batch_size=16, num_workers=0, eval_every=0,
                    warmup_epochs=0)
    assert training.train(recipe, tmp_path / "run").train_results["epochs"] == 2


# --------------------------------------------------------------------------- data and transforms


def test_parquet_data_keeps_counts_and_class_names(parquet):
    data = loading.load_training_data(_local(parquet))
    assert data.class_counts == TRAIN_COUNTS and data.class_names == CLASS_NAMES
    assert len(data.test) == TEST_PER_CLASS * len(CLASS_NAMES)


def test_long_tailed_split_of_a_balanced_set(parquet, tmp_path):
    # A copy of the balanced test file as training data (the file itself would overlap the test data),
    # ratio 4: class i keeps int(8 * 4 ** (-i / 3)) images.
    balanced = tmp_path / "balanced.parquet"
    balanced.write_bytes(parquet[1].read_bytes())
    recipe = _local(parquet, train_file=[str(balanced)], imbalance_ratio=4.0)
    assert loading.load_training_data(recipe).class_counts == [8, 5, 3, 2]


def test_imagefolder_data(tmp_path):
    train, test = write_imagefolder(tmp_path)
    recipe = recipes.make_recipe({"train_file": [str(train)], "test_file": [str(test)]})
    data = loading.load_training_data(recipe)
    # imagefolder labels the sub-folders in sorted order: blue, green, red, yellow.
    assert data.class_names == sorted(CLASS_NAMES)
    assert data.class_counts == [8, 16, 32, 4]


def test_fashion_mnist_lt_from_the_debian_files():
    recipe = recipes.make_recipe(recipes.recipe_values("fashion-mnist-lt-quick"))
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    data = loading.load_training_data(recipe)
    # Published sizes: 60,000 training images, 6,000 per class (the head class keeps them all at IR100) and
    # 10,000 test images of 28x28, 1,000 per class.
    assert len(data.test) == 10_000 and data.test[0]["image"].size == (28, 28)
    assert class_counts(data.test) == [1000] * 10
    # The long-tailed split's 14,886 images, a tenth of every class held out (recipe holdout_fraction 0.1,
    # rounded: 600, 360, 216, 129, 77, 46, 28, 17, 10, 6).
    assert len(data.train) + len(data.holdout) == 14_886
    assert data.holdout_counts == [600, 360, 216, 129, 77, 46, 28, 17, 10, 6]
    assert data.class_counts == [5400, 3236, 1940, 1163, 697, 418, 250, 149, 90, 54]
    # Zalando's names (its README), not the Hub copy's "T - shirt / top".
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_transforms_feed_rgb_and_evaluation_matches_the_saved_processor(parquet, tmp_path):
    from transformers import AutoImageProcessor

    recipe = _local(parquet)
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


def test_missing_columns_and_labels_out_of_range_are_explained(parquet, tmp_path):
    with pytest.raises(TrainingError, match=r"no image column 'img'.*--image-column"):
        loading.load_training_data(_local(parquet, image_column="img"))
    with pytest.raises(TrainingError, match=r"labels \[3\] outside the class range \[0, 2\]"):
        loading.load_training_data(_local(parquet, num_classes=3))
    recipe = _local((parquet[0], tmp_path / "missing.parquet"))
    with pytest.raises(TrainingError, match=r"missing\.parquet' matches no file"):
        loading.load_training_data(recipe)


def test_hub_dataset_while_offline_points_at_local_files(monkeypatch):
    import huggingface_hub.constants

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    recipe = recipes.make_recipe(recipes.recipe_values("cifar100-lt-ir100"))
    with pytest.raises(TrainingError, match=r"offline mode is on.*--train-file/--test-file"):
        loading.load_training_data(recipe)


def test_recipe_without_data_asks_for_files():
    recipe = recipes.make_recipe(recipes.recipe_values("cifar10-lt-local"))
    with pytest.raises(TrainingError, match="names no data: pass --train-file and --test-file"):
        loading.load_training_data(recipe)


# --------------------------------------------------------------------------- schedule, runs, launch


def test_learning_rate_schedules():
    multistep = training.lr_lambda(recipes.make_recipe({"warmup_epochs": 2, "lr_milestones": [3, 4],
                                                         "lr_gamma": 0.1, "epochs": 5}), steps_per_epoch=10)
    assert [multistep(s) for s in (0, 9, 19)] == [0.05, 0.5, 1.0]  # linear warm-up over 20 steps
    assert [multistep(s) for s in (20, 29, 30, 39, 40, 49)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = training.lr_lambda(recipes.make_recipe({"warmup_epochs": 0, "lr_schedule": "cosine",
                                                      "epochs": 4}), steps_per_epoch=25)
    assert [cosine(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert cosine(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_output_directory_rules(tmp_path):
    resume.check_output_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"not empty\. Pass --resume .* --overwrite"):
        resume.check_output_dir(tmp_path / "old", resume=False, overwrite=False)
    # --resume and --overwrite act on a run's directory only (tests/test_robustness.py has the details).
    with pytest.raises(TrainingError, match="is not the directory of a balpoe-hf run"):
        resume.check_output_dir(tmp_path / "old", resume=True, overwrite=False)
    run_folder.record_outputs(tmp_path / "old", [tmp_path / "old" / "config.json"], resume.RUN_FOLDERS)
    resume.check_output_dir(tmp_path / "old", resume=True, overwrite=False)
    resume.check_output_dir(tmp_path / "old", resume=False, overwrite=True)


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    for epoch in (1, 2, 3, 10):
        path = checkpoints.checkpoint_dir(tmp_path, epoch)
        path.mkdir(parents=True)
        if epoch != 10:  # epoch 10 was being written when the run died
            (path / checkpoints.TRAINER_STATE).write_text(json.dumps({"epoch": epoch}))
    complete = checkpoints.completed_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    checkpoints.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003"]


@pytest.mark.parametrize("env,processes,fails", [
    ({}, 1, False),
    ({"WORLD_SIZE": "2"}, 2, False),
    ({"WORLD_SIZE": "2"}, 1, True),
    # accelerate's single-process launcher asked for --num_processes 2 (it exports MASTER_ADDR, not RANK).
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}, 1, True),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, 1, False),
])
def test_world_size_check(monkeypatch, env, processes, fails):
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if fails:
        with pytest.raises(TrainingError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
            training.check_world_size(processes)
    else:
        training.check_world_size(processes)


# --------------------------------------------------------------------------- the script's error exits


@pytest.mark.parametrize("extra,message", [
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'; the known recipes are: cifar10-lt"),
    (["--image-column", "img"], "the train split has no image column 'img'"),
    (["--num-classes", "3"], "outside the class range [0, 2]"),
    (["--backbone", "efficientnet_b0"], "cannot build the model"),
    (["--backbone", "no_such_net"], "'no_such_net' is not a timm model name"),
])
def test_script_errors_exit_non_zero_with_a_message(train_script, parquet, tmp_path, capsys, extra, message):
    train, test = parquet
    argv = ["--train-file", str(train), "--test-file", str(test), "--image-column", "picture",
            "--label-column", "target", "--image-size", "16", "--output-dir", str(tmp_path / "run"), *extra]
    assert train_script.main(argv) == 2
    assert message in capsys.readouterr().err


def test_script_refuses_a_non_empty_output_directory(train_script, parquet, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    argv = ["--recipe", "fashion-mnist-lt-quick", "--output-dir", str(tmp_path / "run")]
    assert train_script.main(argv) == 2
    assert "is not empty. Pass --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_push_to_hub_needs_an_id_and_the_network(train_script, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    argv = ["--recipe", "fashion-mnist-lt-quick", "--output-dir", str(tmp_path / "run"), "--push-to-hub"]
    assert train_script.main(argv) == 2
    assert "--push-to-hub needs --hub-model-id" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert train_script.main([*argv, "--hub-model-id", "me/x"]) == 2  # before any training
    assert "--push-to-hub needs the network, but offline mode is on" in capsys.readouterr().err


def test_list_recipes_prints_every_shipped_recipe(capsys):
    from balpoe_hf import cli

    assert cli.train_main(["--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipes.available_recipes()
    (quick,) = [line for line in lines if line.startswith("fashion-mnist-lt-quick ")]
    assert "Fashion-MNIST-LT IR100" in quick
