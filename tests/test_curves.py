"""Learning curves of runs, finished or still going (balpoe_hf.evaluation.curves), against histories written
by hand."""

import json

import pytest
from helpers import load_script

from balpoe_hf.errors import TrainingError
from balpoe_hf.evaluation.curves import epochs_done, eval_history, format_curve_table
from balpoe_hf.evaluation.plots import training_curves_plot

HISTORY = [{"epoch": 20, "balanced_accuracy": 0.5, "accuracy": 0.6, "ece": 0.1},
           {"epoch": 40, "balanced_accuracy": 0.612, "accuracy": 0.7, "ece": 0.081},
           {"epoch": 50, "balanced_accuracy": 0.65, "accuracy": 0.72, "ece": 0.07}]


def _state(folder, epoch, step, history):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "step": step,
                                                           "eval_history": history}))


def test_history_of_a_finished_and_of_an_unfinished_run(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "train_results.json").write_text(json.dumps({"epochs": 50, "eval_history": HISTORY}))
    assert eval_history(finished) == HISTORY and epochs_done(finished) == 50
    going = tmp_path / "going"
    _state(going / "checkpoints" / "epoch-0040", 40, 0, HISTORY[:2])
    _state(going / "checkpoints" / "epoch-0020", 20, 0, HISTORY[:1])
    _state(going / "checkpoints" / "step-0041-00010", 40, 10, [*HISTORY[:2], {"epoch": 99}])  # mid-epoch
    (going / "checkpoints" / "epoch-0060.partial").mkdir()  # a checkpoint being written: no state yet
    assert eval_history(going) == HISTORY[:2] and epochs_done(going) == 40
    with pytest.raises(TrainingError, match=r"neither train_results\.json nor an epoch checkpoint"):
        eval_history(tmp_path / "empty")
    assert epochs_done(tmp_path / "empty") == 0


def test_table_every_twenty_epochs_and_the_last(tmp_path):
    table = format_curve_table({"a": HISTORY, "b": HISTORY[:1]}, every=20).splitlines()
    assert table[0] == "| epoch | a: bal. acc. / ECE % | b: bal. acc. / ECE % |"
    assert table[2:] == ["| 20 | 50.00 / 10.00 | 50.00 / 10.00 |", "| 40 | 61.20 / 8.10 | - |",
                         "| 50 | 65.00 / 7.00 | - |"]
    picture = training_curves_plot({"a": HISTORY, "b": HISTORY[:1]}, tmp_path / "curves.png",
                                   reference={"a": {"balanced_accuracy": 84.2, "ece": 6.3}})
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 5000


def test_the_script_names_a_folder_that_is_no_run_and_exits_2(tmp_path, capsys):
    script = load_script("training_curves")
    (tmp_path / "comparison.json").write_text("{}")
    assert script.main([str(tmp_path / "comparison.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "comparison.json has neither train_results.json" in error
    assert "Traceback" not in error
