"""A run's output directory: what the run wrote there, its checkpoints, and the checks on resuming it.

**Manifest.** ``balpoe_outputs.json`` lists the files the package wrote into a run directory, each with its
SHA-256, and the folders the run owns whole (``checkpoints/``, ``logs/``). ``--overwrite`` deletes only
those, and refuses when one of them was changed since; no command replaces a file that is not listed with
its current content: a run's outputs (``run_output_files``), ``balpoe_hf.hub``'s card, and
``balpoe-evaluate``'s reports, which are listed under ``reports`` as well (in the run's manifest, or in one
beside them), so that a report never replaces a model file. A directory is a run when its manifest lists the
``checkpoints/`` folder, or (a run from before manifests) when it holds a checkpoint; ``--resume`` and
``--overwrite`` refuse any other.

**Checkpoints.** Each is accelerate's ``save_state`` folder (model, optimizer, scheduler, RNG states) plus
``trainer_state.json`` (progress, statistics and the settings that define the model). It is written under a
temporary name (``<name>.tmp``) and renamed once all of its files are on disk, so a folder with a final
name is complete; a crash or a full disk while saving leaves a ``.tmp`` folder that resume ignores and the
next save removes. ``epoch-0003`` is the state after three epochs, ``epoch-0003-step-000050`` the state 50
batches into the fourth (``Recipe.checkpoint_every_steps``). Resuming loads the latest checkpoint that can
be loaded, says which ones it skipped and why, and refuses a recipe that changes the model.

**Non-finite loss.** ``NonFiniteLossGuard`` stops a run at its first non-finite loss without a
host-device synchronisation per step, so that no checkpoint or evaluation ever sees diverged weights.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .configuration_balpoe import POST_TRAINING_SETTINGS, SETTINGS
from .data import short_list
from .errors import TrainingError
from .recipes import CONFIG_FIELDS, Recipe, recipe_differences, save_recipe

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "balpoe_outputs.json"
RUN_FOLDERS = (CHECKPOINTS_DIR, "logs")  # folders a run owns whole (TensorBoard writes under logs/)
PARTIAL_SUFFIX = ".tmp"
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


# --------------------------------------------------------------------------- the manifest


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of ``run_dir`` (``{"files": {path: sha256}, "folders": [...], "reports": [...]}``),
    ``None`` if none."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrainingError(f"{path} is damaged ({error}); delete the files of the run yourself, or use "
                            "another output directory.") from None
    if not isinstance(manifest, dict):
        raise TrainingError(f"{path} is damaged (not a JSON object); delete the files of the run yourself, "
                            "or use another output directory.")
    manifest.setdefault("files", {})
    manifest.setdefault("folders", [])
    manifest.setdefault("reports", [])
    return manifest


def record_outputs(run_dir: str | Path, files: Iterable[str | Path] = (), folders: Iterable[str] = (),
                   *, reports: bool = False) -> None:
    """Add ``files`` (paths in ``run_dir``, with their current content) and ``folders`` to its manifest;
    ``reports``: the files are ``balpoe-evaluate`` reports (listed under ``reports`` too)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) or {"written_by": "balpoe-hf", "files": {}, "folders": [],
                                          "reports": []}
    root = run_dir.resolve()
    names = []
    for file in files:
        path = Path(file)
        names.append(path.resolve().relative_to(root).as_posix())
        manifest["files"][names[-1]] = _sha256(path)
    manifest["folders"] = sorted(set(manifest["folders"]) | set(folders))
    if reports:
        manifest["reports"] = sorted(set(manifest["reports"]) | set(names))
    partial = run_dir / (MANIFEST + PARTIAL_SUFFIX)
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, run_dir / MANIFEST)


def _file_stamps(run_dir: Path) -> dict[Path, tuple[int, int]]:
    skip = {run_dir / folder for folder in RUN_FOLDERS}
    stamps = {}
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        for name in files:
            stat = Path(root, name).stat()
            stamps[Path(root, name)] = (stat.st_size, stat.st_mtime_ns)
    return stamps


@contextlib.contextmanager
def recording(run_dir: str | Path) -> Iterator[None]:
    """Record in the manifest every file of ``run_dir`` that the block creates or changes (a new size or
    modification time); files it leaves alone keep their entry, or stay unlisted."""
    run_dir = Path(run_dir)
    before = _file_stamps(run_dir)
    yield
    changed = [path for path, stamp in _file_stamps(run_dir).items()
               if path.name != MANIFEST and before.get(path) != stamp]
    record_outputs(run_dir, changed)


def written_by_package(run_dir: str | Path, name: str, report: bool = False) -> bool:
    """Whether ``run_dir/name`` is listed in the manifest with exactly its current content (``report``: and
    as a ``balpoe-evaluate`` report)."""
    path = Path(run_dir) / name
    manifest = read_manifest(run_dir)
    key = Path(name).as_posix()
    digest = manifest["files"].get(key) if manifest else None
    if report and (manifest is None or key not in manifest["reports"]):
        return False
    return digest is not None and path.is_file() and _sha256(path) == digest


def run_output_files() -> list[str]:
    """The files a run writes at the top of its directory: the model (``save_pretrained``, with the code files
    of its remote code), the image processor, the recipe and the results."""
    from transformers.dynamic_module_utils import get_relative_import_files
    from transformers.utils import (
        CONFIG_NAME,
        IMAGE_PROCESSOR_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
    )

    from . import configuration_balpoe, modeling_balpoe

    code = {Path(file).name for module in (modeling_balpoe, configuration_balpoe)
            for file in (module.__file__, *get_relative_import_files(module.__file__))}
    return [CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, IMAGE_PROCESSOR_NAME, "recipe.yaml",
            "train_results.json", "eval_results.json", "holdout_results.json", *sorted(code)]


def check_writable(folder: str | Path, what: str, error: type[Exception] = TrainingError) -> None:
    """Refuse, with an ``error`` (a ``TrainingError`` by default) naming ``what``, a ``folder`` that cannot
    be created or take a new file (tried with a temporary file in it or its nearest existing parent, which
    is removed)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise error(f"cannot write {what} {folder}: {existing} is a file, not a folder.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as failure:
        raise error(f"cannot write {what} {folder}: {existing} does not take new files "
                    f"({failure.strerror}); choose a folder you can write to.") from None


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a balpoe-hf run: its manifest lists the run's folders, or (a run from before
    manifests) it holds a complete checkpoint."""
    manifest = read_manifest(run_dir)
    if manifest is not None:
        return CHECKPOINTS_DIR in manifest["folders"]
    return bool(completed_checkpoints(run_dir))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool,
                     inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an output directory the run must not write to; reads only.

    A non-empty directory needs ``resume`` or ``overwrite``, and must be a run's directory (a manifest, or
    the checkpoints of a run from before manifests). ``overwrite`` needs the manifest, refuses when a file
    it lists was changed since the package wrote it, and refuses when an ``inputs`` path (the run's data)
    lies in what it would delete.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path} exists and is not a directory.")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one.")
    check_writable(path, "--output-dir")
    if not path.is_dir() or not any(path.iterdir()):
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
    """Create the run directory, write the resolved ``recipe.yaml`` and list both in the manifest."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, path / "recipe.yaml")
    record_outputs(path, [path / "recipe.yaml"], RUN_FOLDERS)


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


def _sync_to_disk(folder: Path) -> None:
    """Flush the files of ``folder`` to the disk, so that the rename marks a checkpoint that is there."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: dict[str, Any],
                    keep: int) -> Path:
    """Save the accelerate state and ``state`` (with ``epoch`` and ``step``) as a complete checkpoint.

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
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()  # every process has written its RNG state
        if accelerator.is_main_process:
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            _sync_to_disk(partial)
            if final.exists():  # one that resume skipped as unusable
                shutil.rmtree(final)
            os.replace(partial, final)
            prune_checkpoints(output_dir, keep)
    except Exception as error:  # torch.save reports a failed write as a RuntimeError, safetensors its own
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) \
            or shutil.disk_usage(Path(output_dir)).free < 2**20
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"could not write the checkpoint {final}: {reason}."
                            f"{' The disk is full.' if full else ''} Its partial files were removed and the "
                            "earlier checkpoints are intact: fix the cause and continue with --resume."
                            ) from None
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
              signature: dict[str, Any], batches_per_epoch: int
              ) -> tuple[dict[str, Any], list[str], str | None]:
    """``(trainer state, other recipe changes, None)`` once loaded, or ``({}, [], why not)``."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return {}, [], f"{TRAINER_STATE}: {error}"
    changes = check_resume(output_dir, recipe, state, signature, batches_per_epoch)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # safetensors, pickle, torch and OS errors alike: some file is unusable
        first_line = str(error).splitlines()[0] if str(error) else ""
        return {}, [], f"{type(error).__name__}: {first_line}"
    return state, changes, None


def load_checkpoint(accelerator: Accelerator, output_dir: str | Path, recipe: Recipe,
                    signature: dict[str, Any], batches_per_epoch: int) -> dict[str, Any] | None:
    """Load the latest loadable checkpoint into the prepared objects and return its trainer state.

    Checkpoints that cannot be read (a truncated or damaged file) are skipped, newest first, with a warning
    naming each and the reason; all processes agree on the one they load. ``None`` when there is none.
    Raises ``TrainingError`` when every checkpoint is damaged, or when the recipe changes the model
    (``check_resume``).
    """
    skipped = []
    for path in reversed(completed_checkpoints(output_dir)):
        state, changes, reason = _try_load(accelerator, path, output_dir, recipe, signature,
                                           batches_per_epoch)
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
