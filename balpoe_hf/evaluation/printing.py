"""What ``balpoe-evaluate`` and ``balpoe-train`` print of an evaluation: the balanced-set figures and the
label-shift tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import short_list
from ..metrics import percent


def absent_classes_warning(absent: Sequence[int], num_classes: int, what: str = "test set") -> str:
    """The warning for a test set without images of some classes: its averages leave those classes out."""
    return (f"warning: the {what} has no image of classes {short_list(absent)}: balanced accuracy and the "
            f"many / medium / few-shot accuracies average over the {num_classes - len(absent)} of "
            f"{num_classes} classes it has.")


def format_balanced(report: dict[str, Any], title: str, groups: dict[str, list[int]] | None = None) -> str:
    """A ``long_tail_report`` (with ``calibration_effect``'s figures where present) under ``title`` as a few
    aligned lines, in percent; ``groups`` (``data.shot_groups``) adds the number of classes of each group.

    What ``balpoe-train`` prints after its evaluations, and ``balpoe-evaluate`` for the balanced set.
    """
    shots = ("many", "medium", "few")
    sizes = "" if groups is None else f" ({'/'.join(str(len(groups[g])) for g in shots)} classes)"
    rows = [
        ("accuracy", f"{percent(report['accuracy'])} %"),
        ("balanced accuracy", f"{percent(report['balanced_accuracy'])} %"),
        ("many / medium / few" + sizes, " / ".join(percent(report[g]) for g in shots) + " %"),
        ("ECE / MCE", f"{percent(report['ece'])} / {percent(report['mce'])} %"),
        ("NLL / Brier", f"{report['nll']:.4f} / {report['brier']:.4f}"),
    ]
    if "ece_bcts" in report:
        rows.append(("ECE calibrated", f"{percent(report['ece_temperature_scaling'])} (temperature "
                                       f"scaling) / {percent(report['ece_bcts'])} (BCTS) %"))
    width = max(len(name) for name, _ in rows)
    return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def format_deployment_table(deployment: dict[str, Any], shifts: list[str]) -> str:
    """Per batch size, the mean (worst) gain over ``none`` in points of each mode on each shift."""
    lines = []
    for size, by_shift in deployment.items():
        measured = [shift for shift in shifts if shift in by_shift]
        if not measured:
            lines.append(f"batches of {size}: larger than every shifted set")
            continue
        modes = list(next(iter(by_shift.values())))
        lines.append(f"batches of {size}:")
        lines.append("| prior | " + " | ".join(measured) + " |")
        lines.append("|---|" + "---:|" * len(measured))
        for mode in modes:
            cells = [f"{100 * by_shift[s][mode]['mean_gain']:+.1f} "
                     f"({100 * by_shift[s][mode]['worst_gain']:+.1f})" for s in measured]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stream_table(stream: dict[str, Any]) -> str:
    """The stream report (``stream_batches``) as Markdown: per shift and mode, the mean gain over ``none``
    in points after the first, second, fifth and last batch; then the drift scenario batch by batch."""
    last = stream["batches"]
    shown = sorted({1, 2, min(5, last), last})
    lines = [f"streams of {stream['batch_size']}-image batches, mean gain over none (points) after batch "
             f"{', '.join(map(str, shown))} ({stream['draws']} streams a shift):",
             "| shift | prior | " + " | ".join(f"batch {k}" for k in shown) + " |",
             "|---|---|" + "---:|" * len(shown)]
    for shift, by_mode in stream["shifts"].items():
        for mode, gains in by_mode.items():
            cells = " | ".join(f"{100 * gains[k - 1]:+.1f}" for k in shown)
            lines.append(f"| {shift} | {mode} | {cells} |")
    if "drift" in stream:
        drift = stream["drift"]
        schedule = ", then ".join(f"{count} batches of {shift}" for shift, count in drift["schedule"])
        lines += ["", f"drift ({schedule}; forgetting {drift['forgetting']:g}), gain per batch (points):"]
        for mode, gains in drift["gains"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{100 * g:+.1f}" for g in gains) + " |")
    return "\n".join(lines)


def format_shift_table(shift_accuracy: dict[str, dict[str, float]], shifts: list[str]) -> str:
    """A Markdown table: rows are prior modes, columns the test distributions, cells top-1 accuracy (%)."""
    header = "| prior \u2193 / test set \u2192 | " + " | ".join(shifts) + " |"
    rule = "|---|" + "---:|" * len(shifts)
    rows = [f"| {mode} | " + " | ".join(percent(acc.get(s), 1) for s in shifts) + " |"
            for mode, acc in shift_accuracy.items()]
    return "\n".join([header, rule, *rows])
