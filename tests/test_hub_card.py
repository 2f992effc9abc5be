"""The model card: rendered from a run's config, recipe and evaluation, parsed back by huggingface_hub's
ModelCard, and the cards of real (tiny) runs of three methods, whose usage code runs where the package
cannot be imported and whose page renders as the Hub shows it. All offline.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import copy_run
from hub_helpers import CONFIG, EVAL, IMAGES, SHIFTS, metrics_by_name, pixels_of, push_mocked
from huggingface_hub import ModelCard
from PIL import Image

from balpoe_hf import BalPoEForImageClassification, build_image_processor, hub
from balpoe_hf.errors import HubFolderError


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
    assert data.balpoe["imbalance_ratio"] == 50.0
    # The recipe sets the balpoe preset's settings (3 experts, 1 / 0 / -1, mixup on): named so.
    assert data.balpoe["method"] == "balpoe"
    assert data.balpoe["backbone"] == "resnet20_cifar"
    assert data.balpoe["recipe"] == "cifar10-lt-ir50"
    assert data.model_name == "tiny-balpoe"
    metrics = metrics_by_name(loaded)
    assert metrics[("test", "Balanced accuracy")] == 0.75
    assert metrics[("test", "Accuracy")] == 0.81
    assert metrics[("test", "Many-shot accuracy")] == 0.9
    assert metrics[("test", "Medium-shot accuracy")] == 0.7
    assert metrics[("test", "Expected calibration error (ECE)")] == 0.034
    # An empty shot group (None) is reported as n/a in the body, never as a number in the metadata.
    assert ("test", "Few-shot accuracy") not in metrics
    # The metadata holds the balanced test set only; the shifted sets are in the body.
    assert {r.dataset_split for r in data.eval_results} == {"test"} and len(metrics) == 5
    text = loaded.text
    # First the model, its data and its result, then how to call it.
    first = text.split("## Model")[0]
    assert "**Balanced test set**" in first and "balanced accuracy **75.00 %**, ECE **3.40 %**" in first
    assert "trained with mixup (alpha 0.8)" in first and "5 classes, 500 down to 10 training images" in first
    assert 'pipeline("image-classification", model="me/tiny-balpoe", trust_remote_code=True)' in first
    assert 'target_prior="auto"' in first and 'target_prior="train"' in first
    # The balanced-set metrics: one header row and one value row, in BALANCED_METRICS order.
    assert "| Balanced acc. % | Accuracy % | Many % | Medium % | Few % | ECE % |" in text
    assert "| 75.00 | 81.00 | 90.00 | 70.00 | n/a | 3.40 |" in text
    # The shift table: one row per test distribution, one column per prior mode.
    assert "| Test distribution | none | oracle |" in text
    assert "| forward50 | 80.00 | 85.00 |" in text and "| backward50 | 70.00 | 78.00 |" in text
    assert "| 4 | yak | 10 |" in text
    assert "![Training images per class](images/class_counts.png)" in text
    assert 'repo = "me/tiny-balpoe"' in text and "from_pretrained(repo, trust_remote_code=True)" in text
    assert "| Schedule | 200 epochs," in text
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
    assert "class_counts" not in card.data.balpoe  # config.json holds them, not the small header
    assert "100 classes, 1,001 down to 7 training images per class (imbalance ratio 143)" in card.text
    assert "| 99 | c99 |" not in card.text
    assert "[`config.json`](config.json)" in card.text


def test_card_needs_class_counts():
    with pytest.raises(HubFolderError, match="class_counts"):
        hub.render_model_card({**CONFIG, "class_counts": []}, images=IMAGES)


def test_template_ships_with_the_package():
    path = hub.template_path()
    assert path.name == "modelcard_template.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n{{ card_data }}\n---")


def test_usage_snippets_are_valid_python():
    card = hub.render_model_card(CONFIG, images=IMAGES, repo_id="me/tiny-balpoe")
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    assert len(blocks) == 3  # the first screen's, the pipeline on the reader's images, the model
    assert len(blocks[0].strip().splitlines()) == 6  # an import, a blank line, the pipeline and 3 calls
    for block in blocks:
        compile(block, "<card>", "exec")


def test_check_refuses_pickle_weights_and_lists_every_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not safetensors")
    with pytest.raises(HubFolderError) as error:
        hub.check_hub_folder(tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message
    assert "no weights" in message
    assert "auto_map" in message
    assert "preprocessor_config.json" in message
    assert "README.md" in message


def test_the_method_is_named_from_the_run_settings():
    # The main job's recipe (fashion-mnist-lt-quick) sets balpoe-erm's settings without --method.
    quick = {"num_experts": 3, "lambdas": [1.0, 0.0, -1.0], "loss": "balpoe", "remove_mean_lambda": True}
    assert hub.run_method(quick, {"mixup_alpha": 0.0}) == "balpoe-erm"
    assert hub.run_method(quick, {"mixup_alpha": 0.8}) == "balpoe"
    assert hub.run_method(quick) is None  # mixup unknown: balpoe or balpoe-erm
    one = {"num_experts": 1, "lambdas": [1.0], "loss": "balpoe"}
    assert hub.run_method({**one, "remove_mean_lambda": False}, {}) == "ce"
    assert hub.run_method({**one, "remove_mean_lambda": True}, {}) == "ce-la"
    assert hub.run_method({**one, "lambdas": [0.0], "loss": "lade"}, {}) == "lade"
    assert hub.run_method({**quick, "lambdas": [1.0, 0.5, -1.0]}, {"mixup_alpha": 0.0}) is None
    assert hub.run_method({**quick, "method": "bs"}) == "bs"  # --method is the config's word
    rows = dict(hub.describe_run(quick, {"mixup_alpha": 0.0})["rows"])
    assert rows["Method"] == ("`balpoe-erm` (BalPoE 1/0/-1 without mixup: the recipe's own settings are "
                              "this preset's)")


def test_schedule_states_the_experts_learning_rate_and_weight_decay():
    recipe = {"epochs": 4, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine", "warmup_epochs": 0.5,
              "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "scale_expert_lr": True,
              "num_experts": 3}
    assert dict(hub.describe_run(CONFIG, recipe)["rows"])["Schedule"] == (
        "4 epochs, batch 128, SGD lr 0.1 (cosine, 0.5 warm-up epochs), Nesterov momentum 0.9, weight decay "
        "0.0005; the experts' own layers at 3 x lr = 0.3 with weight decay 0.0005 / 3")


@pytest.mark.parametrize("evaluated", ["test.parquet", "big.parquet"])
def test_card_names_the_data_its_report_evaluated(evaluated):
    # The report's numbers are the card's: a report of balpoe-evaluate --test-file big.parquet names that
    # file, not the recipe's test set; the training data stays the recipe's.
    recipe = {"name": "run", "train_file": ["/data/train.parquet"], "test_file": ["/data/test.parquet"]}
    card = hub.render_model_card(CONFIG, EVAL, {**SHIFTS, "dataset": evaluated, "num_test_samples": 600},
                                 recipe=recipe, images=IMAGES)
    (results,) = [line for line in card.text.splitlines() if line.startswith("**Balanced test set**")]
    assert f"(`{evaluated}`, 600 images)" in results
    assert {result.dataset_name for result in card.data.eval_results} == {f"{evaluated} (balanced test set)"}
    # The run's own table still says what it trained and tested on.
    assert "| Test data | `test.parquet` |" in card.text and "`train.parquet`" in card.text


def test_published_recipe_names_files_not_paths(tmp_path):
    (tmp_path / "lists").mkdir()
    run = {"name": "custom", "description": "my run (overridden: data_root=/home/me/imagenet, train_list)",
           "train_list": "/home/me/lists/ImageNet_LT_train.txt", "test_list": "lists/ImageNet_LT_test.txt",
           "data_root": "/home/me/imagenet", "train_file": None, "epochs": 90}
    text, named = hub.folder._published_recipe(yaml.safe_dump(run, sort_keys=False))
    published = yaml.safe_load(text)
    assert published == {**run, "description": "my run (overridden: data_root=imagenet, train_list)",
                         "train_list": "ImageNet_LT_train.txt", "test_list": "ImageNet_LT_test.txt",
                         "data_root": "imagenet"}
    assert set(named) == {run["train_list"], run["test_list"], run["data_root"]}


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
def run_cards(tiny_data, tmp_path_factory) -> dict[str, dict]:
    """Three runs trained by balpoe-train, evaluated by balpoe-evaluate and rendered by prepare_hub_folder."""
    from balpoe_hf import cli

    root = tmp_path_factory.mktemp("card_runs")
    train_file, test_file = tiny_data
    torch.set_num_threads(1)
    cards = {}
    for method, flags in RUNS.items():
        run = root / "runs" / method
        assert cli.train_main([*COMMON_FLAGS, *flags, "--train-file", str(train_file), "--test-file",
                               str(test_file), "--output-dir", str(run)]) == 0
        priors = "all" if "--holdout-fraction" in flags else "none,oracle,auto"
        assert cli.evaluate_main(["--model", str(run), "--shifts", "forward5,uniform,backward5", "--prior",
                                  priors, "--output", str(run / "eval" / "report.json")]) == 0
        folder = hub.prepare_hub_folder(run, f"me/run-{method}")
        cards[method] = {"run": run, "folder": folder, "text": (run / "README.md").read_text(),
                         "data": train_file.parent}
    return cards


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


@pytest.mark.parametrize("method", list(RUNS))
def test_push_uploads_nothing_that_names_this_machine(run_cards, method, tmp_path):
    """Every file push would upload, as it would be sent: no absolute path, no home directory, none of the
    run's data paths (the run was trained and evaluated with absolute ones)."""
    card = run_cards[method]
    pushed = push_mocked(card["run"], f"me/run-{method}", tmp_path / "repo")
    local = {str(card["data"]), str(card["data"].resolve()), str(card["run"].resolve()), str(Path.home()),
             str(card["run"].parents[2])}
    assert {"recipe.yaml", "eval/report.json", "config.json", "README.md"} <= set(pushed["sent"])
    for name, content in pushed["sent"].items():
        assert not [path for path in local if path.encode() in content], name
        if name.endswith((".json", ".yaml", ".md", ".py")):
            assert not ABSOLUTE_PATH.findall(content.decode()), name
    # The run keeps its paths (for --resume and balpoe-evaluate); the Hub gets the recipe with file names.
    kept = yaml.safe_load((card["run"] / "recipe.yaml").read_text())
    published = yaml.safe_load(pushed["sent"]["recipe.yaml"])
    assert kept["train_file"] == [str(card["data"] / "train.parquet")]
    assert (published["train_file"], published["test_file"]) == (["train.parquet"], ["test.parquet"])
    assert {k: v for k, v in published.items() if k not in ("train_file", "test_file")} == \
        {k: v for k, v in kept.items() if k not in ("train_file", "test_file")}
    report = json.loads(pushed["sent"]["eval/report.json"])
    assert (report["model"], report["dataset"]) == (method, "test.parquet")


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
    assert "Trained on `train.parquet` made long-tailed for 2 epochs: 4 classes, 24 down to 3" in text
    assert "| 3 | yellow | 3 |" in text
    assert (data.balpoe["method"], data.balpoe["epochs"]) == ("balpoe-erm", 2)
    assert data.balpoe["mixup_alpha"] == 0.0 and data.balpoe["backbone"] == "resnet20_cifar"
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
    assert "the **cross-entropy with post-hoc logit adjustment (Menon et al., ICLR 2021)** baseline " \
           "(`ce-la`)" in text
    body = text.split("---\n", 2)[2].split("## How to use")[0]
    assert "one `resnet20_cifar` network" in body and "expert" not in body
    assert "| Loss | cross-entropy `CE(z, y)` |" in text
    assert "| Prediction | `z - log pi + log pi_target`;" in text
    assert "| Mixup | off |" in text and "with mixup" not in text
    assert (data.balpoe["method"], data.balpoe["num_experts"], data.balpoe["lambdas"]) == ("ce-la", 1, [1.0])


def _shift_table(text: str) -> tuple[list[str], dict[str, list[float]]]:
    """The card's label-shift table: its prior-mode columns and {test distribution: accuracies}."""
    heads = re.search(r"^\| Test distribution \| (.*) \|$", text, flags=re.MULTILINE).group(1).split(" | ")
    rows = re.findall(r"^\| ((?:forward|backward)\d+|uniform) \| (.*) \|$", text, flags=re.MULTILINE)
    return heads, {shift: [float(v) for v in values.split(" | ")] for shift, values in rows}


@pytest.mark.parametrize("method,all_modes", [("balpoe-erm", True), ("balpoe", False), ("ce-la", True)])
def test_card_shift_table_holds_three_prior_modes(run_cards, method, all_modes):
    card = run_cards[method]
    text = card["text"]
    report = json.loads((card["run"] / "eval" / "report.json").read_text())
    from balpoe_hf.evaluation.shifts import PRIOR_MODES

    # The report keeps every mode; the card shows three, from the report.
    assert len(report["shift_accuracy"]) == (len(PRIOR_MODES) if all_modes else 3)
    unknown = "auto"
    body = text.split("## How to use")[0]
    heads, rows = _shift_table(body)
    assert [head.split(" (")[0] for head in heads] == ["none", "oracle", unknown]
    assert list(rows) == ["forward5", "uniform", "backward5"]
    for shift, values in rows.items():
        expected = [100 * report["shift_accuracy"][mode][shift] for mode in ("none", "oracle", unknown)]
        assert values == pytest.approx(expected, abs=0.005)
    assert "Columns: `none` predicts for the uniform prior" in body
    assert f"; `{unknown}` for the distribution estimated from the unlabeled test images" in body
    assert "[`eval/report.json`](eval/report.json)" in body
    # The first screen's label-shift line: the unknown mode's gain over none, by hand from the report.
    gains = [100 * (report["shift_accuracy"][unknown][s] - report["shift_accuracy"]["none"][s])
             for s in ("forward5", "backward5")]
    first = body.split("```python")[0]
    assert f"changes top-1 accuracy by **{sum(gains) / 2:+.2f} points** on average" in first
    assert f"(from {min(gains):+.2f} to {max(gains):+.2f})" in first
    # The metadata: the balanced test set's metrics only.
    eval_results = card["folder"].card.data.eval_results
    assert len(eval_results) == 9 and {r.dataset_split for r in eval_results} == {"test"}
    model_snippet = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[2]
    assert "adapt_to_unlabeled(pixel_values)" in model_snippet and "estimate_target_prior" not in text


def test_card_front_matter_stays_small_for_the_full_grid():
    from balpoe_hf.data.splits import ALL_SHIFTS
    from balpoe_hf.evaluation.shifts import PRIOR_MODES

    grid = {"shift_accuracy": {mode: dict.fromkeys(ALL_SHIFTS, 0.5) for mode in PRIOR_MODES}}
    card = hub.render_model_card(CONFIG, EVAL, grid, images=IMAGES)
    assert len(card.data.eval_results) == len(EVAL) - 1  # the balanced set's; few-shot is None
    # The 11 x 9 grid took 680 lines, its 3 x 11 model-index entries 250: the header is now 53 lines.
    assert len(_front_matter(str(card)).splitlines()) < 60
    heads, rows = _shift_table(card.text)
    assert heads == ["none", "oracle", "auto"] and list(rows) == list(ALL_SHIFTS)
    assert "em-bcts |" not in card.text


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


# The user's own images that the card's snippets name (`images`, "image.png"), and the transformers round
# trip of the pushed folder's model: save, reload, one Trainer step, save, reload, push; every folder saved
# complete (the processor, the pipeline's code) and predicting as the model that was saved.
USERS_IMAGES = """from PIL import Image
images = [Image.new("RGB", (20, 24), (30 * i, 200 - 20 * i, 90)) for i in range(8)]
images[0].save("image.png")
"""
ROUND_TRIP = """import os
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
import transformers.utils.hub
from transformers import Trainer, TrainingArguments

def predict(folder):
    loaded = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules.")
    with torch.no_grad():
        return loaded, loaded(pixels, target_prior="uniform").logits

COMPLETE = {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_balpoe.py",
            "modeling_balpoe.py", "pipeline_balpoe.py", "processing.py", "label_shift.py"}
model.save_pretrained("resaved")
assert COMPLETE <= set(os.listdir("resaved")), sorted(os.listdir("resaved"))
assert open("resaved/preprocessor_config.json").read() == open(repo + "/preprocessor_config.json").read()
reloaded, logits = predict("resaved")
with torch.no_grad():
    assert torch.equal(logits, model(pixels, target_prior="uniform").logits)
classifier = pipeline("image-classification", model="resaved", trust_remote_code=True, top_k=None)
scores = {row["label"]: row["score"] for row in classifier(images[0], target_prior="train")}
with torch.no_grad():
    train_probs = reloaded(processor(images=images[:1], return_tensors="pt")["pixel_values"],
                           target_prior="train").logits.softmax(-1)[0]
assert all(abs(scores[model.config.id2label[i]] - float(p)) < 1e-5 for i, p in enumerate(train_probs))

data = [{"pixel_values": pixels[i], "labels": torch.tensor(i % model.config.num_labels)}
        for i in range(len(pixels))]
args = TrainingArguments(output_dir="trainer", use_cpu=True, report_to="none", max_steps=1,
                         per_device_train_batch_size=4, learning_rate=0.05, save_strategy="no",
                         disable_tqdm=True)
trainer = Trainer(model=reloaded, args=args, train_dataset=data)
trainer.train()
trainer.save_model("trained")
assert COMPLETE <= set(os.listdir("trained")), sorted(os.listdir("trained"))
reloaded.eval()
with torch.no_grad():
    stepped = reloaded(pixels, target_prior="uniform").logits
assert not torch.equal(stepped, logits)  # the step changed the model
again, logits_again = predict("trained")
assert torch.equal(logits_again, stepped)

sent = {}
def create_repo(self, repo_id, **kwargs):
    return RepoUrl(f"https://huggingface.co/{repo_id}")
def create_commit(self, repo_id, operations, **kwargs):
    sent.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})
HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
transformers.utils.hub.create_and_tag_model_card = lambda *args, **kwargs: ModelCard("---\\n---\\n")
again.push_to_hub("me/round-trip", token="hf_not_a_real_token")
assert COMPLETE <= set(sent), sorted(sent)
assert sent["model.safetensors"] == open("trained/model.safetensors", "rb").read()
print("round trip")
"""


# The Space of `balpoe-push --demo` (its app.py, MODEL_ID pointed at the run): builds the page, loads the
# model's remote code and classifies the reader's first image under the training prior.
SPACE_APP = """import runpy
space = runpy.run_path("space/app.py", run_name="space")  # not __main__: builds the page, does not launch
assert type(space["demo"]).__name__ == "Blocks"
space_model, space_processor = space["load_pretrained"](space["MODEL_ID"], "cpu")
assert type(space_model).__module__.startswith("transformers_modules.")
prediction = space["classify"](space_model, space_processor, ["image.png"], "training")
print("space", *prediction.top()[0][0])
"""


def _space_folder(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` with the Space files of ``balpoe-push --demo``, and ``tmp_path/space/app.py``: the
    Space's app.py with its model id pointed at the copy."""
    from balpoe_hf.demo import write_space_files

    folder = copy_run(run, tmp_path / "space-run")
    app = write_space_files(folder, "me/space-run")[0].read_text()
    assert "MODEL_ID = 'me/space-run'" in app
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "app.py").write_text(app.replace("MODEL_ID = 'me/space-run'",
                                                           f"MODEL_ID = {str(folder)!r}"))
    return folder


def test_card_snippets_the_round_trip_and_the_space_run_without_the_package(run_cards, hub_snapshot,
                                                                           saved_run, tmp_path):
    """Every card's usage code, with its Hub id pointed at the uploaded folder, in a Python without
    balpoe_hf, on stand-ins for the reader's images: the pipeline with every kind of target prior, the
    remote-code model, a known prior and adapt_to_unlabeled (auto and em). The remote-code model (and base
    model and config) of the pushed folder compute the logits of the model that was saved; then the round
    trip of that model (ROUND_TRIP) and, with the demo extra installed, the Space's app (SPACE_APP), whose
    answer is that of the model under its training prior. No module of the package is loaded. (One Python
    for all of it: its imports are most of its time.)"""
    _, saved_model = saved_run
    _, pixels = pixels_of(hub_snapshot["repo"])
    torch.save(pixels, tmp_path / "pixels.pt")
    folders = {"me/tiny-balpoe": hub_snapshot["repo"],
               **{f"me/run-{method}": card["run"] for method, card in run_cards.items()}}
    lines = [f"REPO = {str(Path(__file__).resolve().parents[1])!r}", HIDE_THE_PACKAGE, USERS_IMAGES]
    for repo_id, folder in folders.items():
        text = (folder / "README.md").read_text()
        snippets = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
        assert len(snippets) == 3 and all(f'"{repo_id}"' in snippet for snippet in snippets)
        lines += [snippet.replace(f'"{repo_id}"', repr(str(folder))) for snippet in snippets]
        lines += [f"repo = {str(folder)!r}",
                  "assert len(adapted) == len(images) == 8 and 0 <= changed <= 8",
                  "assert predictions.shape == (8,) and abs(float(estimate.prior.sum()) - 1) < 1e-6",
                  # A call with a prior leaves the model's own (uniform) prior alone.
                  "assert classifier.model.config.target_prior is None",
                  "assert classifier(images[0]) == balanced[0]",
                  "print('ran', repo)"]
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
                      f"    torch.save(base(pixels).expert_logits, {str(tmp_path / 'expert_logits.pt')!r})",
                      ROUND_TRIP]
    space = None
    if importlib.util.find_spec("gradio") is not None:  # the demo extra
        space = _space_folder(run_cards["balpoe-erm"]["run"], tmp_path)
        lines.append(SPACE_APP)
    lines.append("assert not [m for m in sys.modules if m.split('.')[0] == 'balpoe_hf'], 'balpoe_hf loaded'")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ran ") == len(folders) and "round trip" in result.stdout
    with torch.no_grad():
        expected = saved_model(pixels)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "expert_logits.pt"), expected.expert_logits, rtol=0,
                               atol=1e-6)
    if space is not None:
        model = BalPoEForImageClassification.from_pretrained(space).eval()
        pixels = build_image_processor(model.config)(images=[Image.open(tmp_path / "image.png")],
                                                     return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probabilities = model(pixels, target_prior="train").logits.softmax(-1)[0]
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("space ")]
        label, probability = line.split()[1:]
        assert label == model.config.id2label[int(probabilities.argmax())]
        assert float(probability) == pytest.approx(float(probabilities.max()), abs=1e-5)


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


def test_card_says_what_auto_rests_on_with_and_without_a_held_out_calibration():
    calibration = {"temperature": 1.2, "bias": [0.1, -0.1, 0.0, 0.2, -0.2], "bias_std": 0.2,
                   "ts_temperature": 1.1, "holdout_counts": [50, 30, 20, 10, 5],
                   "confusion": [[50, 0, 0, 0, 0], [0, 30, 0, 0, 0], [0, 0, 20, 0, 0], [0, 0, 0, 10, 0],
                                 [0, 0, 0, 0, 5]]}

    def usage(config):
        text = hub.render_model_card(config, EVAL, repo_id="me/tiny-balpoe").text
        return " ".join(text.split("## How to use")[1].split("## Limits")[0].split())  # unwrapped

    raw = usage(CONFIG)
    assert "trained without a held-out split, so the estimate reads its raw posteriors" in raw
    assert "`adapt_to_unlabeled` warns when it moves the prior" in raw
    calibrated = usage({**CONFIG, "calibration": calibration})
    assert "rests on the calibration that a held-out split of its training data measured" in calibrated
    assert "raw posteriors" not in calibrated
