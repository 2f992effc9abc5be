"""The command-line layer over recipes: ``--recipe`` / ``--config`` and a flag per recipe field.

``parsing.ArgumentParser`` (transformers' ``HfArgumentParser``) over ``RunArguments`` (or another dataclass
of options, like ``balpoe-compare``'s) and ``Recipe`` makes a flag per field with its help, ``Literal``
choices, ``--flag/--no-flag`` booleans and ``nargs="+"`` lists, and no abbreviated flags (``--epoch`` must
not silently mean ``--epochs``). What recipes need beyond that is added here, on the parser it builds: the
recipe layer (its values become the parser's defaults, so a flag given on the command line wins and
``--help`` shows the resolved values), ``none`` for optional fields (``--num-classes none``) and JSON for
the one ``dict`` field (``--backbone-kwargs '{"drop_rate": 0.1}'``). The resolution itself (layers,
backbone resets, checks) is ``balpoe_hf.recipes``'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import TrainingError
from ..recipes import (
    RECIPE_FIELDS,
    Recipe,
    available_recipes,
    coerce_field,
    make_recipe,
    resolve_layers,
    resolved_recipe,
    unwrap_optional,
)
from .parsing import ArgumentParser, option


@dataclass
class RunArguments:
    """The options of a run that are not training settings (``balpoe-train`` / ``scripts/train.py``)."""

    _argument_group_name = "run"

    recipe: str | None = field(default=None, metadata=option(
        "Shipped recipe (balpoe-train --list-recipes lists them)."))
    config: str | None = field(default=None, metadata=option(
        "Your own recipe file (YAML mapping of recipe fields; `base: NAME` starts from a shipped recipe)."))
    output_dir: str | None = field(default=None, metadata=option(
        "Where the model, results and checkpoints go (default: runs/NAME)."))
    resume: bool = field(default=False, metadata=option(
        "Continue from the latest loadable checkpoint in --output-dir (start afresh if there is none); the "
        "settings that define the model must be those of the run."))
    overwrite: bool = field(default=False, metadata=option(
        "Start over in the --output-dir of an earlier run: the files that run wrote (listed in its "
        "balpoe_outputs.json) are deleted first, nothing else."))
    report_to: Literal["none", "tensorboard"] = field(default="none", metadata=option(
        "Experiment tracker (TensorBoard logs go to OUTPUT_DIR/logs)."))
    push_to_hub: bool = field(default=False, metadata=option(
        "Upload the trained model to the Hub (balpoe_hf.hub.push_to_hub) at the end."))
    hub_model_id: str | None = field(default=None, metadata=option(
        "Hub repository for --push-to-hub (user/name)."))
    time_limit: float | None = field(default=None, metadata=option(
        "Wall-clock limit in seconds: after an epoch's checkpoint, stop if the next epoch would end past it "
        "(rerun with --resume to continue). 'none': no limit."))


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"in_chans\": 3}}', got {text!r}")
    return value


def build_parser(description: str | None = None, run_arguments: type = RunArguments,
                 usage: str = "%(prog)s [--recipe NAME | --config FILE.yaml] [--FIELD VALUE ...]"
                 ) -> ArgumentParser:
    """``ArgumentParser`` over ``run_arguments`` and ``Recipe``, plus what it lacks (see the module doc)."""
    # A short usage line: argparse's own lists every flag (70 lines) above each usage error.
    parser = ArgumentParser((run_arguments, Recipe), description, usage=usage + " (every flag: --help)")
    hints = typing.get_type_hints(Recipe)
    actions = {action.dest: action for action in parser._actions}
    for name in RECIPE_FIELDS:
        base, optional = unwrap_optional(hints[name])
        action = actions[name]
        if base is dict:
            action.type, action.metavar = _json_object, "JSON"
        elif optional and base is not bool:
            action.type = _none_or(action.type)
            if action.choices is not None:
                action.choices = (*action.choices, None)
        action.help = action.help.replace("%", "%%") + " (default: %(default)s)"
    return parser


def parse_recipe_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None, values: dict[str, Any]
                       ) -> tuple[argparse.Namespace, dict[str, Any], dict[str, Any]]:
    """Parse ``argv`` with the recipe layer ``values`` as the defaults of the recipe flags.

    Returns the namespace, every recipe field's value, and the fields the command line changed.
    """
    values = dict(values)
    for name, value in values.items():
        if name not in RECIPE_FIELDS:
            make_recipe(values)  # raises the "unknown recipe fields" error
        values[name] = coerce_field(name, typing.get_type_hints(Recipe)[name], value)
    parser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    settings = {}
    for name in RECIPE_FIELDS:
        value = getattr(namespace, name)
        # `--lambdas none` parses as [None]: the list field itself is unset.
        settings[name] = None if isinstance(value, list) and None in value else value
    # Which recipe flags the command line holds: parse again with a marker as every recipe default (after
    # the real parse, which answers --help with the resolved defaults).
    unset = object()
    parser.set_defaults(**dict.fromkeys(RECIPE_FIELDS, unset))
    flagged = vars(parser.parse_args(argv))
    given = {name: settings[name] for name in RECIPE_FIELDS if flagged[name] is not unset}
    return namespace, settings, given


def parse_args(argv: Sequence[str] | None = None, description: str | None = None
               ) -> tuple[RunArguments, Recipe]:
    """The run options and the resolved recipe (defaults < recipe or config file < command line)."""
    parser = build_parser(description)
    # First pass: only which recipe or config file, whose values then become the parser's defaults (so that
    # --help, answered by the second pass, shows them).
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--recipe")
    first.add_argument("--config")
    known, _ = first.parse_known_args(argv)
    lower = resolve_layers(known.recipe, known.config)
    namespace, settings, given = parse_recipe_flags(parser, argv, lower.values)
    run = RunArguments(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(RunArguments)})
    if run.recipe is None and run.config is None and settings["dataset"] is None \
            and settings["train_file"] is None and settings["train_list"] is None:
        parser.error(f"pass --recipe NAME (one of: {', '.join(available_recipes())}), --config FILE.yaml, "
                     "or the data flags (--dataset / --train-file and --test-file / --train-list, "
                     "--test-list and --data-root).")
    recipe = resolved_recipe(lower, given)
    if run.push_to_hub and not run.hub_model_id:
        raise TrainingError("--push-to-hub needs --hub-model-id USER/NAME.")
    if run.time_limit is not None and run.time_limit <= 0:
        raise TrainingError(f"--time-limit must be a positive number of seconds, got {run.time_limit}.")
    if run.output_dir is None:
        run.output_dir = str(Path("runs") / recipe.name)
    return run, recipe
