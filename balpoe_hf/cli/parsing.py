"""How every console script reads its command line and how it ends.

**Options.** A command's options are dataclasses, a field per option with its ``--help`` text in the field's
metadata (``option``). ``ArgumentParser``, transformers' ``HfArgumentParser``, makes a flag of each field
(``--name`` and ``--name-with-dashes``, ``Literal`` choices, ``--flag`` / ``--no-flag`` booleans, lists with
``nargs="+"``) and, what it lacks, a positional argument of a field declared with ``positional=True``;
abbreviated flags are refused (``--epoch`` must not silently mean ``--epochs``) and the description is
printed as written. ``balpoe-train`` and ``balpoe-compare`` add a flag per recipe field (``arguments``).

**Exit statuses** (``run_command``): 0 when the command did its work (a run stopped by ``--time-limit``
too); 2 when it refused its input: a usage error (argparse's, before anything runs) or an error of
``balpoe_hf.errors`` naming what to fix in the settings, the data or the folders; 1 when its work failed
part-way for another reason (``errors.RunFailure``: a write the disk refused, a run that diverged, the Hub
out of reach); 130 on Ctrl-C, after one line saying what was kept. Each error is one line on stderr
(``error: ...``); any other exception is a bug and keeps its traceback (status 1, Python's).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from transformers import HfArgumentParser

from ..errors import EvaluationError, HubFolderError, HubPublishError, RunFailure, TrainingError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT
# The errors every command reports in one line: its input refused, or a RunFailure.
USER_ERRORS = (TrainingError, EvaluationError, HubFolderError, HubPublishError)


def option(help: str, *, positional: bool = False, **argparse_options: Any) -> dict[str, Any]:
    """A field's metadata: its ``--help`` text, ``positional=True`` for an argument without a flag, and
    other ``add_argument`` options (``metavar``)."""
    return {"help": help, **({"positional": True} if positional else {}), **argparse_options}


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` over a command's option dataclasses, as every console script builds its own."""

    def __init__(self, dataclass_types: Iterable[type], description: str | None = None,
                 usage: str | None = None):
        super().__init__(list(dataclass_types), description=description, usage=usage, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # HfArgumentParser makes every field a flag; a positional one is added here with the same metadata.
        if not field.metadata.get("positional"):
            HfArgumentParser._parse_dataclass_field(parser, field)
            return
        options = {key: value for key, value in field.metadata.items() if key != "positional"}
        if typing.get_origin(field.type) is Literal:
            options["choices"] = typing.get_args(field.type)
        parser.add_argument(field.name, **options)

    def parse(self, argv: typing.Sequence[str] | None = None) -> tuple[Any, ...]:
        """One instance of each dataclass from ``argv`` (default: ``sys.argv[1:]``); an unknown or abbreviated
        flag is argparse's usage error (status 2), not an exception."""
        namespace = self.parse_args(argv)
        return tuple(dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype)
                              if f.init}) for dtype in self.dataclass_types)


def exit_status(error: BaseException) -> int:
    """1 for a ``RunFailure``, 2 for any other error that explains bad input."""
    return EXIT_FAILURE if isinstance(error, RunFailure) else EXIT_USAGE


def run_command(body: Callable[[], int | None], interrupted: str | Callable[[], str],
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body`` and return its exit status: ``body``'s own (``None``: 0); for an error of
    ``USER_ERRORS`` or ``errors`` its message and ``exit_status``; for Ctrl-C the line ``interrupted;
    WHAT`` (``interrupted`` or what it returns then: what was kept, how to go on) and 130."""
    try:
        status = body()
    except (*USER_ERRORS, *errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_status(error)
    except KeyboardInterrupt:
        what = interrupted() if callable(interrupted) else interrupted
        print(f"\ninterrupted; {what}".rstrip("; "), file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status
