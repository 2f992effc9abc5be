"""Hub publishing: the model card, the folder checks and push_to_hub, all offline.

The only mocks are HfApi.create_repo and HfApi.upload_folder (the network boundary); everything else
(card rendering, ModelCard parsing, the upload file filter, loading the folder back) runs for real.
"""

import json
import re

import pytest
from huggingface_hub import ModelCard

from balpoe_hf import hub

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
