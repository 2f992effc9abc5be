"""Publishing to the Hub, offline: what push_to_hub uploads and how it loads back, what it refuses before
anything is written or sent, and what it never publishes (files outside the run, edited or foreign reports,
a card it did not write), also when killed or out of disk space.

The only mocks are HfApi.create_repo and HfApi.create_commit (the network boundary): tests/hub_helpers.py.
"""

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import folder_bytes
from hub_helpers import (
    CONFIG,
    COUNTS,
    metrics_by_name,
    mock_hub,
    pixels_of,
    push_script,
    record_report,
    snapshot,
)
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from train_synthetic import CLASS_NAMES, TRAIN_COUNTS

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, build_image_processor, cli, hub, run_folder
from balpoe_hf.errors import HubFolderError, HubPublishError


@pytest.fixture
def fake_hub(monkeypatch):
    return mock_hub(monkeypatch)


def test_push_uploads_exactly_the_publishable_files(hub_snapshot, saved_run):
    run, _ = saved_run
    calls = hub_snapshot["calls"]
    assert hub_snapshot["url"] == "https://huggingface.co/me/tiny-balpoe"
    assert len(calls["create_repo"]) == 1 and len(calls["create_commit"]) == 1
    assert calls["create_repo"][0]["repo_id"] == "me/tiny-balpoe"
    assert calls["create_repo"][0]["private"] is False
    assert calls["create_repo"][0]["exist_ok"] is True
    assert calls["create_commit"][0]["repo_id"] == "me/tiny-balpoe"
    expected = {
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
        "images/class_counts.png", "images/reliability_diagram.png", "images/per_class_accuracy.png",
        "eval_results.json", "train_results.json", "recipe.yaml", "eval/report.json",
    }
    expected |= {p.name for p in run.glob("*.py")}  # the code files save_pretrained copied
    assert {"configuration_balpoe.py", "modeling_balpoe.py", "pipeline_balpoe.py"} <= expected
    assert set(hub_snapshot["uploaded"]) == expected
    # Sent as they lie in the run (its recipe names no local path).
    for name, content in hub_snapshot["sent"].items():
        assert content == (run / name).read_bytes(), name


def test_uploaded_config_carries_the_prior_and_lambdas(hub_snapshot):
    config = json.loads((hub_snapshot["repo"] / "config.json").read_text())
    assert config["model_type"] == "balpoe"
    assert config["class_counts"] == COUNTS
    assert config["lambdas"] == [1.0, 0.0, -1.0]
    assert "AutoModelForImageClassification" in config["auto_map"]


def test_uploaded_card_parses_and_links_only_uploaded_images(hub_snapshot):
    repo = hub_snapshot["repo"]
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]  # the recipe's fashion-mnist
    assert card.data.balpoe["lambdas"] == [1.0, 0.0, -1.0]
    assert card.data.balpoe["recipe"] == "tiny-lt"
    metrics = metrics_by_name(card)
    assert metrics[("test", "Expected calibration error (ECE)")] == 0.05  # from the evaluation report
    assert "| forward50 | 80.00 | 85.00 |" in card.text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert sorted(links) == ["images/class_counts.png", "images/per_class_accuracy.png",
                             "images/reliability_diagram.png"]
    for link in links:
        assert (repo / link).read_bytes().startswith(b"\x89PNG")
    assert "balpoe-train --config recipe.yaml\n" in card.text  # Fashion-MNIST: no data flags needed


def test_uploaded_folder_loads_back_with_the_same_logits(hub_snapshot, saved_run, remote_code_cache):
    from transformers import AutoModelForImageClassification, pipeline

    _, model = saved_run
    repo = hub_snapshot["repo"]
    images, pixels = pixels_of(repo)
    with torch.no_grad():
        expected = model(pixels).logits
        loaded = AutoModelForImageClassification.from_pretrained(repo).eval()
        torch.testing.assert_close(loaded(pixels).logits, expected, rtol=0, atol=1e-6)
    classifier = pipeline("image-classification", model=str(repo), top_k=len(COUNTS), trust_remote_code=True)
    for image, logits in zip(images, expected, strict=True):
        scores = {row["label"]: row["score"] for row in classifier(image)}
        want = {CONFIG["id2label"][str(i)]: float(p) for i, p in enumerate(logits.softmax(-1))}
        assert scores == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- refusals


def test_offline_mode_fails_before_anything_happens(saved_run, fake_hub, monkeypatch):
    run, _ = saved_run
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = snapshot(run)
    with pytest.raises(HubPublishError, match="offline mode"):
        hub.push_to_hub(run, "me/tiny-balpoe", token="hf_not_a_real_token")
    assert fake_hub == {"create_repo": [], "create_commit": []}
    assert snapshot(run) == before


def test_missing_token_fails_before_anything_happens(saved_run, fake_hub, monkeypatch, tmp_path):
    run, _ = saved_run
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = snapshot(run)
    with pytest.raises(HubPublishError, match="no Hugging Face token"):
        hub.push_to_hub(run, "me/tiny-balpoe")
    assert fake_hub == {"create_repo": [], "create_commit": []}
    assert snapshot(run) == before


def test_a_folder_saved_without_the_pipeline_is_refused_until_saved_again(tmp_path):
    """A model saved by an earlier release has no pipeline code: the card's target_prior calls would fail."""
    from balpoe_hf import BalPoEForImageClassification

    folder = tmp_path / "model"
    fixtures = Path(__file__).parent / "fixtures" / "saved_models"
    shutil.copytree(fixtures / "resnet-3experts-calibrated" / "model", folder)
    with pytest.raises(HubFolderError,
                       match=r"names no image-classification pipeline.*balpoe-evaluate --model .* --upgrade"):
        hub.check_hub_folder(folder, require_card=False)
    BalPoEForImageClassification.from_pretrained(folder).save_pretrained(folder)
    assert "pipeline_balpoe.py" in hub.check_hub_folder(folder, require_card=False)


def test_check_refuses_pickle_weights_next_to_safetensors(saved_run, tmp_path):
    run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    (copy / "cifar_resnet.py").unlink()
    with pytest.raises(HubFolderError) as error:
        hub.check_hub_folder(copy)
    assert "pytorch_model.bin" in str(error.value)
    assert "cifar_resnet.py" in str(error.value)


def test_script_dry_run_lists_the_files_and_offline_push_exits_with_an_error(saved_run, capsys, monkeypatch):
    run, _ = saved_run
    assert push_script.main([str(run), "me/tiny-balpoe", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "optimizer.bin" not in out
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert push_script.main([str(run), "me/tiny-balpoe", "--token", "hf_x"]) == 1
    assert "offline mode" in capsys.readouterr().err


def test_report_outside_the_run_gives_its_pictures_but_is_not_uploaded(saved_run, tmp_path):
    run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "images", "README.md"))
    shutil.copytree(run / "eval", tmp_path / "elsewhere")
    record_report(tmp_path / "elsewhere", tmp_path / "elsewhere")  # balpoe-evaluate --output elsewhere/...
    report = tmp_path / "elsewhere" / "report.json"
    folder = hub.prepare_hub_folder(copy, "me/tiny-balpoe", eval_report=report)
    assert "images/reliability_diagram.png" in folder.files
    assert not any(name.endswith("report.json") for name in folder.files)
    assert "### Under label shift" in folder.card.text
    with pytest.raises(HubFolderError, match="does not exist"):
        hub.prepare_hub_folder(copy, eval_report=tmp_path / "missing.json")


def test_a_report_naming_local_paths_stops_the_push_before_anything_is_written(saved_run, tmp_path):
    """A report naming the run's folder (as an earlier release's did), listed as balpoe-evaluate's and of
    the folder's weights, so that only the path is wrong with it: refused, naming the file."""
    run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("images", "README.md"))
    report = json.loads((copy / "eval" / "report.json").read_text())
    (copy / "eval" / "report.json").write_text(json.dumps({"model": str(copy), **report}))
    record_report(copy / "eval")
    with pytest.raises(HubFolderError, match=r"eval/report.json names .*/run\. "):
        hub.prepare_hub_folder(copy, "me/tiny-balpoe")
    assert not (copy / "README.md").exists() and not (copy / "images").exists()


def test_push_warns_in_one_line_when_the_card_lacks_the_evaluation(saved_run, tmp_path, capsys):
    run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "images", "README.md"))
    assert push_script.main([str(copy), "me/tiny-balpoe", "--dry-run"]) == 0
    warning = capsys.readouterr().err.strip()
    assert warning == (f"warning: no evaluation report, so the card has no label-shift table, reliability "
                       f"diagram or per-class plot; add them with: balpoe-evaluate --model {copy} --shifts "
                       f"all --output {copy / 'eval' / 'report.json'}")
    assert push_script.main([str(run), "me/tiny-balpoe", "--dry-run"]) == 0
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- what push publishes, kills


def _run_copy(saved_run, target: Path) -> Path:
    run, _ = saved_run
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("README.md", "images"))
    return target


def _rewrite_report(run: Path, **changes) -> None:
    """Change the report and list it again as balpoe-evaluate's: a manifest that an attacker also wrote."""
    path = run / "eval" / "report.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    record_report(run / "eval")


@pytest.mark.parametrize("where", ["absolute", "relative", "link"])
def test_a_report_naming_a_file_outside_its_folder_never_gets_it_published(saved_run, tmp_path, capsys,
                                                                           where):
    # The sweep's case: "images" naming /some/where/secret.txt or ../../secret.txt had --dry-run copy that
    # file into images/*.png and list it for upload.
    run = _run_copy(saved_run, tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    if where == "link":  # a picture's name beside the report, pointing elsewhere
        (run / "eval" / "report_reliability.png").unlink()
        (run / "eval" / "report_reliability.png").symlink_to(secret)
        message = r"report_reliability\.png is not a picture balpoe-evaluate wrote beside"
    else:
        name = str(secret) if where == "absolute" else "../../secret.txt"
        _rewrite_report(run, images={"reliability_diagram": name, "per_class_accuracy": name})
        message = r"names the picture '.*secret\.txt', which is not a file name beside the report"
    with pytest.raises(HubFolderError, match=message):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    assert push_script.main([str(run), "me/tiny-balpoe", "--dry-run"]) == 2
    assert "Nothing was written" in capsys.readouterr().err
    assert not (run / "images").exists() and not (run / "README.md").exists()


def test_a_picture_that_is_not_a_png_is_refused(saved_run, tmp_path):
    run = _run_copy(saved_run, tmp_path / "run")
    (run / "eval" / "report_per_class_accuracy.png").write_text("not a picture")
    record_report(run / "eval")  # even listed as balpoe-evaluate's
    with pytest.raises(HubFolderError, match=r"report_per_class_accuracy\.png is not a picture "
                                                 r"balpoe-evaluate wrote beside .* \(a PNG file"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")


def test_only_an_unedited_report_of_the_models_own_weights_is_published(saved_run, tmp_path):
    run = _run_copy(saved_run, tmp_path / "run")
    report = run / "eval" / "report.json"
    # Edited by hand since balpoe-evaluate wrote it: its hash no longer matches the manifest.
    report.write_text(report.read_text().replace('"balanced_accuracy": 0.', '"balanced_accuracy": 0.9'))
    with pytest.raises(HubFolderError, match=r"report\.json is not a report balpoe-evaluate wrote there, "
                                                 r"or it was edited since"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    # Another model's report (25 % on the card of a 100 % model, in the sweep): other weights.
    other = _run_copy(saved_run, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    weights = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    _rewrite_report(run, model="runs/first-model")
    with pytest.raises(HubFolderError, match=r"is an evaluation of other weights \(the model in "
                                                 r"runs/first-model\), not of the weights in .*other"):
        hub.prepare_hub_folder(other, "me/tiny-balpoe", eval_report=run / "eval" / "report.json")
    _rewrite_report(run, model_sha256=None)  # written before reports named their weights
    with pytest.raises(HubFolderError, match=r"without the fingerprint of the weights it evaluated"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")


def test_a_kill_at_any_step_of_writing_the_card_leaves_a_folder_push_goes_on_with(saved_run, tmp_path,
                                                                                 kill_points):
    run = _run_copy(saved_run, tmp_path / "run")
    snapshots = kill_points.watch(run)
    hub.prepare_hub_folder(run, "me/tiny-balpoe")
    card = (run / "README.md").read_text()
    assert len(snapshots) >= 6  # the journal, README.md, three pictures, the manifest
    states = set()
    for killed in snapshots:
        readme = killed / "README.md"
        before = readme.read_text() if readme.is_file() else None
        assert before in (None, card)  # never half a card
        folder = hub.prepare_hub_folder(killed, "me/tiny-balpoe")  # never "balpoe-hf did not write"
        assert readme.read_text() == card and "README.md" in folder.files
        states.add(before == card)
    assert states == {False, True}  # killed before the commit (no card) and after it (the card, finished)


def test_a_full_disk_while_writing_the_card_replaces_nothing(saved_run, tmp_path, monkeypatch):
    run = _run_copy(saved_run, tmp_path / "run")
    hub.prepare_hub_folder(run, "me/tiny-balpoe")
    before = snapshot(run)

    def full_disk(self, path):
        Path(path).write_text("half a ca")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelCard, "save", full_disk)
    with pytest.raises(HubFolderError, match=r"could not write the model card into .*No space left on "
                                                 r"device\. The disk is full\. Nothing there was replaced"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- a folder the user changed


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", class_counts=TRAIN_COUNTS,
                          id2label=dict(enumerate(CLASS_NAMES)), image_size=16)
    path = tmp_path / "model"
    BalPoEForImageClassification(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


def test_hub_folder_never_replaces_a_card_it_did_not_write(model_dir, capsys):
    (model_dir / "README.md").write_text("# My own card\n")
    before = folder_bytes(model_dir)
    with pytest.raises(HubFolderError, match=r"holds \['README.md'\], which balpoe-hf did not write"):
        hub.prepare_hub_folder(model_dir)
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2  # bad input: the folder
    assert "Nothing was written" in capsys.readouterr().err
    assert folder_bytes(model_dir) == before


def test_hub_folder_is_checked_before_anything_is_written(model_dir):
    (model_dir / "preprocessor_config.json").unlink()
    before = folder_bytes(model_dir)
    with pytest.raises(HubFolderError, match=r"no preprocessor_config\.json"):
        hub.prepare_hub_folder(model_dir)
    assert folder_bytes(model_dir) == before  # no README.md, no images/


def test_hub_folder_rewrites_its_own_card_but_not_an_edited_one(model_dir):
    hub.prepare_hub_folder(model_dir)
    hub.prepare_hub_folder(model_dir, "me/renamed")  # its own files: replaced
    assert "me/renamed" in (model_dir / "README.md").read_text()
    (model_dir / "images" / "class_counts.png").write_bytes(b"my picture")
    with pytest.raises(HubFolderError, match=r"\['images/class_counts.png'\].*or which were edited"):
        hub.prepare_hub_folder(model_dir)
    assert (model_dir / "images" / "class_counts.png").read_bytes() == b"my picture"


def test_push_refuses_bad_input_before_writing_anything(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "data.parquet").write_bytes(b"PAR1\x15\x04\x80\xff")
    before = folder_bytes(model_dir)
    cases = [
        (["not a valid id!!"], "'not a valid id!!' is not a Hub repository id"),
        (["me/model", "--eval-report", str(tmp_path / "list.json")], "holds a JSON list, not an object"),
        (["me/model", "--eval-report", str(tmp_path / "broken.json")], "is not valid JSON"),
        (["me/model", "--eval-report", str(tmp_path / "data.parquet")], "is not valid JSON"),
    ]
    for args, message in cases:
        assert cli.push_main([str(model_dir), *args, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Nothing was written" in err, err
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(config[:-20])
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2
    assert f"the model config {model_dir / 'config.json'} is not valid JSON" in capsys.readouterr().err
    (model_dir / "config.json").write_text(config)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.tempfile, "NamedTemporaryFile", read_only)
    assert cli.push_main([str(model_dir), "me/model", "--dry-run"]) == 2
    assert f"cannot write the model card into {model_dir}: {model_dir} does not take new files" in \
        capsys.readouterr().err
    assert folder_bytes(model_dir) == before
