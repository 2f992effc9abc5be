"""Hub publishing: the model card, the folder checks and push_to_hub, all offline.

The only mocks are HfApi.create_repo and HfApi.upload_folder (the network boundary); everything else
(card rendering, ModelCard parsing, the upload file filter, loading the folder back) runs for real.
"""

import errno
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file, save_file

from balpoe_hf import hub
from balpoe_hf.checkpoints import record_outputs, weights_fingerprint

_spec = importlib.util.spec_from_file_location(
    "push_to_hub_script", Path(__file__).resolve().parents[1] / "scripts" / "push_to_hub.py")
push_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(push_script)

COUNTS = [500, 200, 80, 30, 10]  # imbalance ratio 500 / 10 = 50
CONFIG = {
    "model_type": "balpoe",
    "backbone": "resnet20_cifar",
    "num_experts": 3,
    "lambdas": [1.0, 0.0, -1.0],
    "class_counts": COUNTS,
    "id2label": {str(i): name for i, name in enumerate(["cat", "dog", "owl", "elk", "yak"])},
    "image_size": 32,
}
EVAL = {"eval_accuracy": 0.81, "eval_balanced_accuracy": 0.75, "eval_many": 0.9, "eval_medium": 0.7,
        "eval_few": None, "eval_ece": 0.034}
SHIFTS = {"shift_accuracy": {"none": {"forward50": 0.8, "backward50": 0.7},
                             "oracle": {"forward50": 0.85, "backward50": 0.78}}}
IMAGES = {"class_counts": "images/class_counts.png"}


def _metrics_by_name(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}


def test_card_metadata_round_trips_through_model_card_load(tmp_path):
    card = hub.render_model_card(CONFIG, EVAL, SHIFTS, repo_id="me/tiny-balpoe", images=IMAGES,
                                 dataset_name="CIFAR-10-LT",
                                 recipe={"name": "cifar10-lt-ir50", "dataset": "uoft-cs/cifar10",
                                         "epochs": 200, "mixup_alpha": 0.8})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert {"long-tailed", "balpoe", "timm", "resnet20_cifar"} <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.balpoe["num_experts"] == 3
    assert data.balpoe["lambdas"] == [1.0, 0.0, -1.0]
    assert data.balpoe["class_counts"] == COUNTS
    assert data.balpoe["imbalance_ratio"] == 50.0
    assert data.balpoe["backbone"] == "resnet20_cifar"
    assert data.balpoe["recipe"] == "cifar10-lt-ir50"
    assert data.model_name == "tiny-balpoe"
    metrics = _metrics_by_name(loaded)
    assert metrics[("test", "Balanced accuracy")] == 0.75
    assert metrics[("test", "Accuracy")] == 0.81
    assert metrics[("test", "Many-shot accuracy")] == 0.9
    assert metrics[("test", "Medium-shot accuracy")] == 0.7
    assert metrics[("test", "Expected calibration error (ECE)")] == 0.034
    # An empty shot group (None) is reported as n/a in the body, never as a number in the metadata.
    assert ("test", "Few-shot accuracy") not in metrics
    assert metrics[("test-forward50", "Top-1 accuracy (target prior: oracle)")] == 0.85
    assert metrics[("test-backward50", "Top-1 accuracy (target prior: none)")] == 0.7
    text = loaded.text
    # The balanced-set metrics: one header row and one value row, in BALANCED_METRICS order.
    assert "| Balanced acc. % | Accuracy % | Many % | Medium % | Few % | ECE % |" in text
    assert "| 75.00 | 81.00 | 90.00 | 70.00 | n/a | 3.40 |" in text
    assert "| oracle | 85.00 | 78.00 |" in text
    assert "| 4 | yak | 10 |" in text
    assert "![Training images per class](images/class_counts.png)" in text
    assert 'repo = "me/tiny-balpoe"' in text and "from_pretrained(repo, trust_remote_code=True)" in text
    assert 'pipeline("image-classification", model=repo, trust_remote_code=True)' in text
    assert "trained with mixup (alpha 0.8)" in text and "| Schedule | 200 epochs," in text
    assert "corrects for **label shift** only" in text and "new domains" in text
    assert "@InProceedings{SanchezAimar2023BalPoE_CalibratedLT" in text
    assert "pages     = {19967-19977}" in text


def test_card_without_eval_results_has_no_model_index():
    card = hub.render_model_card(CONFIG, images=IMAGES)
    assert not card.data.eval_results
    assert "model-index" not in card.data.to_dict()
    assert "## Evaluation" not in card.text
    assert "### Under label shift" not in card.text


def test_many_classes_get_a_summary_and_a_pointer_to_config():
    counts = [int(1000 * 0.95 ** i) + 1 for i in range(100)]  # 1001 down to int(6.23) + 1 = 7
    config = {**CONFIG, "class_counts": counts, "id2label": {str(i): f"c{i}" for i in range(100)}}
    card = hub.render_model_card(config, images=IMAGES)
    summary = card.data.balpoe["class_counts_summary"]
    assert "class_counts" not in card.data.balpoe
    assert summary["max"] == 1001 and summary["min"] == 7 and summary["total"] == sum(counts)
    assert "config.json" in summary["full_list"]
    assert "| 99 | c99 |" not in card.text
    assert "[`config.json`](config.json)" in card.text


def test_card_needs_class_counts():
    with pytest.raises(hub.HubFolderError, match="class_counts"):
        hub.render_model_card({**CONFIG, "class_counts": []}, images=IMAGES)


def test_template_ships_with_the_package():
    path = hub.template_path()
    assert path.name == "modelcard_template.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n{{ card_data }}\n---")


def test_usage_snippet_is_valid_python():
    card = hub.render_model_card(CONFIG, images=IMAGES, repo_id="me/tiny-balpoe")
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    assert len(blocks) == 1
    for block in blocks:
        compile(block, "<card>", "exec")


def test_check_refuses_pickle_weights_and_lists_every_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not safetensors")
    with pytest.raises(hub.HubFolderError) as error:
        hub.check_hub_folder(tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message
    assert "no weights" in message
    assert "auto_map" in message
    assert "preprocessor_config.json" in message
    assert "README.md" in message


# --------------------------------------------------------------------------- a real saved run


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny untrained BalPoE model saved as scripts/train.py and scripts/evaluate.py leave a run."""
    from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, build_image_processor
    from balpoe_hf.plots import per_class_accuracy_plot, reliability_diagram

    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, lambdas=[1.0, 0.0, -1.0],
                          class_counts=COUNTS, id2label={int(k): v for k, v in CONFIG["id2label"].items()},
                          image_size=32)
    model = BalPoEForImageClassification(config).eval()
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    model.save_pretrained(run)
    build_image_processor(config).save_pretrained(run)
    (run / "eval_results.json").write_text(json.dumps({"epoch": 1, **EVAL}))
    (run / "train_results.json").write_text(json.dumps({"epochs": 1, "class_counts": COUNTS}))
    (run / "recipe.yaml").write_text(
        "name: tiny-lt\ndataset: fashion-mnist\nimbalance_ratio: 50\nmany_threshold: 100\nfew_threshold: 20\n"
        "backbone: resnet20_cifar\nlambdas: [1.0, 0.0, -1.0]\n")
    # scripts/evaluate.py --output RUN/eval/report.json: the report and its pictures beside it.
    (run / "eval").mkdir()
    logits, labels = torch.randn(40, 5), torch.arange(40) % 5
    reliability_diagram(logits, labels, run / "eval" / "report_reliability.png")
    per_class_accuracy_plot([0.9, 0.8, 0.6, 0.4, 0.2], COUNTS, run / "eval" / "report_per_class_accuracy.png")
    report = {"balanced": {**{k.removeprefix("eval_"): v for k, v in EVAL.items()}, "ece": 0.05},
              "settings": {"n_bins": 15, "many": 100, "few": 20},
              "shift_accuracy": SHIFTS["shift_accuracy"], "model_sha256": weights_fingerprint(run),
              "images": {"reliability_diagram": "report_reliability.png",
                         "per_class_accuracy": "report_per_class_accuracy.png"}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    _record_report(run / "eval")
    # Things a run directory also holds that must not be published.
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "notes.txt").write_text("scratch")
    return run, model


def _record_report(folder: Path, owner: Path | None = None) -> None:
    """List the report files in ``folder`` as balpoe-evaluate's in ``owner``'s manifest, as it does."""
    owner = owner or folder.parent
    record_outputs(owner, sorted(folder.glob("report*")), reports=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fake_hub(mp: pytest.MonkeyPatch) -> dict[str, list]:
    """HfApi.create_repo and HfApi.upload_folder replaced by recorders; online mode for the check."""
    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload_folder"].append(kwargs)

    mp.setattr(HfApi, "create_repo", create_repo)
    mp.setattr(HfApi, "upload_folder", upload_folder)
    mp.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return calls


@pytest.fixture
def fake_hub(monkeypatch):
    return _fake_hub(monkeypatch)


def _uploaded(call: dict) -> list[str]:
    """The files upload_folder would send: huggingface_hub's own filter over the folder's files."""
    folder = Path(call["folder_path"])
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                      ignore_patterns=call.get("ignore_patterns")))


@pytest.fixture(scope="module")
def hub_snapshot(saved_run, tmp_path_factory):
    """Push the run with the Hub mocked and copy what would be uploaded into a fresh 'Hub repo' folder."""
    run, _ = saved_run
    with pytest.MonkeyPatch.context() as mp:
        calls = _fake_hub(mp)
        url = hub.push_to_hub(run, "me/tiny-balpoe", token="hf_not_a_real_token")
    uploaded = _uploaded(calls["upload_folder"][0])
    repo = tmp_path_factory.mktemp("hub") / "tiny-balpoe"
    for name in uploaded:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / name, repo / name)
    return {"url": url, "calls": calls, "uploaded": uploaded, "repo": repo}


def test_push_uploads_exactly_the_publishable_files(hub_snapshot, saved_run):
    run, _ = saved_run
    calls = hub_snapshot["calls"]
    assert hub_snapshot["url"] == "https://huggingface.co/me/tiny-balpoe"
    assert len(calls["create_repo"]) == 1 and len(calls["upload_folder"]) == 1
    assert calls["create_repo"][0]["repo_id"] == "me/tiny-balpoe"
    assert calls["create_repo"][0]["private"] is False
    assert calls["create_repo"][0]["exist_ok"] is True
    assert Path(calls["upload_folder"][0]["folder_path"]).resolve() == run.resolve()
    assert calls["upload_folder"][0]["repo_id"] == "me/tiny-balpoe"
    expected = {
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
        "images/class_counts.png", "images/reliability_diagram.png", "images/per_class_accuracy.png",
        "eval_results.json", "train_results.json", "recipe.yaml", "eval/report.json",
    }
    expected |= {p.name for p in run.glob("*.py")}  # the code files save_pretrained copied
    assert {"configuration_balpoe.py", "modeling_balpoe.py"} <= expected
    assert set(hub_snapshot["uploaded"]) == expected


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
    assert card.data.balpoe["class_counts"] == COUNTS
    assert card.data.balpoe["lambdas"] == [1.0, 0.0, -1.0]
    assert card.data.balpoe["recipe"] == "tiny-lt"
    metrics = _metrics_by_name(card)
    assert metrics[("test", "Expected calibration error (ECE)")] == 0.05  # from the evaluation report
    assert metrics[("test-forward50", "Top-1 accuracy (target prior: none)")] == 0.8
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert sorted(links) == ["images/class_counts.png", "images/per_class_accuracy.png",
                             "images/reliability_diagram.png"]
    for link in links:
        assert (repo / link).read_bytes().startswith(b"\x89PNG")
    assert "balpoe-train --config recipe.yaml\n" in card.text  # Fashion-MNIST: no data flags needed


def _pixels(run: Path) -> tuple[list, torch.Tensor]:
    from transformers import AutoImageProcessor

    images = [Image.new("RGB", (40, 28), (30 * i, 200 - 40 * i, 90)) for i in range(4)]
    processor = AutoImageProcessor.from_pretrained(run)
    return images, processor(images=images, return_tensors="pt")["pixel_values"]


def test_uploaded_folder_loads_back_with_the_same_logits(hub_snapshot, saved_run):
    from transformers import AutoModelForImageClassification, pipeline

    _, model = saved_run
    repo = hub_snapshot["repo"]
    images, pixels = _pixels(repo)
    with torch.no_grad():
        expected = model(pixels).logits
        loaded = AutoModelForImageClassification.from_pretrained(repo).eval()
        torch.testing.assert_close(loaded(pixels).logits, expected, rtol=0, atol=1e-6)
    classifier = pipeline("image-classification", model=str(repo), top_k=len(COUNTS))
    for image, logits in zip(images, expected, strict=True):
        scores = {row["label"]: row["score"] for row in classifier(image)}
        want = {CONFIG["id2label"][str(i)]: float(p) for i, p in enumerate(logits.softmax(-1))}
        assert scores == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- refusals


def test_offline_mode_fails_before_anything_happens(saved_run, fake_hub, monkeypatch):
    run, _ = saved_run
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    before = _snapshot(run)
    with pytest.raises(hub.HubPublishError, match="offline mode"):
        hub.push_to_hub(run, "me/tiny-balpoe", token="hf_not_a_real_token")
    assert fake_hub == {"create_repo": [], "upload_folder": []}
    assert _snapshot(run) == before


def test_missing_token_fails_before_anything_happens(saved_run, fake_hub, monkeypatch, tmp_path):
    run, _ = saved_run
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = _snapshot(run)
    with pytest.raises(hub.HubPublishError, match="no Hugging Face token"):
        hub.push_to_hub(run, "me/tiny-balpoe")
    assert fake_hub == {"create_repo": [], "upload_folder": []}
    assert _snapshot(run) == before


def test_check_refuses_pickle_weights_next_to_safetensors(saved_run, tmp_path):
    run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    (copy / "cifar_resnet.py").unlink()
    with pytest.raises(hub.HubFolderError) as error:
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
    _record_report(tmp_path / "elsewhere", tmp_path / "elsewhere")  # balpoe-evaluate --output elsewhere/...
    report = tmp_path / "elsewhere" / "report.json"
    folder = hub.prepare_hub_folder(copy, "me/tiny-balpoe", eval_report=report)
    assert "images/reliability_diagram.png" in folder.files
    assert not any(name.endswith("report.json") for name in folder.files)
    assert "### Under label shift" in folder.card.text
    with pytest.raises(hub.HubFolderError, match="does not exist"):
        hub.prepare_hub_folder(copy, eval_report=tmp_path / "missing.json")


# --------------------------------------------------------------------------- cards of real runs


COMMON_FLAGS = ["--recipe", "cifar10-lt-local", "--backbone", "resnet20_cifar", "--image-column", "picture",
                "--label-column", "target", "--image-size", "16", "--batch-size", "8", "--warmup-epochs", "0",
                "--num-workers", "0", "--eval-every", "0", "--many-threshold", "20", "--few-threshold", "6",
                "--selection", "random", "--imbalance-ratio", "8"]
# Each run as a user would start it: the shipped CIFAR-10-LT recipe (ResNet-32, 200 epochs, mixup 0.8 in its
# file and its description) changed on the command line, as in a run whose card misdescribed it.
RUNS = {
    "balpoe-erm": ["--method", "balpoe-erm", "--epochs", "2", "--holdout-fraction", "0.25"],
    "balpoe": ["--method", "balpoe", "--mixup-alpha", "0.4", "--epochs", "1"],
    "ce-la": ["--method", "ce-la", "--epochs", "1", "--holdout-fraction", "0.25"],
}
# Any absolute path: a slash that starts a path rather than continuing a word, a URL or a relative path.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[\w.-]+/")


@pytest.fixture(scope="module")
def run_cards(tmp_path_factory) -> dict[str, dict]:
    """Three runs trained by balpoe-train, evaluated by balpoe-evaluate and rendered by prepare_hub_folder."""
    from train_synthetic import write_parquet

    from balpoe_hf import cli

    root = tmp_path_factory.mktemp("card_runs")
    train_file, test_file = write_parquet(root / "data")
    torch.set_num_threads(1)
    cards = {}
    for method, flags in RUNS.items():
        run = root / "runs" / method
        assert cli.train_main([*COMMON_FLAGS, *flags, "--train-file", str(train_file), "--test-file",
                               str(test_file), "--output-dir", str(run)]) == 0
        priors = "all" if "--holdout-fraction" in flags else "none,oracle,em"
        assert cli.evaluate_main(["--model", str(run), "--shifts", "forward5,uniform,backward5", "--prior",
                                  priors, "--output", str(run / "eval" / "report.json")]) == 0
        folder = hub.prepare_hub_folder(run, f"me/run-{method}")
        cards[method] = {"run": run, "folder": folder, "text": (run / "README.md").read_text(),
                         "data": root / "data"}
    return cards


def _target_priors(card: ModelCard) -> set[str]:
    """The prior modes of the card's model-index entries."""
    names = [r.metric_name for r in card.data.eval_results]
    return {match.group(1) for name in names if (match := re.fullmatch(r".*\(target prior: (.+)\)", name))}


def _front_matter(text: str) -> str:
    return text.split("---\n", 2)[1]


@pytest.mark.parametrize("method", list(RUNS))
def test_card_shows_no_local_path(run_cards, method):
    card = run_cards[method]
    text = card["text"]
    assert str(card["data"]) not in text and str(card["run"]) not in text
    assert not ABSOLUTE_PATH.findall(text)
    assert "| Training data | `train.parquet` (local files) |" in text
    assert "| Test data | `test.parquet` |" in text
    assert "balpoe-train --config recipe.yaml --train-file train.parquet --test-file test.parquet" in text
    # The shipped recipe's description (ResNet-32, 200 epochs, mixup 0.8) is true of none of these runs.
    assert "ResNet-32" not in text and "200 epochs" not in text and "mixup 0.8" not in text


def test_balpoe_erm_card_states_its_run(run_cards):
    card = run_cards["balpoe-erm"]
    text, data = card["text"], card["folder"].card.data
    assert "trained without mixup (the paper's ERM variant): 3 experts (lambda = 1, 0, -1) on a shared " \
           "`resnet20_cifar` trunk" in text
    assert "| Method | `balpoe-erm` (BalPoE 1/0/-1 without mixup) |" in text
    assert "| Mixup | off |" in text
    body = text.split("---\n", 2)[2]
    assert "with mixup" not in body and "alpha" not in body and "mixup soft targets" not in body
    assert "| Schedule | 2 epochs, batch 8, SGD lr 0.1" in text
    # 32/16/8/4 training images (ratio 8) less a quarter of each class held out: 24/12/6/3 trained on.
    assert "made long-tailed with imbalance ratio 8" in text and "25% of each class held out" in text
    assert "| Training images | 45 in 4 classes, 24 down to 3 (imbalance ratio 8) |" in text
    assert (data.balpoe["method"], data.balpoe["epochs"]) == ("balpoe-erm", 2)
    assert data.balpoe["mixup_alpha"] == 0.0
    assert data.balpoe["backbone"] == "resnet20_cifar" and data.balpoe["class_counts"] == [24, 12, 6, 3]
    assert data.datasets is None  # local files: no Hub dataset to point to


def test_balpoe_card_states_its_mixup(run_cards):
    text, data = run_cards["balpoe"]["text"], run_cards["balpoe"]["folder"].card.data
    assert "trained with mixup (alpha 0.4): 3 experts (lambda = 1, 0, -1)" in text
    assert "| Method | `balpoe` (BalPoE 1/0/-1 with mixup) |" in text
    assert "| Mixup | alpha 0.4 (soft targets) |" in text
    assert "| Schedule | 1 epoch, batch 8," in text
    assert "held out" not in text  # trained without a held-out split
    assert (data.balpoe["method"], data.balpoe["epochs"], data.balpoe["mixup_alpha"]) == ("balpoe", 1, 0.4)


def test_ce_la_card_states_a_single_network(run_cards):
    text, data = run_cards["ce-la"]["text"], run_cards["ce-la"]["folder"].card.data
    assert "the **cross-entropy with post-hoc logit adjustment (Menon et al., ICLR 2021)** baseline" in text
    body = text.split("---\n", 2)[2].split("## How to use")[0]
    assert "one `resnet20_cifar` network" in body and "expert" not in body
    assert "| Loss | cross-entropy `CE(z, y)` |" in text
    assert "| Prediction | `z - log pi + log pi_target`;" in text
    assert "| Mixup | off |" in text and "with mixup" not in text
    assert (data.balpoe["method"], data.balpoe["num_experts"], data.balpoe["lambdas"]) == ("ce-la", 1, [1.0])


@pytest.mark.parametrize("method,unknown", [("balpoe-erm", "auto"), ("balpoe", "em"), ("ce-la", "auto")])
def test_card_shift_table_and_model_index_hold_three_prior_modes(run_cards, method, unknown):
    card = run_cards[method]
    text = card["text"]
    report = json.loads((card["run"] / "eval" / "report.json").read_text())
    from balpoe_hf.evaluation import PRIOR_MODES

    # The report keeps every mode.
    assert len(report["shift_accuracy"]) == (len(PRIOR_MODES) if unknown == "auto" else 3)
    body = text.split("## How to use")[0]
    rows = re.findall(r"^\| ([\w-]+) \| [\d.]+ \|", body, flags=re.MULTILINE)
    assert rows == ["none", "oracle", unknown]
    assert "Rows: `none` predicts for the uniform prior" in body
    assert f"; `{unknown}` for the distribution estimated from the unlabeled test images" in body
    assert "[`eval/report.json`](eval/report.json)" in body
    assert _target_priors(card["folder"].card) == {"none", "oracle", unknown}
    # 9 balanced-set metrics + 3 modes x 3 shifts
    assert len(card["folder"].card.data.eval_results) == 9 + 3 * 3
    snippet = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
    call = 'adapt_to_unlabeled(inputs["pixel_values"]' + (', method="em")' if unknown == "em" else ")")
    assert call in snippet and "estimate_target_prior" not in text


def test_card_front_matter_stays_small_for_the_full_grid():
    from balpoe_hf.evaluation import ALL_SHIFTS, PRIOR_MODES

    grid = {"shift_accuracy": {mode: dict.fromkeys(ALL_SHIFTS, 0.5) for mode in PRIOR_MODES}}
    calibrated = {**CONFIG, "calibration": {}, "shift_estimator": {"name": "em-bcts"}}
    card = hub.render_model_card(calibrated, EVAL, grid, images=IMAGES)
    assert _target_priors(card) == {"auto", "none", "oracle"}
    assert len(card.data.eval_results) == len(EVAL) - 1 + 3 * len(ALL_SHIFTS)  # few-shot is None
    assert len(_front_matter(str(card)).splitlines()) < 300  # the 11 x 9 grid took 680 lines
    assert "| auto (chose em-bcts) |" in card.text and "For this model `auto` chose `em-bcts`." in card.text
    assert "| em-bcts |" not in card.text
    plain = hub.render_model_card({**CONFIG, "calibration": {}}, EVAL, grid, images=IMAGES)
    assert "| auto | 50.00 |" in plain.text and "chose" not in plain.text


# The editable install of the package puts a finder for balpoe_hf on sys.meta_path: refuse the package first,
# and drop the checkout from the path, so that only a model folder's code files can be imported.
HIDE_THE_PACKAGE = """import importlib.abc, sys

class HideBalPoE(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "balpoe_hf" or name.startswith("balpoe_hf."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)

sys.meta_path.insert(0, HideBalPoE())
sys.path = [p for p in sys.path if p and not ((p == REPO or p.startswith(REPO + "/"))
                                              and not p.startswith(sys.prefix))]
try:
    import balpoe_hf
    raise SystemExit("balpoe_hf is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
"""


def test_card_snippets_run_as_written_without_the_package(run_cards, hub_snapshot, saved_run, tmp_path):
    """Every card's usage code, with its Hub id pointed at the uploaded folder, in a Python without
    balpoe_hf: remote code, the pipeline, a known prior and adapt_to_unlabeled (auto and em). The remote-code
    model (and base model and config) of the pushed folder compute the logits of the model that was saved,
    and no module of the package is loaded."""
    _, saved_model = saved_run
    _, pixels = _pixels(hub_snapshot["repo"])
    torch.save(pixels, tmp_path / "pixels.pt")
    folders = {"me/tiny-balpoe": hub_snapshot["repo"],
               **{f"me/run-{method}": card["run"] for method, card in run_cards.items()}}
    lines = [f"REPO = {str(Path(__file__).resolve().parents[1])!r}", HIDE_THE_PACKAGE]
    for repo_id, folder in folders.items():
        text = (folder / "README.md").read_text()
        snippet = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
        assert f'repo = "{repo_id}"' in snippet
        lines += [snippet.replace(f'repo = "{repo_id}"', f"repo = {str(folder)!r}"),
                  "assert shifted_logits.shape == (8, model.config.num_labels)",
                  "assert abs(float(estimate.prior.sum()) - 1) < 1e-6", "print('ran', repo)"]
        if folder == hub_snapshot["repo"]:
            lines += ["assert type(model).__module__.startswith('transformers_modules.')",
                      "from transformers import AutoConfig, AutoModel",
                      "base = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()",
                      "config = AutoConfig.from_pretrained(repo, trust_remote_code=True)",
                      "assert type(base).__name__ == 'BalPoEModel'",
                      "assert type(config).__name__ == 'BalPoEConfig'",
                      f"pixels = torch.load({str(tmp_path / 'pixels.pt')!r})",
                      "with torch.no_grad():",
                      f"    torch.save(model(pixels, target_prior='uniform').logits, "
                      f"{str(tmp_path / 'logits.pt')!r})",
                      f"    torch.save(base(pixels).expert_logits, {str(tmp_path / 'expert_logits.pt')!r})"]
    lines.append("assert not [m for m in sys.modules if m.split('.')[0] == 'balpoe_hf'], 'balpoe_hf loaded'")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ran ") == len(folders)
    with torch.no_grad():
        expected = saved_model(pixels)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "expert_logits.pt"), expected.expert_logits, rtol=0,
                               atol=1e-6)


def test_card_renders_as_the_hub_shows_it(run_cards, tmp_path):
    """The card as HTML (YAML header stripped, Markdown rendered, images relative to the repository), and,
    where chromium is installed, drawn by a headless browser. ``python tests/card_html.py README.md out.png``
    draws any card for a person to look at."""
    pytest.importorskip("markdown")
    from card_html import card_html, chromium, screenshot

    folder = run_cards["balpoe-erm"]["run"]
    html = card_html(folder / "README.md")
    assert "model-index" not in html and "library_name" not in html
    # The run, the metrics, the shift table and the class counts: every table rendered, none left as text.
    assert html.count("<table>") == 4 and "|---" not in html and "| none |" not in html
    images = re.findall(r'<img alt="[^"]*" src="([^"]+)"', html)
    assert sorted(images) == ["images/class_counts.png", "images/per_class_accuracy.png",
                              "images/reliability_diagram.png"]
    assert all((folder / image).is_file() for image in images)
    assert '<code class="language-python">' in html and '<code class="language-bash">' in html
    if chromium() is None:
        pytest.skip("chromium is not installed: the page was rendered but not drawn")
    png = Image.open(screenshot(html, tmp_path / "card.png", height=1200))
    assert png.size == (1000, 1200)
    # The title and the run's table are drawn: dark text on the white page.
    assert png.convert("L").crop((0, 0, 1000, 600)).getextrema()[0] < 64


# --------------------------------------------------------------------------- what push publishes, kills


def _run_copy(saved_run, target: Path) -> Path:
    run, _ = saved_run
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("README.md", "images"))
    return target


def _rewrite_report(run: Path, **changes) -> None:
    """Change the report and list it again as balpoe-evaluate's: a manifest that an attacker also wrote."""
    path = run / "eval" / "report.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    _record_report(run / "eval")


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
    with pytest.raises(hub.HubFolderError, match=message):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    assert push_script.main([str(run), "me/tiny-balpoe", "--dry-run"]) == 1
    assert "Nothing was written" in capsys.readouterr().err
    assert not (run / "images").exists() and not (run / "README.md").exists()


def test_a_picture_that_is_not_a_png_is_refused(saved_run, tmp_path):
    run = _run_copy(saved_run, tmp_path / "run")
    (run / "eval" / "report_per_class_accuracy.png").write_text("not a picture")
    _record_report(run / "eval")  # even listed as balpoe-evaluate's
    with pytest.raises(hub.HubFolderError, match=r"report_per_class_accuracy\.png is not a picture "
                                                 r"balpoe-evaluate wrote beside .* \(a PNG file"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")


def test_only_an_unedited_report_of_the_models_own_weights_is_published(saved_run, tmp_path):
    run = _run_copy(saved_run, tmp_path / "run")
    report = run / "eval" / "report.json"
    # Edited by hand since balpoe-evaluate wrote it: its hash no longer matches the manifest.
    report.write_text(report.read_text().replace('"balanced_accuracy": 0.', '"balanced_accuracy": 0.9'))
    with pytest.raises(hub.HubFolderError, match=r"report\.json is not a report balpoe-evaluate wrote there, "
                                                 r"or it was edited since"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    # Another model's report (25 % on the card of a 100 % model, in the sweep): other weights.
    other = _run_copy(saved_run, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    weights = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    _rewrite_report(run, model="runs/first-model")
    with pytest.raises(hub.HubFolderError, match=r"is an evaluation of other weights \(the model in "
                                                 r"runs/first-model\), not of the weights in .*other"):
        hub.prepare_hub_folder(other, "me/tiny-balpoe", eval_report=run / "eval" / "report.json")
    _rewrite_report(run, model_sha256=None)  # written before reports named their weights
    with pytest.raises(hub.HubFolderError, match=r"without the fingerprint of the weights it evaluated"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")


def test_a_kill_at_any_step_of_writing_the_card_leaves_a_folder_push_goes_on_with(saved_run, tmp_path,
                                                                                 kill_points):
    run = _run_copy(saved_run, tmp_path / "run")
    snapshots = kill_points.watch(run)
    hub.prepare_hub_folder(run, "me/tiny-balpoe")
    card = (run / "README.md").read_text()
    assert len(snapshots) >= 6  # the journal, README.md, three pictures, the manifest
    states = set()
    for snapshot in snapshots:
        readme = snapshot / "README.md"
        before = readme.read_text() if readme.is_file() else None
        assert before in (None, card)  # never half a card
        folder = hub.prepare_hub_folder(snapshot, "me/tiny-balpoe")  # never "balpoe-hf did not write"
        assert readme.read_text() == card and "README.md" in folder.files
        states.add(before == card)
    assert states == {False, True}  # killed before the commit (no card) and after it (the card, finished)


def test_a_full_disk_while_writing_the_card_replaces_nothing(saved_run, tmp_path, monkeypatch):
    run = _run_copy(saved_run, tmp_path / "run")
    hub.prepare_hub_folder(run, "me/tiny-balpoe")
    before = _snapshot(run)

    def full_disk(self, path):
        Path(path).write_text("half a ca")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelCard, "save", full_disk)
    with pytest.raises(hub.HubFolderError, match=r"could not write the model card into .*No space left on "
                                                 r"device\. The disk is full\. Nothing there was replaced"):
        hub.prepare_hub_folder(run, "me/tiny-balpoe")
    assert _snapshot(run) == before
