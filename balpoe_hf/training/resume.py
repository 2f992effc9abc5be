"""Starting, overwriting and resuming a run's output directory.

A directory is a run when its manifest (``balpoe_hf.run_folder``) lists the ``checkpoints/`` folder, or (a run
from before manifests) when it holds a checkpoint; ``--resume`` and ``--overwrite`` refuse any other, and
``--overwrite`` deletes only what the manifest lists. Resuming loads the latest checkpoint that can be
loaded, says which ones it skipped and why, and refuses a recipe that changes the model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TrainingError, short_list
from ..models.balpoe.configuration_balpoe import POST_TRAINING_SETTINGS, SETTINGS
from ..recipes import CONFIG_FIELDS, Recipe, recipe_differences, save_recipe
from ..run_folder import (
    MANIFEST,
    check_writable,
    is_control_file,
    read_manifest,
    run_output_files,
    staged_save,
    written_by_package,
)
from .checkpoints import (
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    RefusedPickleError,
    TrainingObjects,
    checkpoint_progress,
    completed_checkpoints,
    load_training_state,
)

if TYPE_CHECKING:
    from accelerate import Accelerator


RUN_FOLDERS = (CHECKPOINTS_DIR, "logs")  # folders a run owns whole (TensorBoard writes under logs/)
# Recipe fields a resumed run keeps: those of the model's config (recipes.CONFIG_FIELDS), and those that
# define the training data its prior comes from, the evaluation transform saved with it (crop_pct) and the
# optimizer's parameter groups (scale_expert_lr).
RESUME_FIELDS = (*CONFIG_FIELDS, "crop_pct", "dataset", "dataset_config", "train_split", "label_column",
                 "num_classes", "imbalance_ratio", "imbalance_profile", "split_seed", "selection",
                 "holdout_fraction", "scale_expert_lr")
# Config settings of the built model compared on resume (they catch changed data behind unchanged paths): all
# that it is built with, and the class names.
SIGNATURE_KEYS = (*(name for name in SETTINGS if name not in POST_TRAINING_SETTINGS), "id2label")


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a balpoe-hf run: its manifest lists the run's folders, or (a run from before
    manifests) it holds a complete checkpoint."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        return CHECKPOINTS_DIR in manifest["folders"]
    return bool(completed_checkpoints(run_dir))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_flags(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """The checks of ``check_output_dir`` that read nothing inside ``output_dir``: it is a folder (or can be
    made), it takes new files, and ``resume`` and ``overwrite`` are not both given."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path} exists and is not a directory.")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one.")
    check_writable(path, "--output-dir")


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool,
                     inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an output directory the run must not write to; reads only.

    A non-empty directory needs ``resume`` or ``overwrite``, and must be a run's directory (a manifest, or
    the checkpoints of a run from before manifests). ``overwrite`` needs the manifest, refuses when a file
    it lists was changed since the package wrote it, and refuses when an ``inputs`` path (the run's data)
    lies in what it would delete.
    """
    path = Path(output_dir)
    check_output_flags(path, resume, overwrite)
    if not path.is_dir() or not any(not is_control_file(entry.name) for entry in path.iterdir()):
        return
    if not (resume or overwrite):
        raise TrainingError(f"the output directory {path} is not empty. Pass --resume to continue its run "
                            "from the latest checkpoint, --overwrite to start over (the files the run wrote "
                            "are deleted), or another --output-dir.")
    flag = "--resume" if resume else "--overwrite"
    manifest = read_manifest(path)
    if not is_run_dir(path) or (manifest is None and overwrite):
        raise TrainingError(
            f"{path} is not the directory of a balpoe-hf run (it has no {MANIFEST} listing what a run wrote, "
            f"nor a checkpoint of one in {CHECKPOINTS_DIR}/), so {flag} will not touch it: choose an empty "
            "or new --output-dir, or empty this one yourself.")
    if manifest is None:  # a run from before manifests: what it wrote is not known
        return
    changed = [name for name in manifest["files"]
               if (path / name).is_file() and not written_by_package(path, name)]
    if changed and overwrite:
        raise TrainingError(f"--overwrite would delete {short_list(changed, 'files')} in {path}, changed "
                            "since balpoe-hf wrote them: move them out of the directory first (nothing was "
                            "deleted).")
    foreign = [name for name in run_output_files()
               if (path / name).exists() and not written_by_package(path, name)]
    if foreign:
        raise TrainingError(f"{flag} would write over {short_list(foreign, 'files')} in {path}, which "
                            "balpoe-hf did not write there (or which were changed since): move them out of "
                            "the directory first (nothing was written).")
    if not overwrite:
        return
    doomed = [(path / name).resolve() for name in [*manifest["files"], *manifest["folders"]]]
    for item in inputs:
        source = Path(item).resolve()
        hit = next((d for d in doomed if _inside(source, d)), None)
        if hit is not None:
            raise TrainingError(f"--overwrite would delete {hit}, which holds the input {item}: move the "
                                "data out of the output directory or choose another --output-dir (nothing "
                                "was deleted).")


def clear_run_outputs(output_dir: str | Path) -> None:
    """Delete what the manifest of ``output_dir`` lists (checked by ``check_output_dir`` first) and itself.

    Files the run did not write stay; folders emptied by the deletion are removed.
    """
    path = Path(output_dir)
    manifest = read_manifest(path) or {"files": {}, "folders": []}
    for name in manifest["folders"]:
        shutil.rmtree(path / name, ignore_errors=True)
    for name in manifest["files"]:
        (path / name).unlink(missing_ok=True)
        for parent in (path / name).parents:
            if parent == path or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
    (path / MANIFEST).unlink(missing_ok=True)


def start_run(output_dir: str | Path, recipe: Recipe) -> None:
    """Create the run directory, write the resolved ``recipe.yaml`` and list both in the manifest (in one
    ``staged_save``)."""
    with staged_save(output_dir, folders=RUN_FOLDERS) as stage:
        save_recipe(recipe, stage / "recipe.yaml")


def model_signature(config: Any) -> dict[str, Any]:
    """The settings that define a built model (``SIGNATURE_KEYS`` of its config), as JSON values."""
    values = {key: getattr(config, key, None) for key in SIGNATURE_KEYS}
    return json.loads(json.dumps(values))  # id2label keys become strings, tuples lists: as read back


def check_resume(output_dir: str | Path, recipe: Recipe, state: dict[str, Any], signature: dict[str, Any],
                 batches_per_epoch: int, num_processes: int = 1) -> list[str]:
    """Refuse to resume ``state`` with a recipe that changes the model; return the other changed fields.

    Compared: the model-defining fields of the run's ``recipe.yaml`` (``RESUME_FIELDS``), the built model's
    ``signature`` with the one saved in the checkpoint (which catches changed data, e.g. other class
    counts), and for a checkpoint inside an epoch the number of batches per epoch (the batches to skip), of
    gradient accumulation steps and of processes. Also refused: a checkpoint past the recipe's last epoch.
    """
    recipe_file = Path(output_dir) / "recipe.yaml"
    changed = recipe_differences(recipe, recipe_file) if recipe_file.is_file() else {}
    conflicts = [f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}"
                 for key in RESUME_FIELDS if key in changed]
    # Checkpoints from before signatures have none (the recipe check only), older ones fewer keys.
    saved_model = state.get("model", signature)
    conflicts += [f"{key}: {saved_model[key]!r} -> {signature.get(key)!r}" for key in SIGNATURE_KEYS
                  if key in saved_model and saved_model[key] != signature.get(key) and key not in changed]
    if state.get("step") and state.get("batches_per_epoch") != batches_per_epoch:
        conflicts.append(f"batches per epoch: {state.get('batches_per_epoch')} -> {batches_per_epoch} (the "
                         "batch size or the number of processes; a step checkpoint needs the same batches)")
    accumulation = state.get("gradient_accumulation_steps")
    if state.get("step") and accumulation not in (None, recipe.gradient_accumulation_steps):
        conflicts.append(f"gradient_accumulation_steps: {accumulation} -> "
                         f"{recipe.gradient_accumulation_steps} (a step checkpoint is inside an "
                         "accumulation of the saved count)")
    saved_processes = state.get("num_processes")
    if state.get("step") and saved_processes not in (None, num_processes):
        conflicts.append(f"processes: {saved_processes} -> {num_processes} (a step checkpoint resumes with "
                         "the processes that saved it; one at the end of an epoch with any number)")
    done, batches = state.get("epoch", 0), state.get("step", 0)
    if done > recipe.epochs or (done == recipe.epochs and batches):
        # The loop would have nothing to train and save the checkpoint's model as the shorter run's.
        position = f"{done} epoch{'s' * (done != 1)}" + (f" and {batches} batches" if batches else "")
        raise TrainingError(f"cannot resume {output_dir} with epochs {recipe.epochs}: the checkpoint to "
                            f"resume from has trained {position}. Resume with --epochs "
                            f"{done + bool(batches)} or more, or start a new run (another --output-dir, or "
                            "--overwrite).")
    if conflicts:
        raise TrainingError(
            f"cannot resume {output_dir}: its model was built with other settings (saved -> now):\n  "
            + "\n  ".join(conflicts) + "\nA resumed run keeps its model and data: change them back, or start "
            "a new run (another --output-dir, or --overwrite).")
    return [f"{key}: {saved!r} -> {now!r}"
            for key, (saved, now) in changed.items() if key not in RESUME_FIELDS]


def continue_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                      built_groups: Sequence[dict[str, Any]], step: int) -> None:
    """After loading a checkpoint: the recipe's optimizer settings and schedule at optimizer step ``step``.

    ``Optimizer.load_state_dict`` takes every setting of a parameter group (lr, momentum, weight decay,
    nesterov) from the checkpoint, and ``LambdaLR.load_state_dict`` its base lrs and its count of steps, so a
    resumed run silently kept the saved learning rate that the warning said had changed, and with another
    batch size or number of processes it stepped a schedule counted in the saved run's steps (milestones at
    other epochs). ``built_groups`` (the groups as built from the recipe, before loading; their ``params``
    are left alone) and ``step`` (the resumed position in optimizer steps of this run's epochs) take their
    place; with nothing changed they equal the saved ones, bit for bit.
    """
    for group, built in zip(optimizer.param_groups, built_groups, strict=True):
        group.update({key: value for key, value in built.items() if key != "params"})
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    rules = zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    for group, base, rule in rules:
        group["lr"] = base * rule(step)  # LambdaLR's own expression
    # What get_last_lr() returns; LRScheduler.step sets it the same way.
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _try_load(accelerator: Accelerator, path: Path, output_dir: str | Path, recipe: Recipe,
              signature: dict[str, Any], batches_per_epoch: int, objects: TrainingObjects
              ) -> tuple[dict[str, Any], list[str], str | None]:
    """``(trainer state, other recipe changes, None)`` once loaded, or ``({}, [], why not)``."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return {}, [], f"{TRAINER_STATE}: {error}"
    changes = check_resume(output_dir, recipe, state, signature, batches_per_epoch, accelerator.num_processes)
    try:
        load_training_state(accelerator, path, objects)
    except RefusedPickleError as error:
        return {}, [], str(error)
    except Exception as error:  # safetensors, JSON, torch and OS errors alike: some file is unusable
        first_line = str(error).splitlines()[0] if str(error) else ""
        return {}, [], f"{type(error).__name__}: {first_line}"
    return state, changes, None


def load_checkpoint(accelerator: Accelerator, output_dir: str | Path, recipe: Recipe,
                    signature: dict[str, Any], batches_per_epoch: int, objects: TrainingObjects
                    ) -> dict[str, Any] | None:
    """Load the latest loadable checkpoint into ``objects`` and return its trainer state.

    Checkpoints that cannot be read (a truncated or damaged file, a pickle holding more than tensors and
    numbers) are skipped, newest first, with a warning naming each and the reason; all processes agree on
    the one they load. ``None`` when there is none. Raises ``TrainingError`` when every checkpoint is
    unusable, or when the recipe changes the model (``check_resume``).
    """
    skipped = []
    for path in reversed(completed_checkpoints(output_dir)):
        state, changes, reason = _try_load(accelerator, path, output_dir, recipe, signature,
                                           batches_per_epoch, objects)
        loaded = torch.tensor([int(reason is None)], device=accelerator.device)
        if bool(accelerator.gather(loaded).min() == 1):
            for note in skipped:
                accelerator.print(f"warning: skipped the checkpoint {note}")
            if changes:
                accelerator.print("warning: resuming with recipe changes (saved -> now): "
                                  + "; ".join(changes))
            accelerator.print(f"resumed from {path} (epoch {state['epoch']} of {recipe.epochs}"
                              + (f", {state['step']} batches into the next)" if state.get("step") else ")"))
            return state
        skipped.append(f"{path}, which cannot be loaded ({reason or 'on another process'})")
    if skipped:
        raise TrainingError("no checkpoint of the run can be loaded:\n  " + "\n  ".join(skipped)
                            + f"\nDelete them (rm -r {Path(output_dir) / CHECKPOINTS_DIR}) and --resume "
                              "starts afresh, or start over with --overwrite.")
    return None


def resume_hint(output_dir: str | Path) -> str:
    """What ``--resume`` would continue ``output_dir``'s run from, in a sentence (after an interruption)."""
    saved = completed_checkpoints(output_dir)
    if not saved:
        return f"no checkpoint was saved in {output_dir} yet: rerun to start again."
    epoch, step = checkpoint_progress(saved[-1])
    where = f"epoch {epoch}" + (f", {step} batches into the next" if step else "")
    return f"rerun with --resume to continue from its checkpoint after {where} ({saved[-1]})."


def epoch_batches(loader: Any, accelerator: Accelerator, start: int) -> Iterable:
    """The current epoch's batches from batch ``start`` on (a run resumed from a step checkpoint).

    A loader with ``batches(start)`` (``balpoe_hf.data.device_data.DeviceLoader``) serves them itself; a
    prepared ``DataLoader`` goes through ``accelerator.skip_first_batches``, which skips the indices without
    loading the images.
    """
    if start == 0:
        return loader
    if hasattr(loader, "batches"):
        return loader.batches(start)
    return accelerator.skip_first_batches(loader, start)
