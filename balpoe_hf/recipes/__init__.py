"""Training recipes: the ``Recipe`` dataclass, the shipped YAML recipes, and how a run's recipe is resolved.

A *recipe* is a flat set of training settings (``Recipe``), shipped as YAML files in
``balpoe_hf/recipes/``. A run resolves its settings in three layers: the ``Recipe`` defaults, then a
shipped recipe (``--recipe NAME``) or the user's own YAML file (``--config FILE``, which may start from a
shipped recipe with ``base: NAME``), then the overrides: command-line flags, one per recipe field
(``--epochs 5 --lambdas 1 0 -1``, ``balpoe_hf.cli.arguments``), or ``load_recipe``'s keyword arguments. YAML
values are checked against the field types here (``coerce_field``: ``HfArgumentParser.parse_dict`` /
``parse_yaml_file`` do not check them), as are the settings that would otherwise fail late or silently
(``Recipe.validate``).

A layer that changes the backbone (a ``--backbone`` flag over a recipe, a config file over its ``base``)
resets the fields a recipe sets *for* its backbone (``BACKBONE_FIELDS``: ``backbone_kwargs`` such as
``zero_init_last`` for a ResNeXt, ``shared_stages``) unless the same layer sets them too, with a note. The
recipe's image size and normalisation stay: the shipped recipes give the statistics of their data, not of a
backbone. The fields a layer changed are listed in ``Recipe.overridden``, the recipe's ``description`` says
so (``"... (overridden: epochs=8, backbone=resnet20_cifar; reset: backbone_kwargs)"``) and a run's
``recipe.yaml`` (``save_recipe``) lists them under ``overridden_fields`` (``OVERRIDDEN_KEY``), the one key of
that file that is not a recipe field; reading the file back as a recipe drops it.

The model's fields (``MODEL_FIELDS``) are ``BalPoEConfig``'s settings, derived from the config (type,
allowed values, default, help, rules); with ``method`` they are the ``CONFIG_FIELDS`` that a run copies into
its config (``Recipe.model_config``) and that a resumed run must keep.
"""

from .recipe import (
    CONFIG_FIELDS,
    FEW_SHOT_THRESHOLD,
    MANY_SHOT_THRESHOLD,
    MODEL_FIELDS,
    RECIPE_FIELDS,
    SEED_LIMIT,
    Recipe,
    coerce_field,
    recipe_defaults,
    unwrap_optional,
)
from .resolve import (
    BACKBONE_FIELDS,
    OVERRIDDEN_KEY,
    RECIPES_DIR,
    Resolution,
    available_recipes,
    check_method_overrides,
    load_recipe,
    make_recipe,
    override,
    read_recipe_file,
    recipe_differences,
    recipe_values,
    resolve_layers,
    resolved_recipe,
    save_recipe,
)

__all__ = [
    "BACKBONE_FIELDS",
    "CONFIG_FIELDS",
    "FEW_SHOT_THRESHOLD",
    "MANY_SHOT_THRESHOLD",
    "MODEL_FIELDS",
    "OVERRIDDEN_KEY",
    "RECIPES_DIR",
    "RECIPE_FIELDS",
    "SEED_LIMIT",
    "Recipe",
    "Resolution",
    "available_recipes",
    "check_method_overrides",
    "coerce_field",
    "load_recipe",
    "make_recipe",
    "override",
    "read_recipe_file",
    "recipe_defaults",
    "recipe_differences",
    "recipe_values",
    "resolve_layers",
    "resolved_recipe",
    "save_recipe",
    "unwrap_optional",
]
