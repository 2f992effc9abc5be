"""The errors that explain bad input to the user: what is wrong and how to fix it.

The command lines (``balpoe_hf.cli``) print their message and exit with a non-zero status instead of a
traceback (docs/errors.md lists the statuses). Every other exception is a bug, and keeps its traceback.
"""

from __future__ import annotations


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


class EvaluationError(ValueError):
    """A problem with the evaluation's settings, the model or the test data, with what to do about it."""


class HubFolderError(ValueError):
    """The model directory cannot be published as it is; the message lists every problem and its fix."""


class HubPublishError(RuntimeError):
    """Publishing cannot start (offline mode or no token); nothing was uploaded, the folder is unchanged."""
