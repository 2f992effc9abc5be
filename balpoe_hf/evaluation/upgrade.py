"""Give a model folder of an earlier release today's estimator settings (``balpoe-evaluate --upgrade``): a
fresh held-out calibration on its run's rebuilt held-out split, no estimator choice of an earlier release,
today's code files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EvaluationError, EvaluationFailure, short_list
from ..models.balpoe.label_shift import is_legacy_choice
from ..run_folder import (
    output_lock,
    read_manifest,
    run_output_files,
    written_by_package,
)
from .calibrate import calibrate_and_save, holdout_logits
from .model_loading import load_model, resolve_device
from .shifts import describe_estimator

# Code files that releases of balpoe-hf shipped with a model (the remote code), today's and earlier ones': an
# upgraded folder gets today's set, and the ones no longer shipped are removed with it.
SHIPPED_CODE_FILES = ("backbones.py", "calibration.py", "cifar_resnet.py", "configuration_balpoe.py",
                      "holdout_statistics.py", "label_shift.py", "losses.py", "modeling_balpoe.py",
                      "pipeline_balpoe.py", "prior_estimators.py", "priors.py", "processing.py",
                      "shrinkage.py")
# What else a balpoe-hf run folder of any release holds: result files and its working folders.
RUN_EXTRAS = ("README.md", "balpoe_outputs.json", "checkpoints", "eval", "logs", "images")
# The run's files an upgrade keeps as they are (into a new folder: copies), listed in the manifest with it.
KEPT_RUN_FILES = ("recipe.yaml", "train_results.json", "eval_results.json", "holdout_results.json")


def _foreign_entries(model_dir: Path) -> list[str]:
    """The entries of a model folder that a balpoe-hf release did not write there (or changed since)."""
    from ..run_folder import MANIFEST, is_control_file

    known = {*run_output_files(), *SHIPPED_CODE_FILES, *RUN_EXTRAS}
    manifest = read_manifest(model_dir)
    foreign = []
    for entry in sorted(model_dir.iterdir()):
        changed = (manifest is not None and entry.is_file() and entry.name != MANIFEST
                   and entry.name in manifest["files"] and not written_by_package(model_dir, entry.name))
        if (entry.name not in known and not is_control_file(entry.name)) or changed:
            foreign.append(entry.name)
    return foreign


def upgrade_model(model_dir: str | Path, output_dir: str | Path | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """Give a model folder written by an earlier release (or any balpoe-hf model folder) today's estimator
    settings: a fresh held-out calibration, no estimator choice of an earlier release, today's code files.

    When the folder holds the ``recipe.yaml`` of a run with a held-out split, the split is rebuilt (the same
    data, seed and ``holdout_fraction``) and ``config.calibration`` fitted again, so that it records what
    today's ``auto`` reads (the covariance of its biases); otherwise the calibration stays as it is. A
    ``config.shift_estimator`` written by an earlier release's per-model choice is dropped (``auto`` runs
    today's default on every model either way; the folder's own code files would not). The model is saved
    with ``save_pretrained``: config, code files and the unchanged weights, beside its image processor and
    the run's recipe and result files as they are.

    In place (``output_dir=None``) only when every file of the folder is one a balpoe-hf release writes
    (unchanged since, where its manifest lists it); else into ``output_dir``, a new or empty folder. The
    folder written into is held under its lock (``run_folder.output_lock``), a save a kill interrupted there
    is finished or discarded first, and the files go in in one staged save (``calibrate.calibrate_and_save``)
    with the manifest that lists them: a kill or a full disk leaves the folder as it was or upgraded, never
    half of each.
    Returns what was done: ``{"folder", "recalibrated", "dropped_choice", "auto"}``.
    """
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

    from ..data.loading import load_training_data
    from ..recipes import load_recipe
    from ..run_folder import finish_interrupted_save, is_control_file

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_NAME).is_file():  # a save replaces it at once: never missing half-way
        raise EvaluationError(f"{model_dir} is not a model folder (no {CONFIG_NAME}): give the folder of a "
                              "balpoe-train run or of save_pretrained.")
    target = model_dir if output_dir is None else Path(output_dir)
    if output_dir is not None and target.resolve() == model_dir.resolve():
        raise EvaluationError("the upgraded copy needs a folder other than the model's own; leave out the "
                              "new folder to upgrade in place.")
    if target.exists() and not target.is_dir():
        raise EvaluationError(f"{target} exists and is not a folder: give a new folder to upgrade into.")
    with output_lock(target, "balpoe-evaluate --upgrade"):
        finished = finish_interrupted_save(target) == "finished"
        if output_dir is None:
            foreign = _foreign_entries(model_dir)
            if foreign:
                raise EvaluationError(f"{model_dir} holds {short_list(foreign, 'entries')}, which balpoe-hf "
                                      "did not write there (or which were changed since): upgrading it in "
                                      "place would mix them with today's files. Upgrade into a new folder "
                                      "instead (balpoe-evaluate --upgrade-into NEW_DIR), or move them away.")
        elif any(not is_control_file(entry.name) for entry in target.iterdir()):
            raise EvaluationError(f"{target} exists and is not an empty folder: give a new folder to upgrade "
                                  "into." + (" (An upgrade into it that was interrupted has just been "
                                             "finished: evaluate it with --model.)" if finished else ""))
        model, processor = load_model(model_dir, resolve_device(device))  # settles an interrupted save too
        holdout = None
        recipe_path = model_dir / "recipe.yaml"
        if recipe_path.is_file():
            recipe = load_recipe(config=recipe_path)
            if recipe.holdout_fraction > 0:
                holdout = holdout_logits(model, processor, load_training_data(recipe).holdout,
                                         recipe.image_column, recipe.label_column, recipe.eval_batch_size)
        dropped = None
        if is_legacy_choice(model.config.shift_estimator):
            dropped, model.config.shift_estimator = model.config.shift_estimator["name"], None
        current = set(run_output_files())
        retired = [name for name in SHIPPED_CODE_FILES if name not in current]
        # Config, code files, the unchanged weights, the processor and the run's files (as they are, not
        # rebuilt) in one staged save: a kill leaves the old folder or the upgraded one.
        kept = {name: model_dir / name for name in (IMAGE_PROCESSOR_NAME, *KEPT_RUN_FILES)
                if (model_dir / name).is_file()}
        calibrate_and_save(model, target, holdout=holdout, files=kept, obsolete=retired,
                           what="the upgraded model", error=EvaluationError, failure=EvaluationFailure)
        for name in retired:  # one that a folder without a manifest holds (staged_save removes listed ones)
            (target / name).unlink(missing_ok=True)
    return {"folder": str(target), "recalibrated": holdout is not None, "dropped_choice": dropped,
            "auto": describe_estimator(model.config)}
