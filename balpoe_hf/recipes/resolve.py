"""How a run's recipe is resolved: the shipped YAML recipes and recipe files, the layers (defaults < recipe or
config file < overrides), the type checks of YAML values, and the ``recipe.yaml`` a run saves (see the
package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TrainingError
from .methods import method_conflicts
from .recipe import RECIPE_FIELDS, Recipe, recipe_defaults

RECIPES_DIR = Path(__file__).parent  # the shipped YAML recipes live beside this module


# A run's recipe.yaml: the fields set over the recipe (see the module docstring); not a recipe field.
OVERRIDDEN_KEY = "overridden_fields"
# Fields a recipe sets for its backbone, reset when a layer over it changes the backbone (module docstring).
BACKBONE_FIELDS = ("backbone_kwargs", "shared_stages")


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last) and
    YAML aliases (``*name``): a recipe has no use for them, and nested ones expand exponentially (the
    "billion laughs"), into a value whose every printing, in an error message say, takes gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"the alias *{event.anchor} repeats an anchored value; recipe files take no "
                "anchors (&name) or aliases (*name): write the value out", event.start_mark)
        return super().compose_node(parent, index)


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    twice = sorted({str(key) for key in keys if keys.count(key) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(None, None, f"the key(s) {twice} are given twice; keep one",
                                                node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a recipe YAML file (a shipped recipe, a ``--config`` file, a run's ``recipe.yaml``).

    Raises ``TrainingError`` for a file that cannot be read as YAML text (binary, a folder, malformed, a key
    given twice) or that holds anything but a mapping.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise TrainingError(f"the recipe file {path} is not a text file; give a YAML file of recipe fields "
                            "(e.g. `epochs: 8`).") from None
    except OSError as error:
        raise TrainingError(f"cannot read the recipe file {path}: {error.strerror or error}.") from None
    except yaml.YAMLError as error:
        raise TrainingError(f"cannot parse the recipe file {path}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainingError(f"the recipe file {path} must hold a mapping of recipe fields, got "
                            f"{type(values).__name__}.")
    values.pop(OVERRIDDEN_KEY, None)  # a run's record of how its recipe was made, not a setting
    return values


def _default(name: str) -> Any:
    return recipe_defaults()[name]


def _brief(name: str, value: Any) -> str:
    """``name=value`` for a description; just ``name`` for a list or mapping (paths, lambdas)."""
    return name if isinstance(value, list | dict) else f"{name}={value}"


@dataclass
class Resolution:
    """A recipe layer with another over it (``override``): the values, what changed, notes for the user."""

    values: dict[str, Any]
    overridden: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def override(values: dict[str, Any], given: dict[str, Any]) -> Resolution:
    """``values`` (a recipe or base layer) with ``given`` (a config file, flags, keywords) over it.

    A ``given`` backbone other than the layer's resets the layer's ``BACKBONE_FIELDS`` that ``given`` does not
    set (with a note); the fields that end up changed (``name`` and ``description`` aside) are listed, and the
    layer's description gets them appended unless ``given`` has its own.
    """
    merged = {**values, **given}
    reset, notes = [], []
    backbone = values.get("backbone", _default("backbone"))
    if "backbone" in given and given["backbone"] != backbone:
        for name in BACKBONE_FIELDS:
            if name not in given and values.get(name, _default(name)) != _default(name):
                merged[name] = _default(name)
                reset.append(name)
                flag = "--" + name.replace("_", "-")
                notes.append(f"the recipe's {name} {values[name]!r} were set for its backbone {backbone}: "
                             f"dropped for {given['backbone']} (set them for it with {flag})")
    changed = [name for name in given if name not in ("name", "description")
               and given[name] != values.get(name, _default(name) if name in RECIPE_FIELDS else None)]
    description = values.get("description")
    if description and "description" not in given and (changed or reset):
        what = ", ".join(_brief(name, merged[name]) for name in changed)
        merged["description"] = (f"{description} (overridden: {what}" + (f"; reset: {', '.join(reset)}"
                                                                          if reset else "") + ")")
    return Resolution(merged, changed + reset, notes)


def resolve_layers(name: str | None, config: str | Path | None) -> Resolution:
    """The recipe layer: the shipped recipe ``name`` or the YAML file ``config`` (over its ``base``)."""
    if config is not None and name is not None:
        raise TrainingError("give either --recipe or --config, not both (a config file can start from a "
                            "recipe with `base: NAME`).")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise TrainingError(f"recipe file {path} {'is a folder' if path.is_dir() else 'does not exist'}.")
        values = read_recipe_file(path)
        base = values.pop("base", None)
        if base is None:
            return Resolution(values)
        if not isinstance(base, str):
            raise TrainingError(f"`base:` in {path} must name a shipped recipe, got {base!r}.")
        lower = resolve_layers(base, None)
        layer = override(lower.values, values)
        return Resolution(layer.values, lower.overridden + layer.overridden, lower.notes + layer.notes)
    if name is None:
        return Resolution({})
    path = RECIPES_DIR / f"{name}.yaml"
    # A name, not a path: `base: ../../elsewhere` must not read YAML outside the shipped recipes.
    if name not in available_recipes():
        known = ", ".join(available_recipes())
        raise TrainingError(f"unknown recipe {name!r}; the known recipes are: {known}. "
                            "Use --config FILE.yaml for your own.")
    values = read_recipe_file(path)
    values.setdefault("name", name)
    return Resolution(values)


def recipe_values(name: str | None = None, config: str | Path | None = None) -> dict[str, Any]:
    """The raw values of a shipped recipe ``name`` or of a YAML file ``config`` (with its ``base`` merged)."""
    return resolve_layers(name, config).values


def make_recipe(values: dict[str, Any]) -> Recipe:
    """A checked ``Recipe`` from a mapping of field values (unknown keys are an error)."""
    unknown = sorted(set(values) - set(RECIPE_FIELDS))
    if unknown:
        raise TrainingError(f"unknown recipe fields {unknown}; the fields are: {', '.join(RECIPE_FIELDS)}.")
    return Recipe(**values)


def resolved_recipe(lower: Resolution, given: dict[str, Any]) -> Recipe:
    """The validated ``Recipe`` of the layer ``lower`` with the explicit settings ``given`` over it."""
    layer = override(lower.values, given)
    check_method_overrides(layer.values.get("method"), {k: v for k, v in given.items() if k != "method"})
    recipe = make_recipe(layer.values)
    recipe.record_resolution(lower.overridden + layer.overridden, lower.notes + layer.notes)
    return recipe


def load_recipe(name: str | None = None, config: str | Path | None = None, **overrides: Any) -> Recipe:
    """A shipped recipe or a YAML file, with field overrides: the Python equivalent of the command line.

    ``load_recipe("fashion-mnist-lt-quick", epochs=1)`` is ``--recipe fashion-mnist-lt-quick --epochs 1``;
    ``recipe.overridden`` lists the fields changed from the recipe, ``recipe.notes`` what was reset.
    """
    return resolved_recipe(resolve_layers(name, config), overrides)


def check_method_overrides(method: str | None, given: dict[str, Any]) -> None:
    """Refuse settings the user gave explicitly (flags, keyword overrides) that ``method`` would replace.

    A method preset overrides the recipe's own values on purpose; an explicit contradicting value is a
    mistake that would otherwise be dropped silently.
    """
    if method is None:
        return
    try:
        conflicts = method_conflicts(method, given)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if conflicts:
        listed = ", ".join(f"{name}={given!r} (the method sets {value!r})"
                           for name, (given, value) in conflicts.items())
        raise TrainingError(f"method {method!r} sets {', '.join(conflicts)} itself, but {listed} was given; "
                            "drop those settings or the method (see balpoe_hf.recipes.methods).")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML, with ``overridden_fields`` when flags or a config changed fields."""
    values = recipe.to_dict()
    if recipe.overridden:
        values[OVERRIDDEN_KEY] = list(recipe.overridden)
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def recipe_differences(recipe: Recipe, path: str | Path) -> dict[str, tuple[Any, Any]]:
    """Fields whose value in the saved recipe file differ from ``recipe``: name -> (saved, now).

    A field the file lacks (added to ``Recipe`` after the file was written) counts as its default.
    """
    saved = {**recipe_defaults(), **read_recipe_file(Path(path))}
    now = recipe.to_dict()
    return {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
