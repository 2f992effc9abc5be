"""Hub publishing: the model card, the folder checks and push_to_hub, all offline.

The only mocks are HfApi.create_repo and HfApi.upload_folder (the network boundary); everything else
(card rendering, ModelCard parsing, the upload file filter, loading the folder back) runs for real.
"""

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

from balpoe_hf import hub

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
                                 dataset_id="uoft-cs/cifar10", dataset_name="CIFAR-10-LT",
                                 recipe_name="cifar10-lt-ir50")
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
    assert "| Balanced accuracy (%) | 75.00 |" in text
    assert "| Few-shot accuracy (%) | n/a |" in text
    assert "| oracle | 85.00 | 78.00 |" in text
    assert "| 4 | yak | 10 |" in text
    assert "![Training images per class](images/class_counts.png)" in text
    assert 'from_pretrained("me/tiny-balpoe", trust_remote_code=True)' in text
    assert "covariate shift" in text
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
    assert len(blocks) == 2
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
              "shift_accuracy": SHIFTS["shift_accuracy"],
              "images": {"reliability_diagram": "report_reliability.png",
                         "per_class_accuracy": "report_per_class_accuracy.png"}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    # Things a run directory also holds that must not be published.
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "notes.txt").write_text("scratch")
    return run, model


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
    assert "accelerate launch scripts/train.py --config recipe.yaml" in card.text


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


def test_uploaded_folder_loads_with_remote_code_without_the_package(hub_snapshot, saved_run, tmp_path):
    _, model = saved_run
    repo = hub_snapshot["repo"]
    _, pixels = _pixels(repo)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['balpoe_hf'] = None  # the package is not importable: only the repo's code files\n"
        "from transformers import AutoModelForImageClassification\n"
        f"model = AutoModelForImageClassification.from_pretrained({str(repo)!r}, trust_remote_code=True)\n"
        f"pixels = torch.load({str(tmp_path / 'pixels.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model.eval()(pixels).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(type(model).__module__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balpoe_hf" not in result.stdout and "transformers_modules" in result.stdout
    with torch.no_grad():
        expected = model(pixels).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_card_usage_snippet_runs_as_written(hub_snapshot):
    repo = hub_snapshot["repo"]
    text = ModelCard.load(repo / "README.md").text
    snippet = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
    assert '"me/tiny-balpoe"' in snippet
    namespace: dict = {}
    exec(snippet.replace('"me/tiny-balpoe"', repr(str(repo))), namespace)  # the Hub id -> the local copy
    assert namespace["logits"].shape == (4, len(COUNTS))
    assert namespace["shifted_logits"].shape == (4, len(COUNTS))


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
    report = tmp_path / "elsewhere" / "report.json"
    folder = hub.prepare_hub_folder(copy, "me/tiny-balpoe", eval_report=report)
    assert "images/reliability_diagram.png" in folder.files
    assert not any(name.endswith("report.json") for name in folder.files)
    assert "### Under label shift" in folder.card.text
    with pytest.raises(hub.HubFolderError, match="does not exist"):
        hub.prepare_hub_folder(copy, eval_report=tmp_path / "missing.json")
