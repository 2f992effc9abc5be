"""One parser style and one exit-status convention for every console script (docs/errors.md).

0: done; 2: the input refused (a usage error, or an error of ``balpoe_hf.errors`` that names bad input);
1: the work failed part-way for another reason (``errors.RunFailure``); 130: Ctrl-C, with one line. The
expectations are that table, written out here, and argparse's own status for usage errors (2).
"""

from __future__ import annotations

import inspect

import pytest

from balpoe_hf import cli, errors
from balpoe_hf.cli.parsing import ArgumentParser, run_command
from balpoe_hf.cli.push import PushArguments

MAINS = {"balpoe-train": cli.train_main, "balpoe-evaluate": cli.evaluate_main, "balpoe-push": cli.push_main,
         "balpoe-demo": cli.demo_main, "balpoe-describe-split": cli.describe_split_main,
         "balpoe-compare": cli.compare_main, "balpoe-prepare-data": cli.prepare_data_main}
# The documented status of each error of balpoe_hf.errors (docs/errors.md).
STATUS = {"TrainingError": 2, "DataError": 2, "BadImageError": 2, "EvaluationError": 2, "HubFolderError": 2,
          "TrainingFailure": 1, "EvaluationFailure": 1, "HubFolderWriteError": 1, "HubPublishError": 1}


def _status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's usage errors end the parse itself
        return exit_.code


# Each script's positional arguments, and a prefix of one of its flags (argparse would take it for the flag).
ABBREVIATED = {"balpoe-train": ([], "--epoch"), "balpoe-evaluate": (["--model", "m"], "--shift"),
               "balpoe-push": (["runs/a", "me/a"], "--dry"), "balpoe-demo": (["runs/a"], "--server-p"),
               "balpoe-describe-split": ([], "--imbalance"), "balpoe-compare": ([], "--budg"),
               "balpoe-prepare-data": (["cifar10", "--output-dir", "d"], "--sour")}


@pytest.mark.parametrize("script", list(MAINS))
def test_every_script_refuses_an_unknown_or_abbreviated_flag_with_status_2(script, capsys):
    positional, abbreviated = ABBREVIATED[script]
    for flag in ("--no-such-flag", abbreviated):
        assert _status(MAINS[script], [*positional, flag, "1"]) == 2, (script, flag)
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {flag} 1" in err and "Traceback" not in err, err


@pytest.mark.parametrize("script", list(MAINS))
def test_every_script_has_the_one_parser_style(script, capsys):
    """--help is argparse's, from the dataclass fields' help texts, with the description as written."""
    assert _status(MAINS[script], ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "\n    balpoe-" in out  # the examples keep their indentation


def test_every_error_of_the_module_has_its_documented_status():
    classes = {name for name, value in vars(errors).items() if inspect.isclass(value)
               and issubclass(value, Exception) and value.__module__ == errors.__name__}
    assert classes - {"RunFailure"} == set(STATUS)
    for name, status in STATUS.items():
        error = getattr(errors, name)("what is wrong and how to fix it")

        def fail(error=error):
            raise error

        assert run_command(fail, "kept") == status, name


def test_a_command_that_ends_well_exits_0_and_ctrl_c_130_with_one_line(capsys):
    assert run_command(lambda: None, "kept") == 0
    assert run_command(lambda: 0, "kept") == 0

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted, lambda: "the checkpoint is kept: rerun with --resume.") == 130
    assert capsys.readouterr().err == "\ninterrupted; the checkpoint is kept: rerun with --resume.\n"


def test_a_bug_keeps_its_traceback():
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(bug, "kept")


def test_positional_fields_are_positional_arguments(capsys):
    parser = ArgumentParser([PushArguments], "push")
    (args,) = parser.parse(["runs/a", "me/a", "--dry-run"])
    assert (args.model_dir, args.repo_id, args.dry_run, args.private) == ("runs/a", "me/a", True, False)
    with pytest.raises(SystemExit) as exit_:
        parser.parse(["runs/a"])  # REPO_ID missing
    assert exit_.value.code == 2 and "REPO_ID" in capsys.readouterr().err


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
