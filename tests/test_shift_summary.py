"""The label-shift figures of a report (balpoe_hf.evaluation.shift_summary), against a report written by
hand."""

import pytest

from balpoe_hf.evaluation.shift_summary import format_shift_summaries, shift_summary

REPORT = {
    "balanced": {"balanced_accuracy": 0.8, "ece": 0.02},
    "shift_accuracy": {
        "none": {"forward50": 0.90, "uniform": 0.80, "backward50": 0.70},
        "oracle": {"forward50": 0.94, "uniform": 0.80, "backward50": 0.80},
        "auto": {"forward50": 0.93, "uniform": 0.798, "backward50": 0.78},
    },
    "deployment_batches": {"300": {
        "forward50": {"oracle": {"mean_gain": 0.04}, "auto": {"mean_gain": 0.02}},
        "uniform": {"oracle": {"mean_gain": 0.0}, "auto": {"mean_gain": -0.004}}}},
    "stream": {
        "batch_size": 300, "batches": 3, "draws": 2,
        "shifts": {"forward50": {"oracle": [0.04, 0.04, 0.04], "auto": [0.01, 0.02, 0.03]},
                   "backward50": {"oracle": [0.1, 0.1, 0.1], "auto": [-0.001, 0.05, 0.06]}},
        "drift": {"schedule": [["forward50", 2], ["backward50", 6]], "forgetting": 0.5,
                  "gains": {"oracle": [0.04, 0.04, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],
                            "auto": [0.02, 0.03, -0.05, 0.02, 0.06, 0.094, 0.097, 0.099]}},
    },
}


def test_summary_by_hand():
    summary = shift_summary(REPORT)
    # Full sets: gains +3, -0.2, +8 points; the oracle's +4, 0, +10.
    assert summary["worst_full_gain"] == pytest.approx(-0.002) and summary["worst_full_shift"] == "uniform"
    assert summary["recovered"] == pytest.approx({"forward50": 0.75, "backward50": 0.8})
    assert summary["worst_batch_mean"] == pytest.approx(-0.004) and summary["worst_batch_shift"] == "uniform"
    # Streams: the last batch against the oracle's full-set gain; the worst batch of any stream.
    assert summary["stream_recovered"] == pytest.approx({"forward50": 0.75, "backward50": 0.6})
    assert summary["worst_stream_batch"] == {"gain": -0.001, "shift": "backward50", "batch": 1}
    # Drift: after the switch the gaps are 15, 8, 4, 0.6, 0.3, 0.1 points: within 0.5 from the 5th batch.
    assert summary["drift_batches_back"] == 5
    assert summary["drift_gap_after_five"] == pytest.approx(0.003)


def test_table_and_a_report_without_batches():
    plain = {"balanced": REPORT["balanced"], "shift_accuracy": REPORT["shift_accuracy"]}
    table = format_shift_summaries({"full": shift_summary(REPORT), "plain": shift_summary(plain)})
    rows = table.splitlines()
    assert rows[2] == ("| full | 80.0 / 2.0 | -0.2 (uniform) | 75 % / 80 % | -0.4 (uniform) | 75 % / 60 % | "
                       "-0.1 (backward50, batch 1) | 0.3 (5) |")
    assert rows[3] == "| plain | 80.0 / 2.0 | -0.2 (uniform) | 75 % / 80 % | - | - | - | - |"
    with pytest.raises(ValueError, match="no 'em', 'none' and 'oracle' rows"):
        shift_summary(REPORT, mode="em")
