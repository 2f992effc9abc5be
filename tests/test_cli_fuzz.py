"""Every recipe field, given a value of the wrong type or out of range, gets a message and exit status 2.

The cases are generated from the ``Recipe`` dataclass (its fields and their type hints), so a new field is
covered as soon as it exists: on the command line (``balpoe-train --FIELD VALUE``) and in a ``--config`` file.
Nothing may start: ``training.train`` is replaced by a stub that fails the test if it is reached.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from balpoe_hf import cli
from balpoe_hf.recipes import RECIPE_FIELDS, Recipe, unwrap_optional
from balpoe_hf.training import loop as training

HINTS = typing.get_type_hints(Recipe)
DATA = ["--train-file", "train.parquet", "--test-file", "test.parquet"]
# Numeric fields where a negative number is a meaningful setting (a tail expert's bias).
NEGATIVE_ALLOWED = {"lambdas"}
# List fields whose values come as one per channel or per expert (3 of each by default).
TRIPLES = {"lambdas", "image_mean", "image_std"}


def _kind(name: str) -> tuple[type, bool]:
    """The field's type (of its items, for a list) and whether it is a Literal (choices)."""
    base, _ = unwrap_optional(HINTS[name])
    item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
    return item, typing.get_origin(item) is typing.Literal


def command_line_cases(name: str) -> list[list[str]]:
    """Flag values of the wrong type and out of range for field ``name`` (none for free text)."""
    item, is_choice = _kind(name)
    if item is str:
        return []  # any text is a string; paths and names are checked where they are read
    if item is dict:
        return [["[1]"], ["not json"]]
    if is_choice:
        return [["no-such-choice"]]
    if item is bool:
        return [["maybe"]]
    cases = [["abc"]]
    count = 3 if name in TRIPLES else 1
    out_of_range = ["nan", "inf"] if item is float else []
    if name not in NEGATIVE_ALLOWED:
        out_of_range.append("-1")
    cases += [[value] * count for value in out_of_range]
    return cases


def yaml_case(name: str) -> object:
    """A YAML value of the wrong type for field ``name``."""
    return [1] if _kind(name)[0] is dict else {"nested": 1}


@pytest.fixture
def nothing_starts(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("training started with a bad setting")

    monkeypatch.setattr(training, "train", train)


def _refused(argv: list[str], capsys) -> str:
    try:
        status = cli.train_main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    assert "error:" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err  # argparse's usage line + the message, or our line
    return err


def test_every_recipe_field_is_covered():
    assert set(RECIPE_FIELDS) == {f.name for f in dataclasses.fields(Recipe)}
    numeric = [name for name in RECIPE_FIELDS if _kind(name)[0] in (int, float)]
    assert len(numeric) > 30 and all(command_line_cases(name) for name in numeric)


@pytest.mark.parametrize("name", list(RECIPE_FIELDS))
def test_bad_values_of_every_field_get_a_message(name, tmp_path, capsys, nothing_starts):
    flag = "--" + name.replace("_", "-")
    for values in command_line_cases(name):
        err = _refused([*DATA, flag, *values], capsys)
        assert name in err or flag in err, err  # the message names the setting
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"train_file": ["train.parquet"], "test_file": ["test.parquet"],
                                      name: yaml_case(name)}))
    err = _refused(["--config", str(config)], capsys)
    assert name in err, err


def test_the_cases_reach_the_checks_a_good_value_passes(tmp_path, capsys, monkeypatch):
    """The same command line with good values gets as far as training (so the refusals above are the
    values', not the command line's)."""
    started = []
    monkeypatch.setattr(training, "train", lambda recipe, *args, **kwargs: started.append(recipe))
    assert cli.train_main([*DATA, "--epochs", "3", "--lambdas", "1", "0", "-1", "--output-dir",
                           str(Path(tmp_path) / "run")]) == 0
    assert started[0].epochs == 3 and started[0].lambdas == [1.0, 0.0, -1.0]
