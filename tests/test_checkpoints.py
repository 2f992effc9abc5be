"""Checkpoints and resume: step checkpoints inside an epoch, damaged checkpoints, refused recipe changes, a
finished run's statistics, and the config as the one source of the prior and the lambdas.

In-process runs of ``balpoe_hf.training.train`` on the tiny dataset of ``train_synthetic``, most of them
resumed from the shared tiny run (tests/conftest.py ``tiny_run``); a run killed inside an epoch is simulated
by copying what was on disk at that moment (the run directory with its checkpoints up to one step
checkpoint), which is exactly what a kill leaves, and a kill during a save by the copies ``KillPoints``
(tests/conftest.py) takes before each rename. Resuming inside an epoch to the weights of the uninterrupted
run, with either data pipeline, is tested in test_loaders.py; the output directory rules of --overwrite and
--resume are at the end.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_RUN, assert_same_weights, copy_run, flags, folder_bytes, tiny_recipe
from helpers import tiny_run_recipe as _recipe
from processes import hold_lock
from safetensors.torch import load_file
from train_synthetic import TRAIN_COUNTS

from balpoe_hf import cli, recipes, run_folder
from balpoe_hf.errors import TrainingError
from balpoe_hf.training import checkpoints, resume
from balpoe_hf.training import loop as training
from balpoe_hf.training.loop import train


@pytest.fixture(scope="module")
def data(tiny_data) -> tuple[Path, Path]:
    return tiny_data


@pytest.fixture(scope="module")
def reference(tiny_run) -> Path:
    """The uninterrupted run, keeping all of its checkpoints (tests/helpers.py TINY_RUN)."""
    return tiny_run


def _killed_at(reference: Path, checkpoint: str, target: Path, extra: tuple[str, ...] = ()) -> Path:
    """The run directory as a kill just after ``checkpoint`` left it: recipe, manifest, checkpoints."""
    target.mkdir(parents=True)
    for name in ("recipe.yaml", run_folder.MANIFEST):
        shutil.copy(reference / name, target / name)
    for name in (checkpoint, *extra):
        shutil.copytree(reference / "checkpoints" / name, target / "checkpoints" / name)
    return target


# --------------------------------------------------------------------------- step checkpoints (issue 15.4)


def test_step_checkpoints_are_named_by_epoch_and_batch(reference):
    names = [p.name for p in checkpoints.completed_checkpoints(reference)]
    assert names == ["epoch-0000-step-000003", "epoch-0000-step-000006", "epoch-0001",
                     "epoch-0001-step-000002", "epoch-0001-step-000005", "epoch-0002",
                     "epoch-0002-step-000001", "epoch-0002-step-000004", "epoch-0003"]
    state = json.loads((reference / "checkpoints" / "epoch-0001-step-000005" / checkpoints.TRAINER_STATE)
                       .read_text())
    assert (state["epoch"], state["step"], state["batches_per_epoch"]) == (1, 5, 7)


def test_checkpoint_saved_before_newer_trainer_state_fields_resumes(reference, data, tmp_path):
    # A checkpoint from before the per-expert losses and before the signature named every config setting:
    # resume compares the settings it has and goes on to the same weights.
    out = _killed_at(reference, "epoch-0002-step-000004", tmp_path / "run")
    state_file = out / "checkpoints" / "epoch-0002-step-000004" / checkpoints.TRAINER_STATE
    state = json.loads(state_file.read_text())
    for key in ("epoch_expert_loss_sums", "train_expert_losses"):
        del state[key]
    for key in ("lade_weight", "lade_remine_lambda", "method", "backbone_weights_file"):
        del state["model"][key]
    state_file.write_text(json.dumps(state))
    train(_recipe(data), out, resume=True)
    assert_same_weights(out, reference)


def test_prepared_loader_passes_the_epoch_on_to_the_split_also_when_skipping(data):
    from accelerate import Accelerator

    from balpoe_hf.data import loading, transforms

    recipe = _recipe(data)
    train_set, _ = transforms.with_transforms(loading.load_training_data(recipe), recipe, None)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(train_set, batch_size=8, shuffle=True,
                                                             drop_last=True, generator=torch.Generator()))
    loader.set_epoch(2)
    assert train_set.epoch == 2
    batch = next(iter(accelerator.skip_first_batches(loader, 3)))
    assert train_set.epoch == 2 and batch["pixel_values"].shape == (8, 3, 16, 16)


# --------------------------------------------------------------------------- damaged checkpoints (14.9)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, data, tmp_path, capsys):
    out = _killed_at(reference, "epoch-0001-step-000005", tmp_path / "run", extra=("epoch-0001-step-000002",))
    weights = out / "checkpoints" / "epoch-0001-step-000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. by a full disk or a bad copy
    train(_recipe(data), out, resume=True)
    printed = capsys.readouterr().out
    assert "warning: skipped the checkpoint" in printed and "epoch-0001-step-000005" in printed
    assert "cannot be loaded (SafetensorError" in printed
    assert "resumed from" in printed and "epoch-0001-step-000002 (epoch 1 of 3, 2 batches" in printed
    assert_same_weights(out, reference)


def test_every_checkpoint_damaged_says_which_and_what_to_do(reference, data, tmp_path):
    out = _killed_at(reference, "epoch-0001", tmp_path / "run")
    (out / "checkpoints" / "epoch-0001" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    before = folder_bytes(out)
    with pytest.raises(TrainingError, match=r"no checkpoint of the run can be loaded:\n  .*epoch-0001, which "
                                            r"cannot be loaded .*\nDelete them \(rm -r .*checkpoints\)"):
        train(_recipe(data), out, resume=True)
    assert folder_bytes(out) == before


class _FakeAccelerator(SimpleNamespace):
    """What save_checkpoint uses of an Accelerator: one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


def _save_with(monkeypatch, write):
    """save_checkpoint with ``write(folder)`` in place of writing the training state."""
    monkeypatch.setattr(checkpoints, "save_training_state",
                        lambda accelerator, folder, objects: write(folder))


def _save(output_dir, epoch, keep=2):
    state = {"epoch": epoch, "step": 0}
    return checkpoints.save_checkpoint(_FakeAccelerator(), output_dir, state, keep, None)


def test_checkpoint_is_complete_only_once_renamed_and_leftovers_are_ignored(tmp_path, monkeypatch):
    def save_state(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")

    # A crash while saving epoch 2 left its temporary folder behind.
    (tmp_path / "checkpoints" / "epoch-0002.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "epoch-0002.tmp" / "trainer_state.json").write_text("{}")
    assert checkpoints.completed_checkpoints(tmp_path) == []
    _save_with(monkeypatch, save_state)
    for epoch in (1, 2):
        _save(tmp_path, epoch)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert json.loads((tmp_path / "checkpoints" / "epoch-0002" / "trainer_state.json").read_text()) == {
        "epoch": 2, "step": 0}


def test_full_disk_while_saving_says_so_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    def save_state(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)

    def full_disk(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        # What torch.save raised when a 200 kB tmpfs filled up while writing optimizer.bin.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 918")

    _save_with(monkeypatch, save_state)
    _save(tmp_path, 1)
    _save_with(monkeypatch, full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*epoch-0002: \[enforce fail "
                                            r".*\. The disk is full\. Its partial files were removed"):
        _save(tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]
    monkeypatch.undo()

    def no_space(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    _save_with(monkeypatch, no_space)
    with pytest.raises(TrainingError, match=r"No space left on device\. The disk is full\."):
        _save(tmp_path, 2)


# --------------------------------------------------------------------------- changed settings (14.6)


@pytest.mark.parametrize("changes,named", [
    ({"lambdas": [2.0, 0.0, -2.0]}, "lambdas: [1.0, 0.0, -1.0] -> [2.0, 0.0, -2.0]"),
    ({"backbone": "resnet32_cifar"}, "backbone: 'resnet20_cifar' -> 'resnet32_cifar'"),
    ({"image_mean": [0.5, 0.5, 0.5]}, "image_mean: [0.4914, 0.4822, 0.4465] -> [0.5, 0.5, 0.5]"),
    ({"imbalance_ratio": 4.0}, "imbalance_ratio: None -> 4.0"),
])
def test_resume_with_a_changed_model_is_refused_and_touches_nothing(reference, data, tmp_path, changes,
                                                                      named):
    out = _killed_at(reference, "epoch-0001", tmp_path / "run")
    before = folder_bytes(out)
    with pytest.raises(TrainingError) as error:
        train(_recipe(data, **changes), out, resume=True)
    message = str(error.value)
    assert message.startswith(f"cannot resume {out}: its model was built with other settings")
    assert named in message and "change them back, or start a new run" in message
    assert folder_bytes(out) == before


def test_resume_with_other_training_data_is_refused(reference, data, tmp_path):
    out = _killed_at(reference, "epoch-0001", tmp_path / "run")
    (tmp_path / "moved").mkdir()
    shutil.copy(data[1], tmp_path / "moved" / "train.parquet")  # 8 images per class, not 32/16/8/4
    # Data may move (paths are not compared), but the class counts that define the prior must not change.
    recipe = _recipe(data, train_file=[str(tmp_path / "moved" / "train.parquet")])
    with pytest.raises(TrainingError, match=r"class_counts: \[32, 16, 8, 4\] -> \[8, 8, 8, 8\]"):
        train(recipe, out, resume=True)


def test_resume_with_more_epochs_is_allowed_with_a_warning(reference, data, tmp_path, capsys):
    out = _killed_at(reference, "epoch-0003", tmp_path / "run")
    train(_recipe(data, epochs=4, checkpoint_every_steps=0), out, resume=True)
    printed = capsys.readouterr().out
    assert "warning: resuming with recipe changes (saved -> now): epochs: 3 -> 4" in printed
    assert "epoch 4/4" in printed


def test_resume_inside_an_epoch_with_another_accumulation_is_refused(reference, data, tmp_path):
    # Same batches per epoch, but the checkpoint is at a point of the saved accumulation's cycle.
    out = _killed_at(reference, "epoch-0001-step-000002", tmp_path / "run")
    with pytest.raises(TrainingError, match=r"gradient_accumulation_steps: 1 -> 2 \(a step checkpoint"):
        train(_recipe(data, gradient_accumulation_steps=2), out, resume=True)


def _last_lr(printed: str, epoch: str) -> float:
    """The lr that the per-epoch line of ``epoch`` ("3/3") prints: that of the epoch's last step."""
    return float(re.search(rf"epoch {epoch}: [^\n]*, lr ([0-9.]+),", printed).group(1))


def test_resume_trains_with_the_recipes_new_learning_rate_and_optimizer_settings(reference, data, tmp_path,
                                                                                   capsys):
    out = _killed_at(reference, "epoch-0002", tmp_path / "run")
    train(_recipe(data, lr=0.5, momentum=0.5, weight_decay=0.01), out, resume=True)
    printed = capsys.readouterr().out
    assert "lr: 0.05 -> 0.5; momentum: 0.9 -> 0.5; weight_decay: 0.0005 -> 0.01" in printed
    # Cosine over 3 epochs of 7 steps, no warm-up: the last step (20 of 21) at 0.5 (1 + cos(pi 20/21)) / 2.
    assert _last_lr(printed, "3/3") == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 21)) / 2, abs=6e-6)
    groups = checkpoints.read_state(out / "checkpoints" / "epoch-0003", "optimizer")["param_groups"]
    assert [(group["momentum"], group["weight_decay"]) for group in groups] == [(0.5, 0.01)] * len(groups)


def test_resume_with_another_batch_size_continues_the_schedule_in_epochs(reference, data, tmp_path, capsys):
    # 60 images: 7 steps an epoch at batch 8, 15 at batch 4. Two epochs done, the third at batch 4 ends at
    # step 44 of 45: 0.05 (1 + cos(pi 44/45)) / 2 (the saved step count, 14, would end at step 28 of 45).
    out = _killed_at(reference, "epoch-0002", tmp_path / "run")
    train(_recipe(data, batch_size=4), out, resume=True)
    assert _last_lr(capsys.readouterr().out, "3/3") == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 44 / 45)) / 2, abs=6e-6)


@pytest.mark.parametrize("checkpoint,position,enough", [
    ("epoch-0002", "2 epochs", 2), ("epoch-0001-step-000002", "1 epoch and 2 batches", 2)])
def test_resume_with_fewer_epochs_than_the_checkpoint_is_refused_and_touches_nothing(
        reference, data, tmp_path, checkpoint, position, enough):
    # Else the checkpoint's model, trained further, would be saved and reported as the 1-epoch run.
    out = _killed_at(reference, checkpoint, tmp_path / "run")
    before = folder_bytes(out)
    with pytest.raises(TrainingError, match=rf"with epochs 1: the checkpoint to resume from has trained "
                                            rf"{position}\. Resume with --epochs {enough} or more"):
        train(_recipe(data, epochs=1), out, resume=True)
    assert folder_bytes(out) == before


def test_every_model_setting_of_the_recipe_reaches_the_config_and_a_resume_keeps_it():
    # The recipe fields that are BalPoEConfig settings, listed here by hand.
    settings = {
        "backbone": "resnet20_cifar", "backbone_kwargs": {"drop_rate": 0.1}, "backbone_pretrained": False,
        "num_experts": 2, "lambdas": [0.5, -0.5], "shared_stages": 2, "classifier": "linear",
        "classifier_scale": 16.0, "image_size": 16, "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.3, 0.4], "loss": "balpoe", "lade_weight": 0.2, "lade_remine_lambda": 0.3,
        "remove_mean_lambda": False, "method": None,
    }
    assert set(recipes.CONFIG_FIELDS) == set(settings)
    config = recipes.make_recipe({"dataset": "x", **settings}).model_config([3, 2], ["a", "b"])
    assert {name: getattr(config, name) for name in settings} == settings
    assert (config.class_counts, config.id2label) == ([3, 2], {0: "a", 1: "b"})
    assert set(settings) <= set(resume.RESUME_FIELDS)


def test_each_experts_loss_is_reported_and_averages_to_the_loss(reference):
    results = json.loads((reference / "train_results.json").read_text())
    # The training loss is the mean of the three experts' losses, batch by batch.
    assert len(results["train_expert_losses"]) == 3
    assert sum(results["train_expert_losses"]) / 3 == pytest.approx(results["train_loss"], rel=1e-5)
    state = json.loads((reference / "checkpoints" / "epoch-0003" / checkpoints.TRAINER_STATE).read_text())
    assert state["train_expert_losses"] == results["train_expert_losses"]


def test_config_is_the_one_source_of_the_prior_and_the_lambdas(reference, tmp_path):
    from balpoe_hf import BalPoEForImageClassification

    config = json.loads((reference / "config.json").read_text())
    assert config["class_counts"] == TRAIN_COUNTS and config["lambdas"] == [1.0, 0.0, -1.0]
    # The weights hold no copy of them ...
    assert not [k for k in load_file(reference / "model.safetensors") if "log_prior" in k or "taus" in k]
    # ... and the loaded model's buffers are what config.json says, computed here by hand.
    model = BalPoEForImageClassification.from_pretrained(reference)
    log_prior = torch.log(torch.tensor(TRAIN_COUNTS, dtype=torch.float64) / sum(TRAIN_COUNTS))
    torch.testing.assert_close(model.loss_fn.log_prior.double(), log_prior)
    lambdas = torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
    torch.testing.assert_close(model.loss_fn.taus.double(), (1 - lambdas).expand(3, 4))
    # Editing config.json changes the model: there is no second source to disagree with it.
    edited = tmp_path / "edited"
    shutil.copytree(reference, edited, ignore=shutil.ignore_patterns("checkpoints"))
    (edited / "config.json").write_text(json.dumps({**config, "lambdas": [2.0, 0.0, -2.0]}))
    taus = BalPoEForImageClassification.from_pretrained(edited).loss_fn.taus
    torch.testing.assert_close(taus[:, 0], torch.tensor([-1.0, 1.0, 3.0]))


# --------------------------------------------------------------------------- a finished run (14.7)


def test_resume_of_a_finished_run_keeps_its_statistics(reference, data, tmp_path):
    out = tmp_path / "run"
    copy_run(reference, out)
    saved = (out / "train_results.json").read_bytes()
    result = train(_recipe(data), out, resume=True)
    assert (out / "train_results.json").read_bytes() == saved
    assert result.train_results == json.loads(saved)
    assert result.train_results["train_loss"] is not None and result.train_results["train_runtime"] > 0
    assert_same_weights(out, reference)


# --------------------------------------------------------------------------- no pickle in a checkpoint


class _Payload:
    """Unpickled, it creates the file ``marker``: what a malicious pickle in a run folder would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def legacy(data, tmp_path_factory) -> Path:
    """The reference run with the checkpoints of the previous release: accelerate's save_state, which
    pickles the scheduler (custom_checkpoint_0.pkl), the optimizer and the random states."""
    def legacy_save(accelerator, folder, objects):
        if not accelerator._custom_objects:
            accelerator.register_for_checkpointing(objects.scheduler)
        accelerator.save_state(str(folder))

    out = tmp_path_factory.mktemp("legacy") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "save_training_state", legacy_save)
        train(_recipe(data), out)
    return out


def test_a_checkpoint_holds_json_and_safetensors_only(reference):
    folder = reference / "checkpoints" / "epoch-0002-step-000004"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_0.json",
                     "scheduler.json", "trainer_state.json"]
    for name in names:
        head = (folder / name).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", name  # neither a pickle nor torch.save's zip


def test_checkpoint_of_the_previous_release_resumes_to_the_same_weights(legacy, reference, data, tmp_path):
    assert (legacy / "checkpoints" / "epoch-0002-step-000004" / "custom_checkpoint_0.pkl").is_file()
    out = _killed_at(legacy, "epoch-0002-step-000004", tmp_path / "run")
    train(_recipe(data), out, resume=True)
    assert_same_weights(out, reference)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl",
                                  "model.safetensors"])
def test_a_pickle_that_runs_code_in_a_checkpoint_of_the_previous_release_is_never_run(legacy, tmp_path, name):
    from accelerate import Accelerator

    folder = tmp_path / "epoch-0001"
    shutil.copytree(legacy / "checkpoints" / "epoch-0001", folder)
    marker = tmp_path / "payload-ran"
    _plant(folder / name, marker)
    with pytest.raises(Exception) as error:  # which error depends on the file
        checkpoints.load_training_state(Accelerator(cpu=True), folder, None)
    assert not marker.exists()
    if name.endswith((".pkl", ".bin")):
        assert isinstance(error.value, checkpoints.RefusedPickleError)
        assert f"{name} holds Python objects other than tensors and numbers" in str(error.value)


def test_a_pickle_beside_this_releases_checkpoint_is_never_read(reference, data, tmp_path):
    out = _killed_at(reference, "epoch-0002-step-000004", tmp_path / "run")
    marker = tmp_path / "payload-ran"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"):
        _plant(out / "checkpoints" / "epoch-0002-step-000004" / name, marker)
    train(_recipe(data), out, resume=True)
    assert not marker.exists()
    assert_same_weights(out, reference)


def test_resume_skips_a_checkpoint_whose_pickle_would_run_code_and_says_why(legacy, reference, data, tmp_path,
                                                                         capsys):
    # The sweep's case: a planted custom_checkpoint_0.pkl ran when resumed (accelerate loads it with
    # weights_only=False). Now it is refused, named, and the run goes on from the checkpoint before.
    out = _killed_at(legacy, "epoch-0002-step-000004", tmp_path / "run", extra=("epoch-0002-step-000001",))
    marker = tmp_path / "payload-ran"
    _plant(out / "checkpoints" / "epoch-0002-step-000004" / "custom_checkpoint_0.pkl", marker)
    train(_recipe(data), out, resume=True)
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert ("epoch-0002-step-000004, which cannot be loaded (custom_checkpoint_0.pkl holds Python objects "
            "other than tensors and numbers") in printed
    assert "resumed from" in printed and "epoch-0002-step-000001" in printed
    assert_same_weights(out, reference)


# --------------------------------------------------------------------------- the final save


MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "train_results.json",
               "eval_results.json")


@pytest.fixture(scope="module")
def extended(reference, data, tmp_path_factory) -> dict:
    """The finished reference run extended by an epoch (--resume --epochs 4), with copies of its folder as a
    kill -9 would have left it at every step of its saves (tests/conftest.py KillPoints)."""
    from conftest import KillPoints

    root = tmp_path_factory.mktemp("extended")
    out = root / "run"
    copy_run(reference, out)
    with pytest.MonkeyPatch.context() as patch:
        points = KillPoints(root / "kill-points", patch)
        (root / "kill-points").mkdir()
        snapshots = points.watch(out)
        train(_recipe(data, epochs=4, checkpoint_every_steps=0), out, resume=True)
    return {"old": reference, "new": out, "snapshots": snapshots}


def _model_state(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in MODEL_FILES if (folder / name).is_file()}


def test_a_kill_at_any_step_of_the_final_save_leaves_the_old_model_or_the_new_one(extended, tmp_path):
    old, new = _model_state(extended["old"]), _model_state(extended["new"])
    assert old["model.safetensors"] != new["model.safetensors"]
    # Before each rename of the resume's recipe save and of the final save (the journal, each file, the
    # manifest), and during the staged writes.
    assert len(extended["snapshots"]) >= len(MODEL_FILES) + 4
    outcomes = []
    for killed in extended["snapshots"]:
        snapshot = copy_run(killed, tmp_path / killed.name)
        run_folder.settle(snapshot, "test")  # what the next command does first
        state = _model_state(snapshot)
        assert state in (old, new), snapshot.name
        outcomes.append("new" if state == new else "old")
        assert not list(snapshot.glob(".balpoe-*")), snapshot.name
        # The next --resume or --overwrite proceeds: every file is listed with its content.
        resume.check_output_dir(snapshot, resume=True, overwrite=False)
        resume.check_output_dir(snapshot, resume=False, overwrite=True)
    assert "old" in outcomes and "new" in outcomes


def test_a_run_killed_during_its_final_save_resumes_to_the_model_it_was_saving(extended, data, tmp_path):
    # Killed after the commit of the final save, half of its files renamed: --resume finishes it.
    committed = [s for s in extended["snapshots"] if (s / run_folder.JOURNAL).is_file()]
    out = copy_run(committed[len(committed) // 2], tmp_path / "run")
    assert _model_state(out) not in (_model_state(extended["old"]), _model_state(extended["new"]))  # a mix
    from balpoe_hf import BalPoEForImageClassification

    with pytest.raises(OSError, match="interrupted half-way"):
        BalPoEForImageClassification.from_pretrained(out)
    train(_recipe(data, epochs=4, checkpoint_every_steps=0), out, resume=True)
    assert_same_weights(out, extended["new"])


def test_a_full_disk_during_the_final_save_replaces_nothing_and_says_so(reference, data, tmp_path,
                                                                       monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    out = tmp_path / "run"
    copy_run(reference, out)
    before = _model_state(out)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        # What safetensors raised when a small tmpfs filled up.
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(TrainingError, match=r"could not save the model into .*No space left on device "
                                            r".*\. The disk is full\. Nothing there was replaced"):
        train(_recipe(data, epochs=4, checkpoint_every_steps=0), out, resume=True)
    assert _model_state(out) == before and not list(out.glob(".balpoe-*"))
    monkeypatch.undo()
    train(_recipe(data, epochs=4, checkpoint_every_steps=0), out, resume=True)  # and the run goes on
    assert _model_state(out) != before


def test_a_damaged_save_journal_is_named_and_nothing_is_guessed(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / run_folder.JOURNAL).write_text('{"staging": ".balpoe-staging-x", "fi')  # not from us
    with pytest.raises(TrainingError, match=r"\.balpoe-save\.json is damaged .*delete it and the folders "
                                            r"named \.balpoe-staging-\* beside it"):
        run_folder.settle(tmp_path, "test")
    (tmp_path / run_folder.JOURNAL).write_text(json.dumps({"staging": "../../elsewhere", "files": [],
                                                           "manifest": {}}))
    with pytest.raises(TrainingError, match=r"names '\.\./\.\./elsewhere', which is not a file inside"):
        run_folder.settle(tmp_path, "test")
    assert (tmp_path / "config.json").read_text() == "{}"


# --------------------------------------------------------------------------- one writer, Ctrl-C


def test_a_second_writer_into_a_folder_is_refused_naming_the_owner_until_it_is_gone(data, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(TrainingError, match=rf"{out} is being written by balpoe-train \(pid {holder.pid} "
                                                r"on node7, since 2025-01-01 10:00:00\): one command at a"):
            train(_recipe(data, epochs=1), out)
        assert [p.name for p in out.iterdir()] == [run_folder.LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The owner was killed: its lock is stale (the system dropped the flock), and the next run takes it over.
    train(_recipe(data, epochs=1), out)
    assert (out / "model.safetensors").is_file() and not (out / run_folder.LOCK).exists()


def test_the_lock_is_one_per_folder_and_reentrant_in_a_process(tmp_path):
    with run_folder.output_lock(tmp_path / "a", "first"):
        with run_folder.output_lock(tmp_path / "a", "nested"), run_folder.output_lock(tmp_path / "b", "b"):
            pass
        assert json.loads((tmp_path / "a" / run_folder.LOCK).read_text())["command"] == "first"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # created empty, removed again


def test_ctrl_c_ends_training_with_one_line_and_the_run_resumes(data, tmp_path, monkeypatch, capsys):
    from balpoe_hf import cli
    from balpoe_hf.training import loop as training

    train_file, test_file = data
    out = tmp_path / "run"
    argv = ["--train-file", str(train_file), "--test-file", str(test_file), "--output-dir", str(out),
            *flags({**TINY_RUN, "epochs": 2, "checkpoint_every_steps": 0})]
    one_epoch = training.train_one_epoch

    def interrupted_in_the_second_epoch(run, state, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return one_epoch(run, state, epoch)

    monkeypatch.setattr(training, "train_one_epoch", interrupted_in_the_second_epoch)
    assert cli.train_main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    checkpoint = out / "checkpoints" / "epoch-0001"
    assert err.strip().splitlines()[-1] == ("interrupted; rerun with --resume to continue from its "
                                            f"checkpoint after epoch 1 ({checkpoint}).")
    assert not (out / run_folder.LOCK).exists()
    monkeypatch.undo()
    assert cli.train_main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


# --------------------------------------------------------------------------- the output directory


def test_output_directory_rules(tmp_path):
    resume.check_output_dir(tmp_path / "new", resume=False, overwrite=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"not empty\. Pass --resume .* --overwrite"):
        resume.check_output_dir(tmp_path / "old", resume=False, overwrite=False)
    # --resume and --overwrite act on a run's directory only (the tests below have the details).
    with pytest.raises(TrainingError, match="is not the directory of a balpoe-hf run"):
        resume.check_output_dir(tmp_path / "old", resume=True, overwrite=False)
    run_folder.record_outputs(tmp_path / "old", [tmp_path / "old" / "config.json"], resume.RUN_FOLDERS)
    resume.check_output_dir(tmp_path / "old", resume=True, overwrite=False)
    resume.check_output_dir(tmp_path / "old", resume=False, overwrite=True)


def test_another_process_write_test_does_not_make_the_output_directory_count_as_used(tmp_path, monkeypatch):
    """Every process of a multi-process run checks the output directory, write test included: one process's
    look inside, at the moment another's write-test file is there, still finds a new run's folder empty (a
    two-process launch was refused with "is not empty" once in a few tries before)."""
    out = tmp_path / "out"
    out.mkdir()
    real, seen = tempfile.NamedTemporaryFile, []

    def write_test_with_a_look_from_another_process(*args, **kwargs):
        handle = real(*args, **kwargs)
        if not seen:
            seen.append([path.name for path in out.iterdir()])
            resume.check_output_dir(out, resume=False, overwrite=False)
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", write_test_with_a_look_from_another_process)
    resume.check_output_dir(out, resume=False, overwrite=False)
    assert len(seen[0]) == 1  # the other process's write test was there
    assert list(out.iterdir()) == []


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    for epoch in (1, 2, 3, 10):
        path = checkpoints.checkpoint_dir(tmp_path, epoch)
        path.mkdir(parents=True)
        if epoch != 10:  # epoch 10 was being written when the run died
            (path / checkpoints.TRAINER_STATE).write_text(json.dumps({"epoch": epoch}))
    complete = checkpoints.completed_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    checkpoints.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003"]


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = folder_bytes(mine)
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(mine), "--overwrite"]
    assert cli.train_main(argv) == 2
    assert "is not the directory of a balpoe-hf run (it has no balpoe_outputs.json" in capsys.readouterr().err
    assert folder_bytes(mine) == before


def test_overwrite_deletes_only_what_the_run_wrote(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    copy_run(tiny_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    train_file, test_file = shutil.copy(tiny_data[0], out / "data"), shutil.copy(tiny_data[1], out / "data")
    # A report of the old model inside the run, listed by balpoe-evaluate: stale after the overwrite.
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text("{}")
    run_folder.record_outputs(out, [out / "eval" / "report.json"])
    kept = {"notes.txt": b"mine", "data/train.parquet": tiny_data[0].read_bytes(),
            "data/test.parquet": tiny_data[1].read_bytes()}

    training.train(tiny_recipe((Path(train_file), Path(test_file)), epochs=1), out, overwrite=True)
    after = folder_bytes(out)
    assert {name: after[name] for name in kept} == kept
    assert not (out / "eval").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]  # the old run's are gone
    assert json.loads((out / "train_results.json").read_text())["epochs"] == 1


def test_overwrite_never_deletes_an_input_or_an_edited_output(tiny_run, tmp_path):
    out = tmp_path / "run"
    copy_run(tiny_run, out)
    (out / "logs" / "train.parquet").parent.mkdir(exist_ok=True)
    (out / "logs" / "train.parquet").write_bytes(b"data")
    before = folder_bytes(out)
    with pytest.raises(TrainingError, match=r"--overwrite would delete .*logs, which holds the input "
                                            r".*train\.parquet.*\(nothing was deleted\)"):
        resume.check_output_dir(out, resume=False, overwrite=True,
                                     inputs=[out / "logs" / "train.parquet"])
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "# my notes\n")
    with pytest.raises(TrainingError, match=r"--overwrite would delete \['recipe.yaml'\] .* changed since "
                                            r"balpoe-hf wrote them"):
        resume.check_output_dir(out, resume=False, overwrite=True)
    assert {k: v for k, v in folder_bytes(out).items() if k != "recipe.yaml"} == \
        {k: v for k, v in before.items() if k != "recipe.yaml"}


def test_resume_on_a_folder_that_is_not_a_run_refuses_and_touches_nothing(tiny_data, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "checkpoints" / "drafts").mkdir(parents=True)
    (mine / "checkpoints" / "drafts" / "notes.txt").write_text("years of work")
    (mine / "recipe.yaml").write_text("my: settings\n")
    (mine / "config.json").write_text("{}")
    before = folder_bytes(mine)
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(mine), "--resume"]
    assert cli.train_main(argv) == 2
    assert "is not the directory of a balpoe-hf run (it has no balpoe_outputs.json listing what a run " \
           "wrote, nor a checkpoint of one in checkpoints/), so --resume will not touch it" in \
           capsys.readouterr().err
    assert folder_bytes(mine) == before


def test_resume_never_writes_over_a_file_the_run_did_not_write(tiny_run, tmp_path):
    out = tmp_path / "run"
    copy_run(tiny_run, out)
    resume.check_output_dir(out, resume=True, overwrite=False)  # the run's own files: fine
    (out / "holdout_results.json").write_text('{"mine": true}')  # a name the run writes, not written by it
    with pytest.raises(TrainingError, match=r"--resume would write over \['holdout_results.json'\] in .*, "
                                            r"which balpoe-hf did not write there .*\(nothing was written\)"):
        resume.check_output_dir(out, resume=True, overwrite=False)
    with pytest.raises(TrainingError, match=r"--overwrite would write over \['holdout_results.json'\]"):
        resume.check_output_dir(out, resume=False, overwrite=True)
    (out / "holdout_results.json").unlink()
    (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # edited since
    with pytest.raises(TrainingError, match=r"--resume would write over \['config.json'\]"):
        resume.check_output_dir(out, resume=True, overwrite=False)


@pytest.mark.usefixtures("data_load_refused")
def test_output_dir_that_takes_no_files_is_refused_before_the_data_load(tiny_data, tmp_path, capsys,
                                                                        monkeypatch):
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target"]
    (tmp_path / "a-file").write_text("")
    assert cli.train_main([*argv, "--output-dir", str(tmp_path / "a-file" / "run")]) == 2
    assert f"cannot write --output-dir {tmp_path / 'a-file' / 'run'}: {tmp_path / 'a-file'} is a file" in \
        capsys.readouterr().err

    def read_only(*args, **kwargs):  # what a folder without write permission answers (tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", read_only)
    assert cli.train_main([*argv, "--output-dir", str(tmp_path / "locked" / "run")]) == 2
    assert f"{tmp_path} does not take new files (Permission denied); choose a folder you can write to" in \
        capsys.readouterr().err
    assert not (tmp_path / "locked").exists()


def test_a_run_resumes_in_the_other_memory_layout(reference, data, tmp_path, capsys):
    # The CIFAR recipes train channels_last since a release: a run started in the default layout resumes in
    # NHWC, with the momentum of its checkpoint (a momentum buffer read in the wrong layout moved these
    # weights by up to 2e-2, as much as the whole last epoch did).
    out = _killed_at(reference, "epoch-0002", tmp_path / "run")
    train(_recipe(data, channels_last=True), out, resume=True)
    assert "channels_last: False -> True" in capsys.readouterr().out
    expected, got = (load_file(folder / "model.safetensors") for folder in (reference, out))
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        # The last epoch's 7 steps in other convolution kernels: other rounding (measured up to 2e-5).
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        assert got[name].is_contiguous(), name


def test_an_epoch_checkpoint_resumes_on_more_processes_and_a_step_checkpoint_is_refused(reference, data):
    # Each process saves its own random-number states; a process the saving run did not have finds none.
    # At the end of an epoch none is needed (each epoch seeds itself); inside one they would be.
    second = SimpleNamespace(process_index=1, scaler=None, device=torch.device("cpu"))
    states = checkpoints._read_training_state(second, reference / "checkpoints" / "epoch-0002")
    assert states["rng"] is None and states["optimizer"]["state"]
    step = reference / "checkpoints" / "epoch-0001-step-000002"
    saved = json.loads((step / checkpoints.TRAINER_STATE).read_text())
    assert saved["num_processes"] == 1
    with pytest.raises(TrainingError, match=r"processes: 1 -> 2 \(a step checkpoint resumes with the "
                                            r"processes that saved it"):
        resume.check_resume(reference, _recipe(data), saved, saved["model"], saved["batches_per_epoch"], 2)
    assert resume.check_resume(reference, _recipe(data), saved, saved["model"], saved["batches_per_epoch"],
                               1) == []
