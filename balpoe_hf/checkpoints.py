"""A run's output directory and its checkpoints (accelerate's ``save_state`` folders plus a trainer state).

A checkpoint is complete once its ``trainer_state.json`` is written, which happens last; only complete
checkpoints are resumed from, and incomplete ones (a crash while saving) are deleted with the old ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .recipes import TrainingError

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless told to resume or overwrite (read-only)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path} exists and is not a directory.")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one.")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise TrainingError(f"the output directory {path} is not empty. Pass --resume to continue its run "
                            "from the latest checkpoint, --overwrite to start over (its contents are "
                            "deleted), or another --output-dir.")


def clear_directory(path: str | Path) -> None:
    for child in Path(path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"epoch-{epoch:04d}"


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with their trainer state) from the oldest to the latest."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("epoch-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` latest complete checkpoints, and any incomplete one left by a crash."""
    complete = completed_checkpoints(output_dir)
    root = Path(output_dir) / CHECKPOINTS_DIR
    incomplete = [p for p in root.glob("epoch-*") if p not in complete]
    for path in complete[:-keep] + incomplete:
        shutil.rmtree(path, ignore_errors=True)
