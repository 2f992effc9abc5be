"""Evaluation pictures as PNG files: reliability diagram, per-class accuracy against training count, a
side-by-side comparison of methods, the training class-count histogram of a model card, and learning
curves (``curves.eval_history`` of several runs).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here needs a display or
changes the caller's matplotlib backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.splits import rank_by_count
from ..metrics import ArrayLike, calibration_errors, percent, reliability_bins
from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

DPI = 120


def _figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return path


def _looks_like_probabilities(scores: np.ndarray) -> bool:
    return bool((scores >= 0).all() and (scores <= 1).all() and np.allclose(scores.sum(axis=1), 1, atol=1e-3))


def reliability_diagram(probs_or_logits: ArrayLike, labels: ArrayLike, path: str | Path, n_bins: int = 15,
                        from_probs: bool | None = None, title: str = "Reliability diagram") -> Path:
    """Accuracy against confidence in ``n_bins`` equal-width bins, the gap shaded, ECE in the title.

    ``from_probs=None`` treats the scores as probabilities when every row is a probability vector, else as
    logits; pass ``True`` / ``False`` to decide explicitly. Returns the PNG path.
    """
    if hasattr(probs_or_logits, "detach"):
        probs_or_logits = probs_or_logits.detach().cpu().numpy()
    scores = np.asarray(probs_or_logits, dtype=np.float64)
    if from_probs is None:
        from_probs = scores.ndim == 2 and _looks_like_probabilities(scores)
    bins = reliability_bins(scores, labels, n_bins=n_bins, from_probs=from_probs)
    fig, ax = _figure(4.5, 4.5)
    _draw_reliability(ax, bins, title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def _draw_reliability(ax, bins: dict[str, list], title: str) -> None:
    """Accuracy bars per confidence bin (``calibration_bins`` statistics), gap shaded, ECE in the title."""
    ece, _ = calibration_errors(bins)
    lower = np.asarray(bins["lower"])
    width = float(np.asarray(bins["upper"])[0] - lower[0])
    filled = [i for i, n in enumerate(bins["count"]) if n > 0]
    accuracy = np.asarray([bins["accuracy"][i] for i in filled])
    confidence = np.asarray([bins["confidence"][i] for i in filled])
    ax.bar(lower[filled], accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.5, label="accuracy")
    # The gap: from each bin's accuracy to its mean confidence, hatched red (above or below the bar).
    ax.bar(lower[filled], confidence - accuracy, bottom=accuracy, width=width, align="edge", color="tab:red",
           alpha=0.3, hatch="//", edgecolor="tab:red", linewidth=0.5, label="gap")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{title} (ECE {percent(ece)}%)")


def per_class_accuracy_plot(per_class_accuracy: Sequence[float | None], train_counts: Sequence[int],
                            path: str | Path, many: int = MANY_SHOT_THRESHOLD,
                            few: int = FEW_SHOT_THRESHOLD) -> Path:
    """Test accuracy of each class against its training count (log x-axis), shot-group thresholds dashed.

    Classes with accuracy ``None`` (no test sample) are left out. Returns the PNG path.
    """
    if len(per_class_accuracy) != len(train_counts):
        raise ValueError(f"per_class_accuracy has {len(per_class_accuracy)} entries but train_counts has "
                         f"{len(train_counts)}; give one of each per class.")
    pairs = zip(train_counts, per_class_accuracy, strict=True)
    shown = [(count, acc) for count, acc in pairs if acc is not None]
    if not shown:
        raise ValueError("no class has a test accuracy to plot (all entries are None).")
    counts, accuracy = (np.asarray(v, dtype=np.float64) for v in zip(*shown, strict=True))
    fig, ax = _figure(6, 4)
    ax.scatter(counts, accuracy, s=18, color="tab:blue", edgecolor="black", linewidth=0.4)
    _per_class_axes(ax, many, few)
    return _save(fig, path)


def _per_class_axes(ax: Axes, many: int, few: int) -> None:
    """Axes of a per-class accuracy plot: log training count, the shot-group thresholds, labels and grid."""
    for threshold, name in ((many, "many-shot >"), (few, "few-shot <")):
        ax.axvline(threshold, linestyle="--", color="gray", linewidth=0.8)
        ax.text(threshold, 1.02, f"{name} {threshold}", ha="center", va="bottom", fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set(ylim=(0, 1.08), xlabel="training samples of the class (log scale)", ylabel="test accuracy",
           title="Per-class accuracy")
    ax.grid(alpha=0.3)


def method_comparison_plot(methods: Mapping[str, Mapping[str, Sequence]], train_counts: Sequence[int],
                           path: str | Path, many: int = MANY_SHOT_THRESHOLD,
                           few: int = FEW_SHOT_THRESHOLD) -> Path:
    """One picture comparing methods: a reliability diagram per method side by side, and below them the
    per-class test accuracy of every method against the class's training count (log x-axis).

    ``methods`` maps a method name to ``{"reliability": calibration_bins statistics, "per_class_accuracy":
    one accuracy (or None) per class}``, e.g. from ``balpoe_hf.compare``. Returns the PNG path.
    """
    if not methods:
        raise ValueError("no method to plot; pass at least one {name: {reliability, per_class_accuracy}}.")
    for name, entry in methods.items():
        if len(entry["per_class_accuracy"]) != len(train_counts):
            raise ValueError(f"{name}: per_class_accuracy has {len(entry['per_class_accuracy'])} entries but "
                             f"train_counts has {len(train_counts)}; give one of each per class.")
    columns = len(methods)
    fig = Figure(figsize=(3.2 * max(columns, 3), 7.2))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, columns, height_ratios=[1, 1.1], hspace=0.35, wspace=0.3)
    for column, (name, entry) in enumerate(methods.items()):
        ax = fig.add_subplot(grid[0, column])
        _draw_reliability(ax, entry["reliability"], name)
        ax.title.set_fontsize(9)
        if column:
            ax.set_ylabel("")
    ax = fig.add_subplot(grid[1, :])
    counts = np.asarray(train_counts, dtype=np.float64)
    # Methods at the same count are spread a little sideways (in log space) so their markers do not hide
    # each other.
    offsets = np.linspace(-0.04, 0.04, columns) if columns > 1 else np.zeros(1)
    markers = "osD^v<>ph*"
    for index, (name, entry) in enumerate(methods.items()):
        shown = [(c, a) for c, a in zip(counts, entry["per_class_accuracy"], strict=True) if a is not None]
        x, y = (np.asarray(v, dtype=np.float64) for v in zip(*shown, strict=True))
        order = np.argsort(x)
        ax.plot(x[order] * 10 ** offsets[index], y[order], marker=markers[index % len(markers)], markersize=4,
                linewidth=0.8, label=name)
    _per_class_axes(ax, many, few)
    ax.legend(fontsize=8, ncol=min(columns, 6), loc="lower right")
    return _save(fig, path)


def class_count_histogram(train_counts: Sequence[int], path: str | Path,
                          class_names: Sequence[str] | None = None) -> Path:
    """Training samples per class, classes sorted from the most to the least frequent. Returns the PNG path.

    With ``class_names`` (label-index order) the bars are labelled, else numbered by class index.
    """
    if len(train_counts) == 0:
        raise ValueError("train_counts is empty; pass one training count per class.")
    if class_names is not None and len(class_names) != len(train_counts):
        raise ValueError(f"class_names has {len(class_names)} entries but train_counts has "
                         f"{len(train_counts)}; give one name per class, in label-index order.")
    order = rank_by_count(list(train_counts))
    labels = [str(class_names[c]) if class_names is not None else str(c) for c in order]
    counts = [train_counts[c] for c in order]
    fig, ax = _figure(max(4.0, min(12.0, 0.35 * len(order))), 3.5)
    ax.bar(range(len(order)), counts, color="tab:blue")
    # Names are readable up to a few dozen classes; beyond that the rank axis alone says more.
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), labels, rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xlabel("class rank")
    ratio = max(counts) / min(counts) if min(counts) > 0 else float("inf")
    ax.set(ylabel="training samples", title=f"Training class counts (imbalance ratio {ratio:.4g})")
    return _save(fig, path)


def training_curves_plot(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                         reference: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Balanced accuracy and ECE (%) against the epoch, a line per run; ``reference`` (run name ->
    ``{"balanced_accuracy", "ece"}`` in percent, e.g. a paper's final figures) adds a dashed line each."""
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for name, history in histories.items():
        epochs = [entry["epoch"] for entry in history]
        line, = axes[0].plot(epochs, [100 * e["balanced_accuracy"] for e in history], marker="o",
                             label=name)
        axes[1].plot(epochs, [100 * e["ece"] for e in history], marker="o", color=line.get_color())
        for axis, key in ((axes[0], "balanced_accuracy"), (axes[1], "ece")):
            value = (reference or {}).get(name, {}).get(key)
            if value is not None:
                axis.axhline(value, linestyle="--", linewidth=1, color=line.get_color())
    for axis, title in zip(axes, ("balanced accuracy (%)", "ECE (%)"), strict=True):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    if reference:
        fig.suptitle("dashed: the paper's final figures", fontsize=9)
    return _save(fig, path)
