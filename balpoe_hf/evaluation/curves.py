"""Learning curves of runs: the balanced test set's accuracy and ECE at every evaluation of a training.

    from balpoe_hf.evaluation.curves import eval_history, format_curve_table
    from balpoe_hf.evaluation.plots import training_curves_plot

    histories = {name: eval_history(f"runs/paper/{name}") for name in ("bs", "balpoe", "balpoe-erm")}
    print(format_curve_table(histories, every=20))
    training_curves_plot(histories, "curves.png")

A run evaluates every ``eval_every`` epochs (a recipe field) and keeps the results as ``eval_history``:
in ``train_results.json`` once it has finished, and in its epoch checkpoints' ``trainer_state.json`` while it
is still going, so that a run stopped by ``--time-limit`` shows its curve so far.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..metrics import percent


def _checkpoint_history(run_dir: Path) -> tuple[int, list[dict[str, Any]]] | None:
    """``(epoch, eval_history)`` of the run's latest epoch checkpoint, if it has one."""
    latest = None
    for state_file in (run_dir / "checkpoints").glob("*/trainer_state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or damaged: the one before serves
        if isinstance(state, dict) and state.get("step", 0) == 0 and (
                latest is None or state["epoch"] > latest[0]):
            latest = (int(state["epoch"]), list(state.get("eval_history") or []))
    return latest


def eval_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations of a run so far: ``[{"epoch", "balanced_accuracy", "accuracy", "ece"}, ...]``."""
    run_dir = Path(run_dir)
    results = run_dir / "train_results.json"
    if results.is_file():
        return list(json.loads(results.read_text()).get("eval_history") or [])
    latest = _checkpoint_history(run_dir)
    if latest is None:
        raise TrainingError(f"{run_dir} has neither train_results.json nor an epoch checkpoint: no "
                            "evaluation to show yet (give the folder of a balpoe-train run).")
    return latest[1]


def epochs_done(run_dir: str | Path) -> int:
    """How many epochs a run has finished (0 when it has not saved an epoch yet)."""
    run_dir = Path(run_dir)
    results = run_dir / "train_results.json"
    if results.is_file():
        return int(json.loads(results.read_text()).get("epochs") or 0)
    latest = _checkpoint_history(run_dir)
    return 0 if latest is None else latest[0]


def format_curve_table(histories: Mapping[str, Sequence[Mapping[str, Any]]], every: int = 20) -> str:
    """A Markdown table: a row every ``every`` epochs (and the last), a column per run with balanced accuracy
    / ECE in percent; ``-`` where a run has no evaluation at that epoch."""
    by_run = {name: {entry["epoch"]: entry for entry in history} for name, history in histories.items()}
    epochs = sorted({epoch for entries in by_run.values() for epoch in entries
                     if epoch % every == 0 or epoch == max(entries)})
    lines = ["| epoch | " + " | ".join(f"{name}: bal. acc. / ECE %" for name in histories) + " |",
             "|---:|" + "---:|" * len(histories)]
    for epoch in epochs:
        cells = []
        for entries in by_run.values():
            entry = entries.get(epoch)
            cells.append("-" if entry is None else
                         f"{percent(entry['balanced_accuracy'])} / {percent(entry['ece'])}")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
