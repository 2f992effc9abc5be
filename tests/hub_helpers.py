"""What the Hub tests share (tests/test_hub_card.py, tests/test_hub_push.py): a tiny saved run as training and
balpoe-evaluate leave it, and push_to_hub with the network boundary mocked.

The only mocks are HfApi.create_repo and HfApi.create_commit; everything else (card rendering, ModelCard
parsing, the upload file filter, loading the folder back) runs for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_script
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.hf_api import RepoUrl
from PIL import Image

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, build_image_processor, hub
from balpoe_hf.run_folder import record_outputs, weights_fingerprint

push_script = load_script("push_to_hub")

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


def metrics_by_name(card: ModelCard) -> dict[tuple[str, str], float]:
    """The card metadata's eval results as {(split, metric name): value}."""
    return {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}


def make_saved_run(root: Path) -> tuple[Path, BalPoEForImageClassification]:
    """A tiny untrained BalPoE model saved in ``root / "tiny-run"`` as scripts/train.py and
    scripts/evaluate.py leave a run; the run and the model."""
    from balpoe_hf.evaluation.plots import per_class_accuracy_plot, reliability_diagram

    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, lambdas=[1.0, 0.0, -1.0],
                          class_counts=COUNTS, id2label={int(k): v for k, v in CONFIG["id2label"].items()},
                          image_size=32)
    model = BalPoEForImageClassification(config).eval()
    run = root / "tiny-run"
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
    record_report(run / "eval")
    # Things a run directory also holds that must not be published.
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-0001" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "notes.txt").write_text("scratch")
    return run, model


def record_report(folder: Path, owner: Path | None = None) -> None:
    """List the report files in ``folder`` as balpoe-evaluate's in ``owner``'s manifest, as it does."""
    owner = owner or folder.parent
    record_outputs(owner, sorted(folder.glob("report*")), reports=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` by its relative path: to show that a refusal changed nothing."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def mock_hub(mp: pytest.MonkeyPatch) -> dict[str, list]:
    """HfApi.create_repo and HfApi.create_commit replaced by recorders (the commit's files read as they are
    sent); online mode for the check."""
    calls: dict[str, list] = {"create_repo": [], "create_commit": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        sent = {}
        for operation in operations:
            source = operation.path_or_fileobj
            sent[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        calls["create_commit"].append({"repo_id": repo_id, "files": sent, **kwargs})

    mp.setattr(HfApi, "create_repo", create_repo)
    mp.setattr(HfApi, "create_commit", create_commit)
    mp.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return calls


def push_mocked(run: Path, repo_id: str, folder: Path) -> dict:
    """Push ``run`` with the Hub mocked and write what was sent into ``folder``, a 'Hub repository'."""
    with pytest.MonkeyPatch.context() as mp:
        calls = mock_hub(mp)
        url = hub.push_to_hub(run, repo_id, token="hf_not_a_real_token")
    sent = calls["create_commit"][0]["files"]
    for name, content in sent.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return {"url": url, "calls": calls, "uploaded": sorted(sent), "sent": sent, "repo": folder}


def pixels_of(run: Path) -> tuple[list, torch.Tensor]:
    """Four stand-ins for a user's images and their pixels by the processor saved in ``run``."""
    from transformers import AutoImageProcessor

    images = [Image.new("RGB", (40, 28), (30 * i, 200 - 40 * i, 90)) for i in range(4)]
    processor = AutoImageProcessor.from_pretrained(run)
    return images, processor(images=images, return_tensors="pt")["pixel_values"]
