"""balpoe_hf.evaluation and scripts/evaluate.py end to end on a tiny saved model and parquet test set."""

import errno
import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from helpers import folder_bytes
from PIL import Image
from processes import hold_lock
from safetensors.torch import load_file, save_file

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, build_image_processor, cli, run_folder
from balpoe_hf.data.loading import align_labels
from balpoe_hf.errors import DataError, EvaluationError
from balpoe_hf.evaluation import calibrate, model_loading, printing, reports, shifts, upgrade
from balpoe_hf.evaluation import evaluate as evaluation
from balpoe_hf.training import resume

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
PER_CLASS = 50  # the smallest test set on which backward50 / forward50 keep one image of the tail class
TRAIN_COUNTS = [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]  # IR100 profile: many / medium / few all present
NAMES = [f"class {c}" for c in range(NUM_CLASSES)]


def _load_script():
    spec = importlib.util.spec_from_file_location("balpoe_evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved tiny model (ResNet-20 on 8x8 images) with its image processor, like a scripts/train.py run."""
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, lambdas=[1.0, 0.0, -1.0],
                          class_counts=TRAIN_COUNTS, id2label=dict(enumerate(NAMES)), image_size=8,
                          image_mean=[0.5] * 3, image_std=[0.25] * 3)
    model = BalPoEForImageClassification(config).eval()
    path = tmp_path_factory.mktemp("run")
    model.save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    """A balanced parquet test set: 50 random 8x8 RGB images per class, class names as a ClassLabel."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=NAMES)})
    path = tmp_path_factory.mktemp("data") / "test.parquet"
    datasets.Dataset.from_dict({"img": images, "fine": labels}, features=features).to_parquet(path)
    return path


def _forward_size(ratio):
    """Images kept by a forward (or backward) set of ratio r: int(50 * r ** (-k / 9)) for ranks k = 0..9."""
    return sum(int(PER_CLASS * ratio ** (-k / (NUM_CLASSES - 1))) for k in range(NUM_CLASSES))


def test_end_to_end_runs_the_model_once_and_writes_report_and_plots(run_dir, test_file, tmp_path, capsys,
                                                                       monkeypatch):
    seen = []
    forward = BalPoEForImageClassification.forward

    def counting_forward(self, pixel_values, *args, **kwargs):
        seen.append(pixel_values.shape[0])
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(BalPoEForImageClassification, "forward", counting_forward)
    output = tmp_path / "eval" / "report.json"
    code = script.main(["--model", str(run_dir), "--test-file", str(test_file), "--image-column", "img",
                        "--label-column", "fine", "--shifts", "all", "--prior", "none,oracle,em",
                        "--output", str(output), "--batch-size", "128"])
    assert code == 0
    assert sum(seen) == NUM_CLASSES * PER_CLASS  # one pass over the balanced set, whatever the shifts

    printed = capsys.readouterr().out
    assert printed.index("Balanced test set (500 images") < printed.index("| prior")
    header = next(line for line in printed.splitlines() if line.startswith("| prior"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == ["forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
                       "backward2", "backward5", "backward10", "backward25", "backward50"]
    for mode in ("none", "oracle", "em"):
        assert any(line.startswith(f"| {mode} |") for line in printed.splitlines())

    report = json.loads(output.read_text())
    # The report may be published: it names the model's folder and the test file, not where they lie.
    assert (report["model"], report["dataset"]) == (run_dir.name, test_file.name)
    assert str(tmp_path) not in output.read_text() and str(run_dir.parent) not in output.read_text()
    assert set(report["balanced"]) == {"accuracy", "balanced_accuracy", "per_class_accuracy", "many",
                                       "medium", "few", "ece", "mce", "nll", "brier"}
    assert report["num_test_samples"] == 500
    assert report["train_counts"] == TRAIN_COUNTS
    assert [e["lambda"] for e in report["experts"]] == [1.0, 0.0, -1.0]
    shifts = report["shifts"]
    assert shifts["uniform"]["num_samples"] == 500
    for ratio in (50, 25, 10, 5, 2):
        assert shifts[f"forward{ratio}"]["num_samples"] == _forward_size(ratio)
        assert shifts[f"backward{ratio}"]["num_samples"] == _forward_size(ratio)
    # Forward50 keeps 50 images of the most frequent training class and one of the rarest.
    forward50 = np.asarray(shifts["forward50"]["test_prior"]) * shifts["forward50"]["num_samples"]
    assert forward50[0] == pytest.approx(50) and forward50[-1] == pytest.approx(1)
    assert shifts["backward50"]["test_prior"] == shifts["forward50"]["test_prior"][::-1]
    for mode, row in report["shift_accuracy"].items():
        for shift, accuracy in row.items():
            assert accuracy == shifts[shift]["reports"][mode]["accuracy"]
    # The uniform set is the balanced set: prior none gives the balanced report again.
    assert shifts["uniform"]["reports"]["none"]["accuracy"] == report["balanced"]["accuracy"]
    # The error is the total variation distance between the estimated and the true prior.
    em = shifts["forward50"]["estimates"]["em"]
    true_prior = np.asarray(shifts["forward50"]["test_prior"])
    assert em["error"] == pytest.approx(0.5 * np.abs(np.asarray(em["prior"]) - true_prior).sum())
    # Plain EM predicts with its estimate (auto's prior is an adjustment, scaled by a temperature).
    assert (em["estimate"], em["estimate_error"]) == (em["prior"], em["error"])
    for name in report["images"].values():
        png = output.parent / name
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000


def test_adapt_to_unlabeled_on_a_dataset_estimates_from_unlabelled_images(run_dir, test_file):
    model, processor = model_loading.load_model(str(run_dir), "cpu")
    ds = datasets.Dataset.from_parquet(str(test_file))
    rows = shifts.shifted_rows(np.asarray(ds["fine"]), TRAIN_COUNTS, "forward10", seed=0)
    unlabelled = ds.select(rows).remove_columns("fine")  # the labels are not needed
    pixel_values = processor(images=unlabelled[:]["img"], return_tensors="pt")["pixel_values"]
    estimate = model.adapt_to_unlabeled(pixel_values, method="em", set_prior=False)
    assert model.config.target_prior is None  # set_prior=False leaves the model alone
    # EM's fixed point (Saerens et al. 2002): with q_i the posteriors of the uniform-prior logits,
    # p = mean_i q_i * p / <q_i, p>.
    logits, _ = evaluation.predict(model, processor, unlabelled, "img")
    weighted = torch.softmax(logits.double(), dim=1) * estimate.prior.double()
    torch.testing.assert_close((weighted / weighted.sum(1, keepdim=True)).mean(0), estimate.prior.double(),
                               rtol=0, atol=1e-5)
    again = model.adapt_to_unlabeled(pixel_values, method="em")
    torch.testing.assert_close(again.prior, estimate.prior)
    # The model now predicts for that prior: its logits are the uniform-prior ones plus log(C * p).
    assert model.config.target_prior == pytest.approx(estimate.prior.tolist())
    with torch.no_grad():
        shifted = model(pixel_values=pixel_values[:4]).logits.double()
        uniform = model(pixel_values=pixel_values[:4], target_prior="uniform").logits.double()
    expected = uniform + torch.log(NUM_CLASSES * estimate.prior.double())
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-5)


def test_a_stream_of_one_batch_as_large_as_the_set_is_the_full_set(run_dir, test_file):
    # A single batch holding every image of a shifted set (drawn without replacement) is that set: the
    # stream's gain over none after it is the full set's, computed by evaluate_shifts on another path.
    model, processor = model_loading.load_model(str(run_dir), "cpu")
    ds = datasets.Dataset.from_parquet(str(test_file))
    logits, _ = evaluation.predict(model, processor, ds, "img")
    labels = np.asarray(ds["fine"])
    size = len(shifts.shifted_rows(labels, TRAIN_COUNTS, "forward10", seed=0))
    stream = evaluation.stream_batches(logits, labels, TRAIN_COUNTS, ["forward10"], ["none", "oracle", "em"],
                                       size, batches=1, draws=2)
    full = evaluation.evaluate_shifts(logits, labels, TRAIN_COUNTS, ["forward10"], ["none", "oracle", "em"])
    reports = full["forward10"]["reports"]
    for mode in ("oracle", "em"):
        gain = reports[mode]["accuracy"] - reports["none"]["accuracy"]
        assert stream["shifts"]["forward10"][mode] == pytest.approx([gain], abs=1e-9)
    assert stream["batch_size"] == size and "drift" not in stream  # forward50 is smaller than the batch
    small = evaluation.stream_batches(logits, labels, TRAIN_COUNTS, ["uniform"], ["none", "auto"], 20,
                                      batches=3, draws=2)
    assert len(small["shifts"]["uniform"]["auto"]) == 3
    assert small["drift"]["schedule"] == [["forward50", 5], ["backward50", 10]]
    assert len(small["drift"]["gains"]["auto"]) == 15 and small["drift"]["forgetting"] == 0.5
    assert "drift (5 batches of forward50" in printing.format_stream_table(small)


def test_prior_modes_from_cached_logits_match_the_model_run_with_that_prior(run_dir, test_file):
    model, processor = model_loading.load_model(str(run_dir), "cpu")
    ds = datasets.Dataset.from_parquet(str(test_file))
    uniform_logits, _ = evaluation.predict(model, processor, ds, "img", 64)
    labels = np.asarray(ds["fine"])
    rows = shifts.shifted_rows(labels, TRAIN_COUNTS, "forward10", seed=0)
    prior = torch.from_numpy(np.bincount(labels[rows], minlength=NUM_CLASSES) / len(rows))
    derived = shifts.with_target_prior(uniform_logits[rows], prior)
    images = list(ds.select(rows)["img"])
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model(pixel_values=pixel_values, target_prior=prior.tolist()).logits
    # Logits may differ by a constant per row; the probabilities must agree.
    torch.testing.assert_close(torch.softmax(derived, 1).float(), torch.softmax(direct, 1),
                               atol=1e-5, rtol=1e-4)


def test_dataset_and_columns_come_from_the_runs_recipe(run_dir, test_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for file in run_dir.iterdir():
        (run / file.name).write_bytes(file.read_bytes())
    (run / "recipe.yaml").write_text(f"test_file: ['{test_file}']\nimage_column: img\nlabel_column: fine\n")
    assert script.main(["--model", str(run), "--shifts", "forward10,backward10", "--prior", "none"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-2].startswith("|---|") and table[-1].startswith("| none |")


def test_labels_are_matched_to_the_model_by_class_name():
    # An imagefolder numbers classes alphabetically; the model's order differs.
    features = datasets.Features({"label": datasets.ClassLabel(names=["b", "c", "a"])})
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2, 2]}, features=features)
    labels = align_labels(ds, "label", ["a", "b", "c"])
    assert labels.tolist() == [1, 2, 0, 0]
    with pytest.raises(DataError, match="not classes of the model"):
        align_labels(ds, "label", ["a", "b", "z"])
    # A model saved with the Hub copy's spelling of Fashion-MNIST's first class, tested on Zalando's names
    # (the Debian files): the same class in another order is found by name, spaces aside.
    zalando = datasets.Features({"label": datasets.ClassLabel(names=["Trouser", "T-shirt/top"])})
    test = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=zalando)
    assert align_labels(test, "label", ["T - shirt / top", "Trouser"]).tolist() == [1, 0, 0]


def test_hub_dataset_while_offline_says_how_to_use_local_files(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert script.main(["--model", str(run_dir), "--dataset", "someone/cifar100-lt"]) == 2
    error = capsys.readouterr().err
    assert "offline" in error and "--test-file" in error and "fashion-mnist" in error


@pytest.mark.parametrize(("argv", "message"), [
    (["--shifts", "sideways10"], "unknown shifts"),
    (["--prior", "none,guess"], "unknown prior modes"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32) (numpy's seeds), got 4294967296"),
])
def test_bad_arguments_are_named(run_dir, test_file, capsys, argv, message):
    assert script.main(["--model", str(run_dir), "--test-file", str(test_file), *argv]) == 2
    assert message in capsys.readouterr().err


def test_shot_thresholds_default_to_those_of_the_run(run_dir, test_file, tmp_path):
    import shutil

    test = datasets.Dataset.from_parquet(str(test_file))
    options = {"image_column": "img", "label_column": "fine", "shifts": ["uniform"], "priors": ["none"]}
    model, processor = model_loading.load_model(run_dir)  # saved without a recipe: CIFAR-100-LT's 100 / 20
    assert evaluation.evaluate_model(model, processor, test, **options).report["settings"]["many"] == 100
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "recipe.yaml").write_text("many_threshold: 200\nfew_threshold: 10\n")
    model, processor = model_loading.load_model(run)
    report = evaluation.evaluate_model(model, processor, test, **options).report
    assert (report["settings"]["many"], report["settings"]["few"]) == (200, 10)
    # Training counts 500, 299, ..., 8, 5: many-shot (> 200) are classes 0 and 1, few-shot (< 10) 8 and 9.
    per_class = report["balanced"]["per_class_accuracy"]
    assert report["balanced"]["many"] == pytest.approx(np.mean(per_class[:2]))
    assert report["balanced"]["few"] == pytest.approx(np.mean(per_class[8:]))
    # A caller's thresholds win over the run's.
    report = evaluation.evaluate_model(model, processor, test, many=50, **options).report
    assert (report["settings"]["many"], report["settings"]["few"]) == (50, 10)
    # The command line reads a local run's recipe.yaml itself, and leaves a Hub id's to evaluate_model
    # (which reads the recipe.yaml published beside the weights) instead of the package's defaults.
    args = cli.evaluate.parse_evaluate_args(["--model", str(run)])
    assert (args.many, args.few) == (200, 10)
    args = cli.evaluate.parse_evaluate_args(["--model", "me/balpoe-cifar10-lt"])
    assert (args.many, args.few) == (None, None)


# --------------------------------------------------------------------------- what loading refuses


def _edited_copy(run_dir: Path, target: Path, edit) -> Path:
    shutil.copytree(run_dir, target)
    edit(target)
    return target


def _nan_weight(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[3]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _pickle_weights_only(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _edit_json(name: str, **changes):
    def edit(folder: Path) -> None:
        values = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**values, **changes}))
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_nan_weight, r"weights in .* hold NaN or infinite values \(in \['.*'\]\): the training diverged"),
    (_pickle_weights_only, r"has no model\.safetensors, only the pickle weights \['pytorch_model\.bin'\], "
                           r"which balpoe-hf does not load \(unpickling a file can run code\)"),
    (_edit_json("config.json", id2label={str(i if i < 9 else 10): name for i, name in enumerate(NAMES)}),
     r"id2label must name the classes 0 to 9 without a gap .* got the ids \[0, 1, 2, 3, 4, 5, 6, 7, 8, 10\]"),
    (_edit_json("preprocessor_config.json", do_normalize=False),
     r"image processor of .* does not fit its config\.json: it scales and normalises pixels otherwise than "
     r"the config's image_mean \[0\.5, 0\.5, 0\.5\]"),
    (_edit_json("preprocessor_config.json", size={"height": 16, "width": 16}),
     r"does not fit its config\.json: it makes \(16, 16\) images, the config's image_size is 8"),
])
def test_load_refuses_what_a_hand_edit_or_a_diverged_run_leaves(run_dir, test_file, tmp_path, capsys, edit,
                                                                 message):
    model = _edited_copy(run_dir, tmp_path / "model", edit)
    with pytest.raises(EvaluationError, match=message):
        model_loading.load_model(model)
    assert script.main(["--model", str(model), "--test-file", str(test_file)]) == 2
    err = capsys.readouterr().err  # transformers' progress bars, then the error in one line
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")


def test_deployment_batches_smaller_than_the_classes_are_refused_before_the_inference(run_dir, test_file,
                                                                                      capsys, monkeypatch):
    # A batch of one image: its 'oracle' prior is its own label, a +33-point "gain" that means nothing.
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: pytest.fail("ran the inference"))
    assert script.main(["--model", str(run_dir), "--test-file", str(test_file), "--deployment-sizes",
                        "1,100"]) == 2
    assert ("deployment batches must hold at least as many images as the model has classes (10), and "
            "--deployment-draws must be positive; got sizes [1, 100]") in capsys.readouterr().err


# --------------------------------------------------------------------------- writing: kills, locks, Ctrl-C


EVALUATE = ["--image-column", "img", "--label-column", "fine", "--shifts", "uniform,backward5", "--prior",
            "none,oracle,em"]


def test_a_kill_at_any_step_of_writing_a_report_leaves_none_or_all_and_the_rerun_proceeds(
        run_dir, test_file, tmp_path, kill_points, capsys):
    output = tmp_path / "reports" / "report.json"
    snapshots = kill_points.watch(tmp_path / "reports")
    assert script.main(["--model", str(run_dir), "--test-file", str(test_file), *EVALUATE, "--output",
                        str(output)]) == 0
    capsys.readouterr()
    written = {p.name: p.read_bytes() for p in output.parent.glob("report*")}
    assert len(written) == 3 and len(snapshots) >= 5
    outcomes = set()
    for snapshot in snapshots:
        run_folder.settle(snapshot, "test")
        files = {p.name: p.read_bytes() for p in snapshot.glob("report*")}
        assert files in ({}, written), snapshot.name
        outcomes.add(bool(files))
        reports.check_output(snapshot / "report.json")  # the rerun would replace it: it is ours
    assert outcomes == {False, True}


def test_evaluate_output_into_a_folder_another_command_writes_is_refused(run_dir, test_file, tmp_path,
                                                                         capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: pytest.fail("ran the inference"))
    holder = hold_lock(tmp_path / "busy")
    try:
        assert script.main(["--model", str(run_dir), "--test-file", str(test_file), "--output",
                            str(tmp_path / "busy" / "report.json")]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"is being written by balpoe-train (pid {holder.pid} on node7" in capsys.readouterr().err


def test_ctrl_c_ends_evaluate_with_one_line_and_writes_nothing(run_dir, test_file, tmp_path, capsys,
                                                              monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "predict", interrupted)
    assert script.main(["--model", str(run_dir), "--test-file", str(test_file), *EVALUATE, "--output",
                        str(tmp_path / "out" / "report.json")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; nothing was written."
    assert not (tmp_path / "out").exists()


# An earlier release's per-model estimator choice in config.json, which --upgrade drops.
LEGACY_CHOICE = {"name": "em-bcts-gain", "settings": {"method": "em", "calibration": "bcts"}}


@pytest.fixture(scope="module")
def holdout_run(tiny_data, tmp_path_factory) -> Path:
    """A run trained with a held-out split (1 epoch on the tiny data), saved as an earlier release saved it:
    its per-model estimator choice in the config, a calibration without the biases' covariance. What
    --upgrade is for."""
    from helpers import tiny_recipe

    from balpoe_hf.training import loop as training

    root = tmp_path_factory.mktemp("holdout_run")
    recipe = tiny_recipe(tiny_data, holdout_fraction=0.5, epochs=1, lr=0.02, many_threshold=10,
                         few_threshold=3)
    torch.set_num_threads(1)
    training.train(recipe, root / "run")
    config = json.loads((root / "run" / "config.json").read_text())
    calibration = {key: value for key, value in config["calibration"].items()
                   if key not in ("bias_se", "bias_cov_factor")}
    (root / "run" / "config.json").write_text(json.dumps({**config, "shift_estimator": LEGACY_CHOICE,
                                                          "calibration": calibration}))
    run_folder.record_outputs(root / "run", [root / "run" / "config.json"])
    return root / "run"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_kill_at_any_step_of_an_upgrade_leaves_a_loadable_model(holdout_run, tmp_path, kill_points):
    # The sweep's case: killed while the upgrade rewrote config.json in place, it was left empty.
    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    old = (run / "config.json").read_bytes()
    snapshots = kill_points.watch(run)
    done = upgrade.upgrade_model(run, device="cpu")
    new = (run / "config.json").read_bytes()
    assert done["recalibrated"] and done["dropped_choice"] == "em-bcts-gain"
    assert "bias_cov_factor" in json.loads(new)["calibration"] and len(snapshots) >= 5
    outcomes = set()
    for snapshot in snapshots:
        model, _ = model_loading.load_model(snapshot)  # finishes or undoes the save first
        config = (snapshot / "config.json").read_bytes()
        assert config in (old, new), snapshot.name
        outcomes.add(config == new)
        assert model.config.shift_estimator == (None if config == new else LEGACY_CHOICE)
        assert not list(snapshot.glob(".balpoe-*")), snapshot.name  # no journal, no staging folder left
        resume.check_output_dir(snapshot, resume=True, overwrite=False)
    assert outcomes == {False, True}
    # Killed while the staged files were half-written: the rerun upgrades the old folder as the first did.
    cut = next(snapshot for snapshot in snapshots if snapshot.name.endswith("staging-cut"))
    assert (cut / "config.json").read_bytes() == old
    upgrade.upgrade_model(cut, device="cpu")
    assert (cut / "config.json").read_bytes() == new


def test_a_full_disk_during_an_upgrade_replaces_nothing(holdout_run, tmp_path, monkeypatch):
    import transformers.modeling_utils

    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    before = _files(run)

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    message = (r"could not save the upgraded model into .*No space left on device\. The disk is full\. "
               r"Nothing there was replaced")
    with pytest.raises(EvaluationError, match=message):
        upgrade.upgrade_model(run, device="cpu")
    assert _files(run) == before and not list(run.glob(".balpoe*"))
    with pytest.raises(EvaluationError, match=message):  # into a new folder: none is left behind
        upgrade.upgrade_model(run, tmp_path / "upgraded", device="cpu")
    assert not (tmp_path / "upgraded").exists()


@pytest.mark.parametrize("into", [False, True])
def test_an_upgrade_of_a_folder_another_command_writes_is_refused(holdout_run, tmp_path, capsys,
                                                                  monkeypatch, into):
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: pytest.fail("ran the inference"))
    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    before = _files(run)
    busy = tmp_path / "upgraded" if into else run
    holder = hold_lock(busy)
    try:
        assert script.main(["--model", str(run), "--upgrade",
                            *(["--upgrade-into", str(busy)] if into else [])]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"is being written by balpoe-train (pid {holder.pid} on node7" in capsys.readouterr().err
    assert {name: data for name, data in _files(run).items() if name != ".balpoe.lock"} == before


def test_ctrl_c_during_an_upgrade_ends_with_one_line_and_replaces_nothing(holdout_run, tmp_path, capsys,
                                                                          monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(holdout_run, run)
    before = _files(run)
    real_predict, calls = evaluation.predict, []

    def predict(*args, **kwargs):
        calls.append(1)
        if len(calls) == which:
            raise KeyboardInterrupt
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", predict)
    monkeypatch.setattr(calibrate, "predict", predict)  # the upgrade's inference on the held-out split
    which = 1  # on the held-out split, before anything is saved
    assert script.main(["--model", str(run), "--upgrade", "--shifts", "uniform", "--prior", "none,auto",
                        "--output", str(run / "eval" / "report.json")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; nothing was written."
    assert _files(run) == before and not list(run.glob(".balpoe*")) and not (run / "eval").exists()
    calls.clear()
    which = 2  # on the test set, after the upgrade was saved
    assert script.main(["--model", str(run), "--upgrade", "--shifts", "uniform", "--prior", "none,auto",
                        "--output", str(run / "eval" / "report.json")]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"interrupted; the upgraded model is saved in {run}; no report "
                                            "was written.")
    assert BalPoEForImageClassification.from_pretrained(run).config.shift_estimator is None
    assert not (run / "eval" / "report.json").exists()


# --------------------------------------------------------------------------- checks before the inference


@pytest.fixture
def no_inference(monkeypatch):
    def predict(*args, **kwargs):
        raise AssertionError("the inference ran")

    monkeypatch.setattr(evaluation, "predict", predict)


def test_evaluate_checks_the_output_before_the_inference(tiny_run, tmp_path, no_inference, capsys):
    (tmp_path / "a-file").write_text("")
    argv = ["--model", str(tiny_run), "--output", str(tmp_path / "a-file" / "report.json"), "--device", "cpu"]
    assert cli.evaluate_main(argv) == 2
    a_file = tmp_path / "a-file"
    assert f"cannot write --output into {a_file}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert cli.evaluate_main([*argv[:2], "--output", str(tmp_path), "--device", "cpu"]) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err


def test_evaluate_checks_the_shifts_before_the_inference(tiny_run, no_inference, capsys):
    # 8 test images per class: backward50 would keep int(8 / 50) = 0 images of the most frequent class.
    assert cli.evaluate_main(["--model", str(tiny_run), "--shifts", "uniform,backward50", "--device",
                              "cpu"]) == 2
    assert "cannot build the backward50 test set" in capsys.readouterr().err


def test_truncated_weights_are_named(tiny_run, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(EvaluationError, match=r"the weights in .* cannot be read .*truncated or "
                                                         r"damaged; save the model again"):
        model_loading.load_model(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused_before_loading(tiny_run, no_inference, capsys):
    assert cli.evaluate_main(["--model", str(tiny_run), "--device", "cuda"]) == 2
    assert "--device cuda, but torch sees no CUDA GPU here" in capsys.readouterr().err
    assert cli.evaluate_main(["--model", str(tiny_run), "--device", "gpu0"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err


def test_evaluate_output_replaces_only_reports_balpoe_evaluate_wrote(tiny_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_run, model, ignore=shutil.ignore_patterns("checkpoints"))
    before = folder_bytes(model)
    argv = ["--model", str(model), "--shifts", "uniform", "--prior", "none", "--device", "cpu", "--output"]
    for target in ("model.safetensors", "config.json", "recipe.yaml"):
        assert cli.evaluate_main([*argv, str(model / target)]) == 2
        assert f"would replace ['{model / target}'], which balpoe-evaluate did not write" in \
            capsys.readouterr().err
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "r_reliability.png").write_bytes(b"my picture")
    assert cli.evaluate_main([*argv, str(reports / "r.json")]) == 2
    assert f"would replace ['{reports / 'r_reliability.png'}']" in capsys.readouterr().err
    assert folder_bytes(model) == before and (reports / "r_reliability.png").read_bytes() == b"my picture"
    # Its own reports: listed as balpoe-evaluate's (beside them, or in the run's manifest), replaced again.
    for output, owner in ((reports / "s.json", reports), (model / "eval" / "report.json", model)):
        assert cli.evaluate_main([*argv, str(output)]) == 0
        assert cli.evaluate_main([*argv, str(output)]) == 0
        manifest = run_folder.read_manifest(owner)
        assert output.relative_to(owner).as_posix() in manifest["reports"]
    assert "model.safetensors" not in run_folder.read_manifest(model)["reports"]
    capsys.readouterr()


def test_evaluate_refuses_weights_that_do_not_fit_their_config(tiny_run, tmp_path, capsys, no_inference):
    model = tmp_path / "model"
    shutil.copytree(tiny_run, model, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((model / "config.json").read_text())
    argv = ["--model", str(model), "--device", "cpu"]
    for changes, message in [
            ({"num_experts": 4, "lambdas": [1.0, 0.5, 0.0, -1.5]}, "do not fit the model its config.json "
                                                                   "describes (num_experts 4, 4 classes"),
            ({"num_experts": 2, "lambdas": [1.0, -1.0]}, "do not fit the model its config.json describes"),
            ({"lambdas": [1.0, 0.0]}, "is not a valid BalPoE config: lambdas has 2 entries but there are 3"),
            ({"class_counts": [32, 16, 8]}, "class_counts has 3 entries but the model has 4 classes")]:
        (model / "config.json").write_text(json.dumps({**config, **changes}))
        assert cli.evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "MISSING" not in err, err  # no transformers load report either
    (model / "config.json").unlink()
    assert cli.evaluate_main(argv) == 2
    assert f"{model} has no config.json: a BalPoE model folder holds its config beside the weights" in \
        capsys.readouterr().err
    (model / "config.json").write_text(json.dumps(config))
    (model / "recipe.yaml").write_text("epochs: [\n")
    assert cli.evaluate_main(argv) == 2
    assert f"cannot parse the recipe file {model / 'recipe.yaml'}" in capsys.readouterr().err


def test_test_set_without_a_class_is_named_in_a_warning(tiny_run, tiny_data, tmp_path, capsys):
    ds = datasets.load_dataset("parquet", data_files=str(tiny_data[1]), split="train")
    without = tmp_path / "test.parquet"
    ds.filter(lambda row: row["target"] != 2).to_parquet(without)
    assert cli.evaluate_main(["--model", str(tiny_run), "--test-file", str(without), "--shifts", "uniform",
                              "--prior", "none", "--device", "cpu", "--output",
                              str(tmp_path / "report.json")]) == 0
    assert "warning: the test set has no image of classes [2]: balanced accuracy and the many / medium / " \
           "few-shot accuracies average over the 3 of 4 classes it has." in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes_without_test_images"] == [2]
    assert report["balanced"]["per_class_accuracy"][2] is None
