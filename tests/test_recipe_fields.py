"""balpoe_hf.recipes.recipe: the model's fields come from BalPoEConfig's one declaration, a recipe is checked
once when it is built, and the shot-group thresholds are one pair of constants."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from transformers import PreTrainedConfig

from balpoe_hf import hub, metrics, recipes
from balpoe_hf.cli.describe_split import DescribeSplitArguments
from balpoe_hf.data.splits import shot_groups
from balpoe_hf.errors import TrainingError
from balpoe_hf.models.balpoe.configuration_balpoe import BalPoEConfig

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(BalPoEConfig)}


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
    from balpoe_hf.cli.arguments import parse_args

    recipes.recipe_defaults()  # the defaults: a recipe built once per process, before the one counted here
    calls = []
    check = recipes.Recipe.validate
    monkeypatch.setattr(recipes.Recipe, "validate", lambda self: calls.append(1) or check(self))
    _, recipe = parse_args(["--recipe", "fashion-mnist-lt-quick", "--epochs", "1", "--output-dir",
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
