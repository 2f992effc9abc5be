"""balpoe_hf.recipes and the recipe flags of balpoe-train (balpoe_hf.cli.arguments): the shipped recipes,
config files over a base, command-line overrides, the checks of every field, the model's fields derived from
BalPoEConfig's one declaration (a recipe checked once, when built), and the shot-group thresholds.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from transformers import PreTrainedConfig

from balpoe_hf import cli, hub, metrics, recipes
from balpoe_hf.cli import arguments
from balpoe_hf.cli.describe_split import DescribeSplitArguments
from balpoe_hf.data.splits import long_tailed_counts, shot_groups
from balpoe_hf.errors import TrainingError
from balpoe_hf.models.balpoe.configuration_balpoe import BalPoEConfig
from balpoe_hf.training import loop as training
from balpoe_hf.training import resume

REPO = Path(__file__).resolve().parents[1]
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(BalPoEConfig)}


def test_fashion_mnist_quick_recipe_shot_groups_cover_every_group():
    from balpoe_hf.data.splits import shot_groups

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


def test_list_recipes_prints_every_shipped_recipe(capsys):
    from balpoe_hf import cli

    assert cli.train_main(["--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipes.available_recipes()
    (quick,) = [line for line in lines if line.startswith("fashion-mnist-lt-quick ")]
    assert "Fashion-MNIST-LT IR100" in quick


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


def test_lr_nan_on_the_command_line_is_refused_before_training(tiny_data, tmp_path, capsys):
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(tmp_path / "run"), "--lr", "nan"]
    assert cli.train_main(argv) == 2
    assert "lr must be finite, got nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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


def test_recipe_files_that_are_not_one_yaml_mapping_are_refused(tiny_data, tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: cifar10-lt-ir100\nepochs: 3\nbase: imagenet-lt-resnext50\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(tiny_data[0].read_bytes()[:2000])
    for config, message in [(twice, f"cannot parse the recipe file {twice}: the key(s) ['base'] are given "
                                     "twice; keep one"),
                            (binary, f"the recipe file {binary} is not a text file"),
                            (tmp_path, f"recipe file {tmp_path} is a folder")]:
        assert cli.train_main(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_the_model_fields_are_the_configs_settings_with_its_defaults_and_help():
    # The settings a recipe has no use for, by hand: the data's class counts, what a trained model is given,
    # a local weights file; `method` is declared by the recipe (a preset it applies).
    not_in_recipe = {"class_counts", "target_prior", "calibration", "shift_estimator",
                     "backbone_weights_file", "method"}
    settings = set(CONFIG_FIELDS) - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert set(recipes.MODEL_FIELDS) == settings - not_in_recipe
    for name in recipes.MODEL_FIELDS:
        assert recipes.RECIPE_FIELDS[name].default == CONFIG_FIELDS[name].default, name
    # The help is the config docstring's entry for the setting (an entry for two settings gives both).
    help_of = {name: recipes.RECIPE_FIELDS[name].metadata["help"] for name in recipes.MODEL_FIELDS}
    assert help_of["num_experts"] == "Number of experts sharing the trunk."
    assert help_of["classifier_scale"] == "Scale of the cosine classifier."
    assert help_of["image_mean"] == help_of["image_std"] == (
        "Normalisation of the RGB input; default to the timm model's pretrained config.")
    # Allowed values: the config's Literal types reach the recipe (and its "did you mean").
    with pytest.raises(TrainingError, match=r"classifier must be one of \['cosine', 'linear'\].*'cosine'"):
        recipes.Recipe(classifier="cosin")


def test_a_rule_of_the_config_is_the_recipes_rule_with_the_configs_message():
    with pytest.raises(ValueError) as by_config:
        BalPoEConfig(classifier_scale=-1.0)
    with pytest.raises(TrainingError) as by_recipe:
        recipes.Recipe(classifier_scale=-1.0)
    assert str(by_recipe.value) == f"model settings: {by_config.value}"


def test_the_backbones_input_is_the_default_of_image_size_mean_and_std():
    # timm's ResNet-50 takes 224-pixel images normalised with ImageNet's statistics (its pretrained config).
    recipe = recipes.Recipe(backbone="resnet50")
    assert (recipe.image_size, recipe.image_mean, recipe.image_std) == (
        224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # The CIFAR ResNets: CIFAR-10's statistics at 32 pixels, the default recipe's.
    assert recipes.Recipe().image_mean == [0.4914, 0.4822, 0.4465] and recipes.Recipe().image_size == 32
    assert recipes.Recipe(backbone="resnet50", image_size=64).image_size == 64
    # Lambdas evenly spaced from 1 to -1, as the config spaces them.
    assert recipes.Recipe(num_experts=5).lambdas == [1.0, 0.5, 0.0, -0.5, -1.0]


def test_a_recipe_is_checked_once_when_built_and_checking_changes_nothing(monkeypatch):
    recipes.recipe_defaults()  # the defaults: a recipe built once per process, before the one counted here
    calls = []
    check = recipes.Recipe.validate
    monkeypatch.setattr(recipes.Recipe, "validate", lambda self: calls.append(1) or check(self))
    recipe = recipes.load_recipe("fashion-mnist-lt-quick", method="bs", epochs=2)
    assert len(calls) == 1
    assert (recipe.num_experts, recipe.lambdas) == (1, [0.0])  # the preset, applied when built
    before = recipe.to_dict()
    recipe.validate()
    assert recipe.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.epochs = 0  # type: ignore[misc]
    with pytest.raises(TrainingError, match="epochs must be at least 1"):
        dataclasses.replace(recipe, epochs=0)


def test_a_command_line_run_checks_its_recipe_once(monkeypatch, tmp_path):
    recipes.recipe_defaults()  # the defaults: a recipe built once per process, before the one counted here
    calls = []
    check = recipes.Recipe.validate
    monkeypatch.setattr(recipes.Recipe, "validate", lambda self: calls.append(1) or check(self))
    _, recipe = arguments.parse_args(["--recipe", "fashion-mnist-lt-quick", "--epochs", "1", "--output-dir",
                            str(tmp_path / "run")])
    assert recipe.epochs == 1 and len(calls) == 1


def test_the_card_takes_a_missing_recipe_field_at_the_recipes_default():
    # A recipe.yaml without weight_decay (an earlier release's): the recipe's 5e-4, the paper's.
    recipe = {"epochs": 200, "batch_size": 128, "lr": 0.1, "lr_milestones": [160, 180]}
    config = {"num_experts": 3, "lambdas": [1.0, 0.0, -1.0], "class_counts": [50, 10]}
    schedule = dict(hub.describe_run(config, recipe)["rows"])["Schedule"]
    assert "weight decay 0.0005" in schedule and "Nesterov momentum 0.9" in schedule


def test_the_shot_group_thresholds_are_one_pair_of_constants():
    # Many-shot: more than 100 training images; few-shot: fewer than 20 (Liu et al., CVPR 2019).
    assert (recipes.MANY_SHOT_THRESHOLD, recipes.FEW_SHOT_THRESHOLD) == (100, 20)
    assert shot_groups([101, 100, 20, 19]) == {"many": [0], "medium": [1, 2], "few": [3]}
    for function in (metrics.accuracy_report, metrics.long_tail_report, metrics.long_tail_compute_metrics):
        parameters = inspect.signature(function).parameters
        assert (parameters["many"].default, parameters["few"].default) == (100, 20)
    assert (recipes.Recipe().many_threshold, recipes.Recipe().few_threshold) == (100, 20)
    assert (DescribeSplitArguments.__dataclass_fields__["many"].default,
            DescribeSplitArguments.__dataclass_fields__["few"].default) == (100, 20)
