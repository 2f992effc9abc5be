"""A run's output directory (``balpoe_hf.run_folder`` keeps its manifest, saves and lock): its checkpoints,
and the checks on starting, overwriting and resuming it.

**Run directories.** A directory is a run when its manifest lists the ``checkpoints/`` folder, or (a run from
before manifests) when it holds a checkpoint; ``--resume`` and ``--overwrite`` refuse any other.

**Checkpoints.** Each holds the model (``model.safetensors``), the optimizer's and the learning-rate
schedule's state (JSON, with the optimizer's tensors in safetensors), each process's random-number states
(JSON) and ``trainer_state.json`` (progress, statistics and the settings that define the model): no pickle,
so that loading a checkpoint never runs code. Those of the previous release (accelerate's ``save_state``,
pickles) are read with ``torch.load(weights_only=True)``, which loads tensors and numbers only. A checkpoint
is written under a temporary name (``<name>.tmp``) and renamed once all of its files are on disk, so a folder
with a final name is complete; a crash or a full disk while saving leaves a ``.tmp`` folder that resume
ignores and the next save removes. ``epoch-0003`` is the state after three epochs, ``epoch-0003-step-000050``
the state 50 batches into the fourth (``Recipe.checkpoint_every_steps``). Resuming loads the latest checkpoint
that can be loaded, says which ones it skipped and why, and refuses a recipe that changes the model.

**Non-finite loss.** ``NonFiniteLossGuard`` stops a run at its first non-finite loss without a
host-device synchronisation per step, so that no checkpoint or evaluation ever sees diverged weights.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError, short_list
from ..models.balpoe.configuration_balpoe import POST_TRAINING_SETTINGS, SETTINGS
from ..recipes import CONFIG_FIELDS, Recipe, recipe_differences, save_recipe
from ..run_folder import (
    MANIFEST,
    PARTIAL_SUFFIX,
    check_writable,
    is_control_file,
    read_manifest,
    run_output_files,
    save_failure,
    staged_save,
    sync_files,
    written_by_package,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
RUN_FOLDERS = (CHECKPOINTS_DIR, "logs")  # folders a run owns whole (TensorBoard writes under logs/)
_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?")

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


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output_dir: str | Path, epoch: int, step: int = 0) -> Path:
    """``epoch-EEEE`` after ``epoch`` epochs, ``epoch-EEEE-step-SSSSSS`` ``step`` batches into the next."""
    name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")
    return Path(output_dir) / CHECKPOINTS_DIR / name


def _progress(path: Path) -> tuple[int, int] | None:
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (final name and trainer state), from the oldest to the latest."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.iterdir() if _progress(p) and (p / TRAINER_STATE).is_file()] \
        if root.is_dir() else []
    return sorted(found, key=_progress)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` latest complete checkpoints, and anything a crash left half-written."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    complete = completed_checkpoints(output_dir)
    leftovers = [p for p in root.iterdir() if p not in complete] if root.is_dir() else []
    for path in complete[:-keep] + leftovers:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class TrainingObjects:
    """What a checkpoint holds besides the trainer state: the prepared model, optimizer and lr schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


# Nested Python values with tensors as JSON (``_encode``) and a safetensors file of the tensors: what a
# checkpoint needs of the optimizer's and the schedule's state_dict, which torch.save would pickle.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
STATE_FORMAT = "balpoe-hf training state"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().contiguous().cpu()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not {_TENSOR, _TUPLE, _ITEMS} & set(value):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {_ITEMS: [[_encode(key, tensors), _encode(item, tensors)] for key, item in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"a checkpoint holds tensors, numbers, strings and containers of them, not "
                    f"{type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value[_ITEMS]}
    return {key: _decode(item, tensors) for key, item in value.items()}


def write_state(folder: Path, name: str, value: Any) -> None:
    """``value`` (nested containers of tensors, numbers and strings, e.g. an optimizer's ``state_dict``) as
    ``name.json`` in ``folder``, its tensors (if any) in ``name.safetensors``: no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors)
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
    document = {"format": STATE_FORMAT, "tensors": bool(tensors), "state": encoded}
    (folder / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")


def read_state(folder: Path, name: str) -> Any:
    """What ``write_state(folder, name, value)`` wrote: ``value`` (e.g. a checkpoint's ``"optimizer"``)."""
    document = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{name}.json is not a balpoe-hf training state")
    tensors = load_file(folder / f"{name}.safetensors") if document["tensors"] else {}
    return _decode(document["state"], tensors)


def _rng_state(accelerator: Accelerator) -> dict[str, Any]:
    """This process's random-number states (Python, numpy, torch, the device's) and accelerate's step
    counter, as JSON values: what accelerate's ``save_state`` pickles."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"step": accelerator.step, "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached], "torch": torch.get_rng_state().tolist()}
    device = accelerator.device.type
    if device != "cpu":
        module = torch.get_device_module(device)
        states = (module.get_rng_state_all() if hasattr(module, "get_rng_state_all")
                  else [module.get_rng_state()])
        state["device"] = {"type": device, "states": [s.tolist() for s in states]}
    return state


def _set_rng_state(accelerator: Accelerator, state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    device = state.get("device")
    if device is not None and device["type"] == accelerator.device.type:
        module = torch.get_device_module(device["type"])
        states = [torch.as_tensor(s, dtype=torch.uint8) for s in device["states"]]
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(states)
        else:
            module.set_rng_state(states[0])
    accelerator.step = state["step"]


MODEL_STATE = "model.safetensors"


def save_training_state(accelerator: Accelerator, folder: Path, objects: TrainingObjects) -> None:
    """Write the model (safetensors), the optimizer's, schedule's and gradient scaler's state (JSON and
    safetensors) and every process's random-number states (JSON) into ``folder``: no pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(objects.model).state_dict()
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()},
                  folder / MODEL_STATE, metadata={"format": "pt"})
        write_state(folder, "optimizer", objects.optimizer.state_dict())
        write_state(folder, "scheduler", objects.scheduler.state_dict())
        if accelerator.scaler is not None:
            write_state(folder, "scaler", accelerator.scaler.state_dict())
    write_state(folder, f"rng_state_{accelerator.process_index}", _rng_state(accelerator))


class RefusedPickleError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and numbers."""


def _load_pickle(path: Path) -> Any:
    """A file of a checkpoint of the previous release, read with ``torch.load(weights_only=True)`` (through
    accelerate's ``load``, which also allows numpy arrays): tensors, numbers and containers only."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")
    except pickle.UnpicklingError:
        raise RefusedPickleError(f"{path.name} holds Python objects other than tensors and numbers, which "
                                 "are never loaded (unpickling them could run code)") from None


def _read_training_state(accelerator: Accelerator, folder: Path) -> dict[str, Any]:
    """The states of a checkpoint, read without unpickling anything: this release's JSON and safetensors,
    or the previous release's pickles (accelerate's ``save_state``) through ``_load_pickle``."""
    index = accelerator.process_index
    states: dict[str, Any] = {"model": load_file(folder / MODEL_STATE)}
    if (folder / "optimizer.json").is_file():
        states["optimizer"] = read_state(folder, "optimizer")
        states["scheduler"] = read_state(folder, "scheduler")
        states["rng"] = read_state(folder, f"rng_state_{index}")
        if accelerator.scaler is not None:
            states["scaler"] = read_state(folder, "scaler")
        return states
    # The previous release: the scheduler was accelerate's custom_checkpoint_0.pkl.
    states["optimizer"] = _load_pickle(folder / "optimizer.bin")
    states["scheduler"] = _load_pickle(folder / "custom_checkpoint_0.pkl")
    legacy = _load_pickle(folder / f"random_states_{index}.pkl")
    device = accelerator.device.type
    states["rng"] = {"step": legacy.get("step", 0), "python": legacy["random_state"],
                     "numpy": legacy["numpy_random_seed"], "torch": legacy["torch_manual_seed"]}
    if f"torch_{device}_manual_seed" in legacy:
        device_states = legacy[f"torch_{device}_manual_seed"]
        states["rng"]["device"] = {"type": device, "states": device_states if isinstance(device_states, list)
                                   else [device_states]}
    if accelerator.scaler is not None:
        states["scaler"] = _load_pickle(folder / "scaler.pt")
    return states


def load_training_state(accelerator: Accelerator, folder: Path, objects: TrainingObjects) -> None:
    """Load a checkpoint's states into the prepared objects, the gradient scaler and the random-number
    generators. Raises (a safetensors, JSON, OS or ``RefusedPickleError``) when a file is unusable."""
    states = _read_training_state(accelerator, folder)
    # Saved from the unwrapped model; a checkpoint of the previous release under several processes has
    # DistributedDataParallel's prefix.
    weights = {name.removeprefix("module."): tensor for name, tensor in states["model"].items()}
    accelerator.unwrap_model(objects.model).load_state_dict(weights)
    objects.optimizer.load_state_dict(states["optimizer"])
    objects.scheduler.load_state_dict(states["scheduler"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(states["scaler"])
    _set_rng_state(accelerator, states["rng"])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: dict[str, Any], keep: int,
                    objects: TrainingObjects) -> Path:
    """Save the training state of ``objects`` and ``state`` (with ``epoch`` and ``step``) as a complete
    checkpoint.

    The folder is written as ``<name>.tmp`` and renamed when complete; older checkpoints beyond ``keep``
    are pruned after that. A write error (a full disk) removes the partial folder and raises a
    ``TrainingError`` saying so; the previous checkpoints are untouched.
    """
    final = checkpoint_dir(output_dir, state["epoch"], state["step"])
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    try:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        save_training_state(accelerator, partial, objects)
        accelerator.wait_for_everyone()  # every process has written its RNG state
        if accelerator.is_main_process:
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            sync_files(partial)
            if final.exists():  # one that resume skipped as unusable
                shutil.rmtree(final)
            os.replace(partial, final)
            prune_checkpoints(output_dir, keep)
    except Exception as error:  # torch reports a failed write as a RuntimeError, safetensors its own
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(f"could not write the checkpoint {final}: {save_failure(error, output_dir)} Its "
                            "partial files were removed and the earlier checkpoints are intact: fix the "
                            "cause and continue with --resume.") from None
    accelerator.wait_for_everyone()
    return final


def model_signature(config: Any) -> dict[str, Any]:
    """The settings that define a built model (``SIGNATURE_KEYS`` of its config), as JSON values."""
    values = {key: getattr(config, key, None) for key in SIGNATURE_KEYS}
    return json.loads(json.dumps(values))  # id2label keys become strings, tuples lists: as read back


def check_resume(output_dir: str | Path, recipe: Recipe, state: dict[str, Any], signature: dict[str, Any],
                 batches_per_epoch: int) -> list[str]:
    """Refuse to resume ``state`` with a recipe that changes the model; return the other changed fields.

    Compared: the model-defining fields of the run's ``recipe.yaml`` (``RESUME_FIELDS``), the built model's
    ``signature`` with the one saved in the checkpoint (which catches changed data, e.g. other class
    counts), and for a checkpoint inside an epoch the number of batches per epoch (the batches to skip).
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
    if conflicts:
        raise TrainingError(
            f"cannot resume {output_dir}: its model was built with other settings (saved -> now):\n  "
            + "\n  ".join(conflicts) + "\nA resumed run keeps its model and data: change them back, or start "
            "a new run (another --output-dir, or --overwrite).")
    return [f"{key}: {saved!r} -> {now!r}"
            for key, (saved, now) in changed.items() if key not in RESUME_FIELDS]


def _try_load(accelerator: Accelerator, path: Path, output_dir: str | Path, recipe: Recipe,
              signature: dict[str, Any], batches_per_epoch: int, objects: TrainingObjects
              ) -> tuple[dict[str, Any], list[str], str | None]:
    """``(trainer state, other recipe changes, None)`` once loaded, or ``({}, [], why not)``."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return {}, [], f"{TRAINER_STATE}: {error}"
    changes = check_resume(output_dir, recipe, state, signature, batches_per_epoch)
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
    epoch, step = _progress(saved[-1])
    where = f"epoch {epoch}" + (f", {step} batches into the next" if step else "")
    return f"rerun with --resume to continue from its checkpoint after {where} ({saved[-1]})."


def epoch_batches(loader: Any, accelerator: Accelerator, start: int) -> Iterable:
    """The current epoch's batches from batch ``start`` on (a run resumed from a step checkpoint).

    A loader with ``batches(start)`` (``balpoe_hf.device_data.DeviceLoader``) serves them itself; a prepared
    ``DataLoader`` goes through ``accelerator.skip_first_batches``, which skips the indices without loading
    the images.
    """
    if start == 0:
        return loader
    if hasattr(loader, "batches"):
        return loader.batches(start)
    return accelerator.skip_first_batches(loader, start)


# --------------------------------------------------------------------------- non-finite loss


class NonFiniteLossGuard:
    """Notices the first non-finite training loss without a host-device synchronisation per step.

    ``update(loss, batch)`` records, on the device, the number of the first batch whose loss is NaN or
    infinite, and copies a "seen one" flag into pinned host memory with a non-blocking copy, which the host
    reads without waiting. On the CPU the flag is exact at once; on a GPU it turns up as soon as the device
    has run that step (a step or two later at most, since the host runs ahead by that much); ``first_bad``
    then reads the exact batch. Call ``first_bad`` (one synchronisation) before anything leaves the device,
    such as a checkpoint or an evaluation, so that diverged weights are never saved.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.flag = torch.zeros((), dtype=torch.bool, pin_memory=device.type == "cuda")

    def update(self, loss: torch.Tensor, batch: int) -> bool:
        """Record ``loss`` of batch number ``batch``; whether a non-finite loss has been seen so far."""
        keep = torch.isfinite(loss.detach()) | (self.first >= 0)
        self.first = torch.where(keep, self.first, batch)
        self.flag.copy_(self.first >= 0, non_blocking=True)
        return bool(self.flag)

    def first_bad(self) -> int | None:
        """The number of the first batch with a non-finite loss, ``None`` if there was none."""
        first = int(self.first)
        return None if first < 0 else first


def non_finite_loss_error(batch: int, batches_per_epoch: int, accumulation: int,
                          lr_at: Callable[[int], float], output_dir: str | Path) -> TrainingError:
    """The error for a non-finite loss at global batch number ``batch``: where, the lr there, and hints.

    ``lr_at(step)`` is the learning rate at optimizer step ``step`` (0-based).
    """
    epoch, index = divmod(batch, batches_per_epoch)
    step = epoch * -(-batches_per_epoch // accumulation) + index // accumulation
    saved = completed_checkpoints(output_dir)
    where = f"the latest checkpoint, {saved[-1]}, is from before it" if saved else "no checkpoint was saved"
    return TrainingError(
        f"the training loss is not finite (NaN or inf) at epoch {epoch + 1}, batch {index + 1} (optimizer "
        f"step {step + 1}, lr {lr_at(step):.4g}); training stopped there and {where}. The run diverged or "
        "the data holds bad values: lower --lr, set --max-grad-norm (e.g. 5), prefer --mixed-precision bf16 "
        "to fp16, or check the images and labels; then --resume (or start over).")
