"""Fit a model's held-out calibration and save the model: the one way a finished model folder is written.

Training's final save (``training.loop``), ``balpoe-evaluate --upgrade`` (``upgrade.upgrade_model``) and the
derived runs of ``balpoe-compare`` (``compare.runs.derive_run``) all end here: ``fit_holdout_calibration``
puts ``holdout_statistics.holdout_calibration`` of the model's held-out logits into ``config.calibration``
(what ``auto`` and the estimators that need a calibration read), and ``calibrate_and_save`` writes the model
(config, code files, weights), its image processor and the run's files in one ``run_folder.staged_save``,
with the same message for every failure: a kill or a full disk leaves the folder's old files or the new ones.
The caller holds the folder's ``output_lock``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ..data.loading import align_labels
from ..errors import TrainingError, TrainingFailure
from ..models.balpoe.holdout_statistics import holdout_calibration
from ..run_folder import model_weight_files, save_failure, staged_save
from .predictions import predict

# What a file of the saved folder is made from: a file copied as it is, text, or a function writing the file.
FileSource = Path | str | Callable[[Path], Any]


def holdout_logits(model: Any, processor: Any, holdout: datasets.Dataset, image_column: str = "image",
                   label_column: str = "label", batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """The model's uniform-prior logits ``(N, C)`` on a held-out split and its labels as model class indices
    (matched to the model's classes by name, as the evaluation matches a test set)."""
    logits, _ = predict(model, processor, holdout, image_column, batch_size)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return logits, align_labels(holdout, label_column, names)


def fit_holdout_calibration(model: Any, logits: torch.Tensor, labels: torch.Tensor | np.ndarray, *,
                            what: str = "the model", error: type[Exception] = TrainingError) -> None:
    """Set ``model.config.calibration`` to the ``holdout_calibration`` of its held-out ``logits`` ``(N, C)``
    (uniform target prior) and ``labels``; ``error`` names ``what`` when a class has no held-out image."""
    try:
        model.config.calibration = holdout_calibration(logits, labels)
    except ValueError as failure:
        raise error(f"cannot calibrate {what} on its held-out split: {failure}") from None


def calibrate_and_save(model: Any, folder: str | Path, *, processor: Any = None,
                       holdout: tuple[torch.Tensor, torch.Tensor | np.ndarray] | None = None,
                       files: Mapping[str, FileSource] | None = None, obsolete: Iterable[str] = (),
                       folders: Iterable[str] = (), what: str = "the model", then: str = "",
                       error: type[Exception] = TrainingError, failure: type[Exception] = TrainingFailure
                       ) -> None:
    """Fit the held-out calibration (``holdout``: the held-out logits and labels; ``None`` keeps the
    config's) and save the model into ``folder`` with its ``processor`` and ``files``, all in one staged
    save listed in the folder's manifest.

    ``files`` maps a file name to what it is made of (``FileSource``); they are written first, so that a
    copied ``preprocessor_config.json`` is the folder's processor (``save_pretrained`` writes one only where
    none is), then ``processor`` (``None``: none beyond ``files``), then the model. ``obsolete``: files of the
    folder the save makes stale (the weights of the model saved there before always are), ``folders``: the
    run's folders the manifest lists. A held-out split without some class is an ``error`` (bad input), a
    failure to write a ``failure`` (``errors.RunFailure``): ``failure("could not save WHAT into FOLDER:
    REASON Nothing there was replaced" + then + ".")``.
    """
    if holdout is not None:
        fit_holdout_calibration(model, *holdout, what=what, error=error)
    folder = Path(folder)
    try:
        with staged_save(folder, obsolete=[*model_weight_files(folder), *obsolete], folders=folders) as stage:
            for name, source in (files or {}).items():
                if isinstance(source, Path):
                    shutil.copyfile(source, stage / name)
                elif isinstance(source, str):
                    (stage / name).write_text(source, encoding="utf-8")
                else:
                    source(stage / name)
            if processor is not None:
                processor.save_pretrained(stage)
            model.save_pretrained(stage)
    except Exception as reason:  # OSError, safetensors' and torch's errors: a full disk, a read-only folder
        raise failure(f"could not save {what} into {folder}: {save_failure(reason, folder)} Nothing there "
                      f"was replaced{then}.") from None
