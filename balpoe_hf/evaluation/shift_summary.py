"""What a ``balpoe-evaluate`` report says about an unknown-prior mode, in the figures that judge it.

    from balpoe_hf.evaluation.shift_summary import format_shift_summaries, shift_summary

    summary = shift_summary(json.load(open("runs/x/eval/shift.json")), mode="auto")
    print(format_shift_summaries({"runs/x": summary}))

From a report written with ``--shifts all`` (and ``--deployment-sizes 300`` and ``--stream 300`` for the
batch and stream figures), for the mode (``auto`` by default): its worst gain over ``none`` on the full
shifted sets; the share of the oracle's gain it recovers on forward50 and backward50; on small batches, its
worst mean gain over the shifts; on streams, the share of the oracle's full-set gain after the last batch
on forward50 and backward50 and the worst mean gain of any batch of any stream; in the drift scenario, how
many batches after the switch its gain comes within ``DRIFT_TOLERANCE`` of the oracle's. Gains are
fractions of images (points / 100).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# How close to the oracle's gain the drift scenario counts as "back", in accuracy (0.005: half a point).
DRIFT_TOLERANCE = 0.005
EXTREMES = ("forward50", "backward50")


def _recovered(gain: float, oracle: float) -> float | None:
    return gain / oracle if oracle > 0 else None


def shift_summary(report: Mapping[str, Any], mode: str = "auto", batch_size: str = "300") -> dict[str, Any]:
    """The figures of ``mode`` in a ``balpoe-evaluate`` report (``evaluation.evaluate_model``'s)."""
    accuracy = report["shift_accuracy"]
    if mode not in accuracy or "none" not in accuracy or "oracle" not in accuracy:
        raise ValueError(f"the report has no {mode!r}, 'none' and 'oracle' rows; evaluate with --prior "
                         f"none,oracle,{mode}.")
    none, oracle, own = accuracy["none"], accuracy["oracle"], accuracy[mode]
    gains = {shift: own[shift] - none[shift] for shift in own}
    worst = min(gains, key=gains.get)
    summary: dict[str, Any] = {
        "balanced_accuracy": report["balanced"]["balanced_accuracy"], "ece": report["balanced"]["ece"],
        "worst_full_gain": gains[worst], "worst_full_shift": worst,
        "recovered": {shift: _recovered(gains[shift], oracle[shift] - none[shift])
                      for shift in EXTREMES if shift in gains},
    }
    batches = (report.get("deployment_batches") or {}).get(batch_size)
    if batches:
        means = {shift: modes[mode]["mean_gain"] for shift, modes in batches.items()}
        shift = min(means, key=means.get)
        summary["worst_batch_mean"], summary["worst_batch_shift"] = means[shift], shift
    stream = report.get("stream")
    if stream:
        streams = stream["shifts"]
        summary["stream_recovered"] = {
            shift: _recovered(streams[shift][mode][-1], oracle[shift] - none[shift])
            for shift in EXTREMES if shift in streams}
        worst_batch = min((gain, shift, batch + 1) for shift, modes in streams.items()
                          for batch, gain in enumerate(modes[mode]))
        summary["worst_stream_batch"] = {"gain": worst_batch[0], "shift": worst_batch[1],
                                         "batch": worst_batch[2]}
        if "drift" in stream:
            drift = stream["drift"]
            switch = drift["schedule"][0][1]
            after = list(zip(drift["gains"][mode][switch:], drift["gains"]["oracle"][switch:], strict=True))
            close = [k + 1 for k, (gain, best) in enumerate(after) if best - gain <= DRIFT_TOLERANCE]
            back = close[0] if close else None
            gain, best = after[min(5, len(after)) - 1]
            summary["drift_batches_back"], summary["drift_gap_after_five"] = back, best - gain
    return summary


def _points(value: float | None, sign: bool = True) -> str:
    return "-" if value is None else f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def format_shift_summaries(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table, one row per model (``{name: shift_summary(...)}``), in points and percent."""
    lines = ["| model | bal. acc. / ECE % | worst full set | recovered fwd50 / bwd50 | 300-image batches, "
             "worst mean | stream of 10: recovered fwd50 / bwd50 | stream, worst batch | drift: oracle - "
             "auto after 5 batches (back within 0.5 after) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        recovered = s["recovered"]
        batch = (f"{_points(s['worst_batch_mean'])} ({s['worst_batch_shift']})"
                 if "worst_batch_mean" in s else "-")
        if "stream_recovered" in s:
            stream = " / ".join(_share(s["stream_recovered"].get(x)) for x in EXTREMES)
            worst = s["worst_stream_batch"]
            worst_text = f"{_points(worst['gain'])} ({worst['shift']}, batch {worst['batch']})"
        else:
            stream = worst_text = "-"
        drift = "-"
        if "drift_batches_back" in s:
            back = s["drift_batches_back"]
            drift = f"{_points(s['drift_gap_after_five'], sign=False)} ({back or 'not'})"
        lines.append(
            f"| {name} | {_points(s['balanced_accuracy'], False)} / {_points(s['ece'], False)} | "
            f"{_points(s['worst_full_gain'])} ({s['worst_full_shift']}) | "
            f"{' / '.join(_share(recovered.get(x)) for x in EXTREMES)} | {batch} | {stream} | {worst_text} | "
            f"{drift} |")
    return "\n".join(lines)
