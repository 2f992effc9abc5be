"""What a run's held-out calibration would change if applied to its predictions
(balpoe_hf.evaluation.calibrated, scripts/calibrated_shifts.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, tiny_recipe

from balpoe_hf import cli
from balpoe_hf.errors import EvaluationError
from balpoe_hf.evaluation.calibrated import calibrated_shift_accuracy, run_calibrated_shifts
from balpoe_hf.evaluation.shifts import shifted_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_accuracies_by_hand_on_a_balanced_set():
    # Two images a class; T = 2, b = (-1, 0.6, 0.2). Predictions of z: 0, 0, 0, 2, 2, 2 (rows 2 and 3 wrong);
    # of z / 2 + b: 1 ((0.5, 0.6, 0.2)), 0, 1 ((-0.5, 0.6, 0.2)), 1 ((-1, 0.85, 0.5)), 2, 2 (row 0 wrong).
    logits = torch.tensor([[3, 0, 0], [6, 0, 0], [1, 0, 0], [0, 0.5, 0.6], [1, 0, 1.5], [0, 0, 2]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert len(shifted_rows(labels, [10, 5, 1], "uniform")) == 6  # the uniform set is the whole balanced set
    calibration = {"temperature": 2.0, "bias": [-1, 0.6, 0.2]}
    result = calibrated_shift_accuracy(logits, labels, [10, 5, 1], calibration, ["uniform"])
    # On the uniform set the true prior adds log(3 * 1/3) = 0: oracle is none.
    assert result == {"uniform": pytest.approx({"none": 4 / 6, "oracle": 4 / 6, "calibrated": 5 / 6,
                                                "calibrated+oracle": 5 / 6}, abs=1e-12)}


@pytest.fixture(scope="module")
def holdout_run(tiny_data, tmp_path_factory) -> Path:
    """One epoch of the tiny recipe with half of each class held out (a BCTS calibration in its config), and
    balpoe-evaluate's report of it on three shifted sets."""
    from balpoe_hf.training import loop as training

    run = tmp_path_factory.mktemp("calibrated") / "run"
    torch.set_num_threads(1)
    training.train(tiny_recipe(tiny_data, holdout_fraction=0.5, epochs=1, lr=0.02, many_threshold=10,
                               few_threshold=3), run)
    assert cli.evaluate_main(["--model", str(run), "--shifts", "forward5,uniform,backward5", "--prior",
                              "none,oracle", "--output", str(run / "eval" / "report.json")]) == 0
    return run


def test_a_run_gives_the_reports_none_and_oracle_and_its_calibration(holdout_run, capsys):
    report = json.loads((holdout_run / "eval" / "report.json").read_text())
    calibration = json.loads((holdout_run / "config.json").read_text())["calibration"]
    result = run_calibrated_shifts(holdout_run, ["forward5", "uniform", "backward5"])
    for shift in ("forward5", "uniform", "backward5"):
        for mode in ("none", "oracle"):
            assert result["accuracy"][shift][mode] == pytest.approx(report["shift_accuracy"][mode][shift],
                                                                   abs=1e-9), (shift, mode)
    assert result["accuracy"]["uniform"]["calibrated"] == result["accuracy"]["uniform"]["calibrated+oracle"]
    assert result["temperature"] == calibration["temperature"] and result["bias"] == calibration["bias"]
    script = load_script("calibrated_shifts")
    assert script.main([str(holdout_run), "--shifts", "forward5,uniform,backward5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"BCTS temperature {calibration['temperature']:.3f}; biases: ")
    assert lines[2] == "| test set | none | oracle | calibrated | calibrated+oracle |"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| forward5", "| uniform", "| backward5"]


def test_a_run_without_a_held_out_split_or_a_recipe_is_refused(tiny_run, capsys):
    assert load_script("calibrated_shifts").main([str(tiny_run)]) == 2
    assert "has no held-out calibration (config.calibration), so there is none to apply: train it with a " \
           "held-out split (--holdout-fraction" in capsys.readouterr().err
    with pytest.raises(EvaluationError, match=r"holds no recipe\.yaml"):
        run_calibrated_shifts(tiny_run / "checkpoints")
