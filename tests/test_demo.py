"""The demo: its prediction function, the Gradio app through Gradio's own client, the Space files of
``balpoe-push --demo`` (the Space's app.py runs without balpoe-hf installed in tests/test_hub_card.py, in the
Python that runs the model card's code), ``balpoe-demo`` and, with ``-m browser``, the page in headless
chromium.

The model is a 3-expert ResNet-20 trained here for a few seconds on the four colours of
``train_synthetic`` (red, green, blue, yellow; 32/16/8/4 training images), so every image's class is known;
the expected probabilities are computed by hand from the model's uniform-prior logits.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import tomllib
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image
from train_synthetic import CLASS_NAMES, COLOURS, SIZE, TRAIN_COUNTS

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, build_image_processor, cli
from balpoe_hf.demo import (
    PRIOR_CHOICES,
    SPACE_FILES,
    classify,
    load_demo_model,
    slider_prior,
    write_space_files,
)
from balpoe_hf.errors import HubFolderError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TRAINING_PRIOR = [c / sum(TRAIN_COUNTS) for c in TRAIN_COUNTS]  # 32/60, 16/60, 8/60, 4/60


def _colour_image(label: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(COLOURS[label], dtype=float)[None, None, :] + rng.normal(0, 10, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> dict:
    """The colour model saved as a run (weights, config, code, image processor) and test images as PNG
    files, drawn apart from the training images: ``images[name]`` is a list of paths of that colour."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, lambdas=[1.0, 0.0, -1.0],
                          class_counts=TRAIN_COUNTS, id2label=dict(enumerate(CLASS_NAMES)), image_size=SIZE)
    model = BalPoEForImageClassification(config)
    processor = build_image_processor(config)
    labels = torch.arange(4).repeat_interleave(8)
    images = [_colour_image(int(label), rng) for label in labels]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(40):  # balanced batches: every colour learnt in about 3 s
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    run = tmp_path_factory.mktemp("demo") / "colours"
    model.save_pretrained(run)
    folder = run.parent / "images"
    folder.mkdir()
    images = {name: [] for name in CLASS_NAMES}
    for label, name in enumerate(CLASS_NAMES):
        for index in range(6):
            path = folder / f"{name}-{index}.png"
            _colour_image(label, rng).save(path)
            images[name].append(path)
    loaded, loaded_processor = load_demo_model(run, "cpu")
    return {"run": run, "images": images, "model": loaded, "processor": loaded_processor}


def _uniform_logits(run: dict, paths: list[Path]) -> torch.Tensor:
    """The model's own logits for a balanced test set, through its image processor: what the hand
    computations start from."""
    images = [Image.open(path).convert("RGB") for path in paths]
    pixels = run["processor"](images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return run["model"](pixel_values=pixels, target_prior="uniform").logits.double()


def _by_hand(logits: torch.Tensor, prior: list[float]) -> torch.Tensor:
    """Bayes' rule for a new prior: ``p(c | x) ∝ exp(z_c) * prior_c`` (the uniform-prior logits ``z``)."""
    weighted = logits.exp() * torch.tensor(prior, dtype=torch.float64)
    return weighted / weighted.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- the prediction, without Gradio


def test_the_colours_are_classified_under_the_uniform_prior(colour_run):
    paths = [colour_run["images"][name][0] for name in CLASS_NAMES]
    prediction = classify(colour_run["model"], colour_run["processor"], paths, "uniform")
    assert [top[0][0] for top in prediction.top()] == CLASS_NAMES
    assert prediction.names == [path.name for path in paths]
    assert prediction.labels == CLASS_NAMES
    assert len(prediction.top()[0]) == 4  # top-5 of a 4-class model: every class, most probable first
    torch.testing.assert_close(prediction.prior, torch.full((4,), 0.25, dtype=torch.float64))
    expected = _by_hand(_uniform_logits(colour_run, paths), [0.25] * 4)
    torch.testing.assert_close(prediction.probabilities, expected, rtol=1e-6, atol=1e-12)


def test_training_prior_is_the_training_counts_normalised(colour_run):
    model, processor = colour_run["model"], colour_run["processor"]
    paths = [path for name in CLASS_NAMES for path in colour_run["images"][name][:2]]
    prediction = classify(model, processor, paths, "training")
    torch.testing.assert_close(prediction.prior, torch.tensor(TRAINING_PRIOR, dtype=torch.float64))
    expected = _by_hand(_uniform_logits(colour_run, paths), TRAINING_PRIOR)
    torch.testing.assert_close(prediction.probabilities, expected, rtol=1e-6, atol=1e-12)
    # The same as the model's own "train" target prior, and the model's prior is left as it was.
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        own = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
                    target_prior="train").logits.double().softmax(-1)
    torch.testing.assert_close(prediction.probabilities, own, rtol=1e-5, atol=1e-12)
    assert model.config.target_prior is None


def test_a_prior_concentrated_on_one_class_makes_it_top_1(colour_run):
    paths = [colour_run["images"][name][0] for name in CLASS_NAMES]
    prediction = classify(colour_run["model"], colour_run["processor"], paths, "sliders", [0, 0, 2.5, 0])
    # exp(z) * prior is 0 for every class but blue: blue with probability 1, whatever the image.
    assert [top[0] for top in prediction.top()] == [("blue", 1.0)] * 4
    # Weights 1, 1, 2, 4 normalised: 1/8, 1/8, 2/8, 4/8.
    weighted = classify(colour_run["model"], colour_run["processor"], paths, "sliders", [1, 1, 2, 4])
    torch.testing.assert_close(weighted.prior, torch.tensor([0.125, 0.125, 0.25, 0.5], dtype=torch.float64))
    expected = _by_hand(_uniform_logits(colour_run, paths), [0.125, 0.125, 0.25, 0.5])
    torch.testing.assert_close(weighted.probabilities, expected, rtol=1e-6, atol=1e-12)


def test_slider_weights_are_checked():
    torch.testing.assert_close(slider_prior([3, 1], 2), torch.tensor([0.75, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="every class weight is 0"):
        slider_prior([0, 0, 0], 3)
    with pytest.raises(ValueError, match="non-negative"):
        slider_prior([1, -1], 2)
    with pytest.raises(ValueError, match="3 class weights for a model of 2 classes"):
        slider_prior([1, 1, 1], 2)


def test_estimated_prior_is_the_models_own_estimate_of_the_batch(colour_run):
    """On 6 red and 3 blue images the prior in use is what ``model.adapt_to_unlabeled`` (``auto``) gives on
    them: red above blue above the two classes not in the batch, the model's own prior left alone."""
    paths = [*colour_run["images"]["red"][:6], *colour_run["images"]["blue"][:3]]
    prediction = classify(colour_run["model"], colour_run["processor"], paths, "estimated")
    prior = prediction.prior
    pixel_values = colour_run["processor"](images=[Image.open(path).convert("RGB") for path in paths],
                                           return_tensors="pt")["pixel_values"]
    own = colour_run["model"].adapt_to_unlabeled(pixel_values, set_prior=False)
    torch.testing.assert_close(prior, own.prior, rtol=0, atol=1e-9)
    assert prior[0] > prior[2] > max(prior[1], prior[3]) and colour_run["model"].config.target_prior is None
    assert prediction.note.startswith("Estimated with `auto` on 9 images")
    # The colour model has no held-out calibration: the note says what the estimate read.
    assert "trained without a held-out split, so the estimate read its raw posteriors" in prediction.note


def test_estimated_prior_from_too_few_images_stays_uniform_and_says_so(colour_run):
    paths = colour_run["images"]["red"][:2]  # fewer images than classes
    prediction = classify(colour_run["model"], colour_run["processor"], paths, "estimated")
    torch.testing.assert_close(prediction.prior, torch.full((4,), 0.25, dtype=torch.float64))
    assert "prior stays uniform" in prediction.note and "2 unlabelled images for 4 classes" in prediction.note


def test_bad_uploads_get_a_message(colour_run, tmp_path):
    model, processor = colour_run["model"], colour_run["processor"]
    with pytest.raises(ValueError, match="no images"):
        classify(model, processor, [], "uniform")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt is not an image that PIL can read"):
        classify(model, processor, [tmp_path / "notes.txt"], "uniform")
    with pytest.raises(ValueError, match="unknown target prior 'balanced'"):
        classify(model, processor, colour_run["images"]["red"][:1], "balanced")


# --------------------------------------------------------------------------- the app, through gradio_client


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _by_the_app(host: str) -> tuple[str, bool]:
    """``host`` and whether the app contacts it: not the test's ``gradio_client.Client``, whose
    huggingface_hub headers fetch a registry from huggingface.co when the Hub is not offline."""
    return host, not any(frame.filename.endswith(os.path.join("gradio_client", "client.py"))
                         for frame in traceback.extract_stack())


@pytest.fixture(scope="module")
def served(colour_run, tmp_path_factory):
    """The demo launched on a free local port, a ``gradio_client.Client`` on it, and every host the process
    resolved or connected to while it ran (Gradio's analytics and version checks must stay off)."""
    pytest.importorskip("gradio")
    contacted: list[tuple[str, bool]] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def recording_connect(self, address):
        if isinstance(address, tuple):
            contacted.append(_by_the_app(str(address[0])))
        return connect(self, address)

    def recording_getaddrinfo(host, *args, **kwargs):
        contacted.append(_by_the_app(host.decode() if isinstance(host, bytes) else str(host)))
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", recording_connect)
        mp.setattr(socket, "getaddrinfo", recording_getaddrinfo)
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        from gradio_client import Client

        from balpoe_hf.demo import build_demo

        demo = build_demo(colour_run["model"], colour_run["processor"], name="colours")
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            # The test's client sends no telemetry either (its analytics_enabled=False alone is not enough).
            mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
            client = Client(url, verbose=False, analytics_enabled=False)
            yield {"client": client, "url": url, "contacted": contacted, "demo": demo}
        finally:
            demo.close()


def _predict(served, paths, prior, weights=(1, 1, 1, 1)):
    from gradio_client import handle_file

    return served["client"].predict([handle_file(str(p)) for p in paths], prior, *weights,
                                    api_name="/classify")


def test_app_classifies_uploads_under_each_prior(served, colour_run):
    paths = [colour_run["images"][name][1] for name in CLASS_NAMES]
    logits = _uniform_logits(colour_run, paths)
    for prior, weights, probabilities in (
            ("uniform", (1, 1, 1, 1), [0.25] * 4),
            ("training", (1, 1, 1, 1), TRAINING_PRIOR),
            ("sliders", (0, 0, 0, 7), [0, 0, 0, 1])):
        top, table, note, plot = _predict(served, paths, prior, weights)
        expected = _by_hand(logits, probabilities)
        # The label: the first image's classes, most probable first, with the probabilities of Bayes' rule.
        confidences = [c["confidence"] for c in top["confidences"]]
        assert confidences == sorted(confidences, reverse=True) and len(confidences) == 4
        shown = torch.tensor([c["confidence"] for c in sorted(top["confidences"],
                                                              key=lambda c: CLASS_NAMES.index(c["label"]))])
        torch.testing.assert_close(shown.double(), expected[0], rtol=1e-6, atol=1e-12)
        # The table: one row per image, its top class first.
        assert table["headers"] == ["image", "top-1", "top-2", "top-3", "top-4"]
        assert [row[0] for row in table["data"]] == [p.name for p in paths]
        assert [row[1].split(" (")[0] for row in table["data"]] == [CLASS_NAMES[int(i)] for i in
                                                                  expected.argmax(-1)]
        # The bar plot: the prior in use, class by class.
        assert [row[0] for row in plot["data"]] == CLASS_NAMES
        assert [row[1] for row in plot["data"]] == pytest.approx(probabilities, abs=1e-6)
        assert note
    assert top["label"] == "yellow"  # the last prior holds yellow only
    assert [row[1] for row in table["data"]] == ["yellow (100.0 %)"] * 4


def test_app_estimates_the_prior_of_the_batch(served, colour_run):
    paths = [*colour_run["images"]["green"][:6], *colour_run["images"]["yellow"][:2]]
    top, _, note, plot = _predict(served, paths, "estimated")
    prior = [row[1] for row in plot["data"]]
    assert prior[1] > prior[3] > max(prior[0], prior[2]) and abs(sum(prior) - 1) < 1e-5  # 6 and 2 of 8
    assert note.startswith("Estimated with `auto` on 8 images") and top["label"] == "green"


def test_app_says_what_is_wrong_with_an_upload(served, colour_run, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no images: upload one image or several"):
        _predict(served, [], "uniform")
    with pytest.raises(AppError, match="every class weight is 0"):
        _predict(served, colour_run["images"]["red"][:1], "sliders", (0, 0, 0, 0))


def test_app_shows_the_model_and_every_prior_choice(served):
    config = served["client"].view_api(print_info=False, return_format="dict")
    assert list(config["named_endpoints"]) == ["/classify"]  # the prior's change event is not an API
    page = json.dumps(served["demo"].config)
    assert "BalPoE demo: colours" in page and "3 experts on a shared `resnet20_cifar`" in page
    assert "60 images, 32 to 4 per class (imbalance 8)" in page
    assert all(text in page for text in PRIOR_CHOICES.values())


def test_app_contacts_nothing_but_itself(served, colour_run):
    _predict(served, colour_run["images"]["red"][:1], "uniform")
    assert any(by_app for _, by_app in served["contacted"]), "no connection of the app was seen: the " \
        "recording would prove nothing"
    assert [host for host, by_app in served["contacted"] if by_app and not _loopback(host)] == []


# --------------------------------------------------------------------------- balpoe-push --demo


def _declared(name: str) -> Requirement:
    """``name``'s requirement as pyproject.toml declares it (dependencies or the demo extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["demo"]]
    return next(Requirement(line) for line in lines if Requirement(line).name == name)


def test_push_demo_writes_and_lists_the_space_files(colour_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for path in colour_run["run"].iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    assert cli.push_main([str(run), "me/colours", "--dry-run"]) == 0
    assert "app.py" not in capsys.readouterr().out and not (run / "app.py").exists()
    assert cli.push_main([str(run), "me/colours", "--dry-run", "--demo"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"app.py", "requirements.txt", "model.safetensors", "README.md"} <= set(listed)
    app = (run / "app.py").read_text()
    assert "MODEL_ID = 'me/colours'" in app and "demo = build_demo(MODEL_ID)" in app
    assert "balpoe_hf" not in re.sub(r'""".*?"""|#.*', "", app, flags=re.DOTALL)  # only in prose
    requirements = [Requirement(line) for line in (run / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements == [_declared(name) for name in ("torch", "torchvision", "timm", "transformers",
                                                         "gradio")]
    # Written again for another repository: the files are the package's own, so they are replaced.
    write_space_files(run, "me/colours-2")
    assert "MODEL_ID = 'me/colours-2'" in (run / "app.py").read_text()
    # A later push without --demo does not upload them (they may name another repository).
    assert cli.push_main([str(run), "me/colours", "--dry-run"]) == 0
    assert "app.py" not in capsys.readouterr().out.split()


def test_a_refused_push_leaves_the_folder_as_it_was(colour_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants as hub_constants

    run = tmp_path / "run"
    run.mkdir()
    for path in colour_run["run"].iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert cli.push_main([str(run), "me/colours", "--demo", "--token", "hf_x"]) == 1
    assert "offline mode" in capsys.readouterr().err
    assert not any((run / name).exists() for name in SPACE_FILES)
    # Space files of an earlier push come back as they were, and still count as the package's own.
    write_space_files(run, "me/earlier")
    earlier = (run / "app.py").read_bytes()
    assert cli.push_main([str(run), "me/colours", "--demo", "--token", "hf_x"]) == 1
    assert (run / "app.py").read_bytes() == earlier and (run / "requirements.txt").is_file()
    write_space_files(run, "me/colours")
    # A card problem found after the Space files were written (a README.md of the user's) takes them back too.
    for name in SPACE_FILES:
        (run / name).unlink()
    (run / "README.md").write_text("# my own card\n")
    assert cli.push_main([str(run), "me/colours", "--demo", "--dry-run"]) == 2
    assert "did not write there" in capsys.readouterr().err
    assert not any((run / name).exists() for name in SPACE_FILES)


def test_push_demo_never_replaces_a_users_app(colour_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for path in colour_run["run"].iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    (run / "app.py").write_text("print('mine')\n")
    with pytest.raises(HubFolderError, match=r"holds \['app.py'\], which balpoe-hf did not write"):
        write_space_files(run, "me/colours")
    assert (run / "app.py").read_text() == "print('mine')\n" and not (run / "requirements.txt").exists()
    with pytest.raises(HubFolderError, match="not a Hub repository id"):
        write_space_files(run, "me/not/an/id")
    with pytest.raises(HubFolderError, match="no weights"):
        write_space_files(tmp_path, "me/colours")  # a folder the push would refuse gets nothing
    assert not any((tmp_path / name).exists() for name in SPACE_FILES)


# --------------------------------------------------------------------------- balpoe-demo


def test_demo_command_refuses_what_it_cannot_serve(tmp_path, capsys, monkeypatch):
    assert cli.demo_main([str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
    assert cli.demo_main([str(tmp_path)]) == 2
    assert "pip install 'balpoe-hf[demo]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the page in a browser


@pytest.mark.browser
def test_page_in_headless_chromium(served, colour_run, tmp_path):
    """Debian's chromium loads the page, uploads two images, reads the top class and takes a screenshot."""
    pytest.importorskip("selenium")
    from demo_browser import browser_paths, classify_in_browser

    if browser_paths() is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    images = [colour_run["images"]["green"][2], colour_run["images"]["red"][2]]
    top = classify_in_browser(served["url"], images, tmp_path / "demo.png")
    assert top == "green"
    shot = Image.open(tmp_path / "demo.png")
    assert shot.size[0] == 1280
    # The page is drawn: dark text on a light page.
    assert shot.convert("L").getextrema() == (pytest.approx(0, abs=80), pytest.approx(255, abs=20))
