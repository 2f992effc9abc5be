"""The errors that explain a problem to the user: what is wrong and how to fix it.

Most are bad input (settings, data, folders): fix it and run again. Those that are also a ``RunFailure``
stopped the work part-way for another reason (a write the disk refused, a run that diverged, the Hub out of
reach). The command lines (``balpoe_hf.cli``) print the message and exit with status 2 for bad input, 1 for
a ``RunFailure`` (``cli.parsing``; docs/errors.md lists the statuses). Every other exception is a bug, and
keeps its traceback. ``short_list`` keeps the lists in their messages to one line.
"""

from __future__ import annotations

from collections.abc import Sequence


class RunFailure(Exception):
    """Mixed into an error that stopped a command part-way through its work for a reason other than its
    input (a write the disk refused, a run that diverged, the Hub out of reach): exit status 1, not 2."""


class TrainingError(ValueError):
    """A problem with the recipe, the flags or the output directory, explained for the user."""


class DataError(TrainingError):
    """The data cannot be loaded or does not fit the model, with what to do about it."""


class BadImageError(DataError):
    """An image that cannot be decoded, named by its split, row and file.

    An error raised in a ``DataLoader`` worker reaches the training process re-created from the worker's
    whole traceback text (torch's ``ExceptionWrapper``); the constructor keeps only this error's message.
    """

    def __init__(self, message: str):
        super().__init__(message.rsplit(f"{__name__}.{type(self).__qualname__}: ", 1)[-1].strip())


class TrainingFailure(TrainingError, RunFailure):
    """Training stopped part-way: the loss diverged, a checkpoint or the model could not be written, or the
    upload after it failed."""


class EvaluationError(ValueError):
    """A problem with the evaluation's settings, the model or the test data, with what to do about it."""


class EvaluationFailure(EvaluationError, RunFailure):
    """A report or an upgraded model could not be written; nothing was replaced."""


class HubFolderError(ValueError):
    """The model directory cannot be published as it is; the message lists every problem and its fix."""


class HubFolderWriteError(HubFolderError, RunFailure):
    """The model card could not be written into the folder; nothing there was replaced."""


class HubPublishError(RuntimeError, RunFailure):
    """Publishing cannot start (offline mode or no token); nothing was uploaded, the folder is unchanged."""


def short_list(items: Sequence, noun: str = "classes", head: int = 5) -> str:
    """A list for a message: all of it when short, else the first ``head`` items, the last one and how many,
    e.g. ``[10, 11, 12, 13, 14, ..., 999] (990 classes)``. Every message that lists classes (or files) goes
    through it, so that a 1,000-class mismatch stays one line."""
    items = [item.item() if hasattr(item, "item") else item for item in items]
    if len(items) <= head + 2:
        return f"[{', '.join(map(repr, items))}]"
    shown = ", ".join(map(repr, items[:head]))
    return f"[{shown}, ..., {items[-1]!r}] ({len(items)} {noun})"
