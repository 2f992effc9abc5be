"""A Gradio app for a BalPoE model: upload images, see the top-5 classes under a chosen target prior.

The target prior is the test label distribution the predictions are adjusted to (``logits + log(C * prior)``,
the model's ``target_prior``): ``uniform`` (a balanced test set), ``training`` (the test set distributed like
the training set), per-class sliders (weights normalised to a distribution) or ``estimated`` from the
uploaded images themselves (``model.adapt_to_unlabeled``). The page shows the top-5 classes of every image and
a bar plot of the prior in use.

This module imports torch, transformers, PIL, pandas and gradio, never ``balpoe_hf``: ``balpoe-push --demo``
copies it as a Hugging Face Space's ``app.py``, where the model comes with its own code
(``trust_remote_code=True``) and balpoe-hf is not installed. In the package, ``balpoe_hf.demo`` exposes it
and ``balpoe-demo`` runs it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

TOP_K = 5
# The choices of the target prior: value -> what the page calls it.
PRIOR_CHOICES = {
    "uniform": "uniform (a balanced test set)",
    "training": "training (distributed like the training set)",
    "sliders": "per-class sliders",
    "estimated": "estimated from the uploaded images",
}
# One slider per class is a usable page up to about this many classes; above it the sliders are left out.
MAX_SLIDER_CLASSES = 100
SLIDER_MAX = 10.0
# Images per forward pass: a large upload is classified in pieces of this size.
BATCH_SIZE = 64
DEMO_EXTRA = "pip install 'balpoe-hf[demo]'"


@dataclass
class Prediction:
    """What the demo shows for a batch of images.

    ``names``: the images, in upload order. ``labels``: the class names, in label-index order.
    ``probabilities``: ``(N, C)`` under ``prior``, the target prior in use (float64 ``(C,)``). ``note``:
    which prior that is and how it was chosen.
    """

    names: list[str]
    labels: list[str]
    probabilities: torch.Tensor
    prior: torch.Tensor
    note: str

    def top(self, k: int = TOP_K) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable classes of each image as ``(label, probability)``, most probable first."""
        values, indices = self.probabilities.topk(min(k, len(self.labels)), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
                for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)]


def load_pretrained(model_id: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """A saved BalPoE model (in eval mode) and its image processor, from a folder or a Hub id.

    Loaded with transformers' Auto classes and ``trust_remote_code=True``: the model's own code runs, so
    balpoe-hf need not be installed. ``device`` defaults to CUDA when there is one.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(model_id)
    return model.to(device).eval(), processor


def class_labels(model: Any) -> list[str]:
    """The model's class names, in label-index order (``config.id2label``)."""
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]


def open_images(files: Sequence[str | os.PathLike | Image.Image]) -> tuple[list[Image.Image], list[str]]:
    """The images as RGB PIL images and their names; a file PIL cannot read is a ``ValueError`` naming it."""
    if not files:
        raise ValueError("no images: upload one image or several.")
    images, names = [], []
    for index, file in enumerate(files):
        if isinstance(file, Image.Image):
            images.append(file.convert("RGB"))
            names.append(f"image {index + 1}")
            continue
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{Path(file).name} is not an image that PIL can read ({error}); upload PNG, "
                             "JPEG or another image format.") from None
        names.append(Path(file).name)
    return images, names


def slider_prior(weights: Sequence[float], num_classes: int) -> torch.Tensor:
    """Per-class weights (any non-negative numbers) normalised to a target prior, float64 ``(C,)``."""
    tensor = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
    if tensor.numel() != num_classes:
        raise ValueError(f"{tensor.numel()} class weights for a model of {num_classes} classes: give one per "
                         "class, in label-index order.")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError("the class weights must be finite and non-negative.")
    if float(tensor.sum()) <= 0:
        raise ValueError("every class weight is 0: set at least one above 0 (the weights are normalised to "
                         "a distribution).")
    return tensor / tensor.sum()


def _estimate_note(estimate: Any, num_images: int) -> str:
    """How ``adapt_to_unlabeled`` arrived at its prior, in a sentence."""
    reason = (estimate.details or {}).get("reason")
    if reason:
        return f"Estimated from the uploaded images: the prior stays uniform. {reason}"
    method = f"`{estimate.method}` on {num_images} images"
    if estimate.kept_uniform:
        return (f"Estimated with {method}: the prior stays uniform, because the shift it found is no larger "
                "than its own uncertainty (these images, the model's calibration).")
    note = (f"Estimated with {method}, and shrunk towards uniform by as much as it is uncertain (these "
            "images, the model's calibration).")
    if (estimate.details or {}).get("no_holdout"):
        note += (" This model was trained without a held-out split, so the estimate read its raw posteriors, "
                 "which lean to the frequent classes on an over-confident model.")
    return note


def _pixel_values(processor: Any, images: list[Image.Image], device: torch.device) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"].to(device)


@torch.no_grad()
def target_prior(model: Any, choice: str, *, weights: Sequence[float] | None = None,
                 pixel_values: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """The target prior that ``choice`` names (float64 ``(C,)``) and a note saying what it is.

    ``uniform``: ``1 / C`` each. ``training``: the training class counts normalised, the model's ``"train"``
    target prior. ``sliders``: ``weights`` normalised. ``estimated``: ``model.adapt_to_unlabeled`` on
    ``pixel_values`` (its default, ``auto``), without changing the model's prior; with too few images it
    keeps the uniform prior and the note says why.
    """
    num_classes = model.config.num_labels
    if choice == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64), (
            "Uniform prior: every class equally likely, as on a balanced test set.")
    if choice == "training":
        counts = model.config.class_counts
        if not counts:
            raise ValueError("this model's config has no class_counts, so it does not know its training "
                             "prior: choose another prior.")
        counts = torch.as_tensor(counts, dtype=torch.float64)
        return counts / counts.sum(), (
            "Training prior: the classes as frequent as in the training set (its class counts, normalised).")
    if choice == "sliders":
        if weights is None:
            raise ValueError("the 'sliders' prior needs one weight per class.")
        return slider_prior(weights, num_classes), "Per-class prior: the sliders' weights, normalised."
    if choice == "estimated":
        if pixel_values is None:
            raise ValueError("the 'estimated' prior needs the images to estimate it from.")
        with warnings.catch_warnings():
            # Too few images: the estimate says so in its details, which the note shows.
            warnings.simplefilter("ignore", UserWarning)
            estimate = model.adapt_to_unlabeled(pixel_values, set_prior=False, batch_size=BATCH_SIZE)
        return estimate.prior.double().cpu(), _estimate_note(estimate, len(pixel_values))
    raise ValueError(f"unknown target prior {choice!r}: choose one of {', '.join(PRIOR_CHOICES)}.")


@torch.no_grad()
def classify(model: Any, processor: Any, files: Sequence[str | os.PathLike | Image.Image],
             prior: str = "uniform", weights: Sequence[float] | None = None) -> Prediction:
    """Classify images under a target prior: the function behind the demo's button, without Gradio.

    ``files``: image paths or PIL images. ``prior``: a key of ``PRIOR_CHOICES``; ``weights``: one per class,
    for ``"sliders"``. The model's own target prior is left as it was (the prior goes to each forward call
    as ``target_prior``), so one model serves concurrent requests with different priors.
    """
    images, names = open_images(files)
    device = next(model.parameters()).device
    pixel_values = _pixel_values(processor, images, device)
    prior_tensor, note = target_prior(model, prior, weights=weights, pixel_values=pixel_values)
    logits = torch.cat([model(pixel_values=batch, target_prior=prior_tensor).logits.double().cpu()
                        for batch in pixel_values.split(BATCH_SIZE)])
    return Prediction(names=names, labels=class_labels(model), probabilities=logits.softmax(-1),
                      prior=prior_tensor, note=note)


def describe_model(model: Any, name: str) -> str:
    """The page's heading and a line on the model: experts, backbone, classes, training counts."""
    config = model.config
    counts = list(config.class_counts or [])
    experts = int(getattr(config, "num_experts", 1) or 1)
    kind = f"{experts} experts on a shared `{config.backbone}`" if experts > 1 else f"one `{config.backbone}`"
    if counts and min(counts) > 0:
        data = (f"trained on {sum(counts):,} images, {max(counts):,} to {min(counts):,} per class "
                f"(imbalance {max(counts) / min(counts):g})")
    else:
        data = "training counts not recorded"
    return (f"# BalPoE demo: {name}\n\nA Balanced Product of Calibrated Experts image classifier ({kind}), "
            f"{config.num_labels} classes, {data}. Upload images (one or a batch), choose the test label "
            "distribution to predict for, and see each image's most probable classes under it.")


def _prior_frame(labels: list[str], prior: torch.Tensor) -> Any:
    import pandas as pd

    return pd.DataFrame({"class": labels, "probability": [round(float(p), 6) for p in prior]})


def _top_table(prediction: Prediction) -> Any:
    import pandas as pd

    top = prediction.top()
    columns = [f"top-{k + 1}" for k in range(len(top[0]))]
    rows = [[name, *(f"{label} ({100 * p:.1f} %)" for label, p in classes)]
            for name, classes in zip(prediction.names, top, strict=True)]
    return pd.DataFrame(rows, columns=["image", *columns])


def require_gradio() -> Any:
    """The ``gradio`` module, or an ``ImportError`` that says how to install it."""
    try:
        import gradio
    except ImportError:
        raise ImportError(f"the demo needs gradio: {DEMO_EXTRA} (or pip install gradio).") from None
    return gradio


def build_demo(model: Any, processor: Any = None, *, name: str | None = None,
               device: str | None = None) -> Any:
    """The demo as a ``gradio.Blocks`` app; ``demo.launch()`` serves it.

    ``model``: a loaded BalPoE model (with ``processor``, its image processor), or a folder or Hub id to
    load with ``load_pretrained`` (on ``device``). ``name``: the page's title (default: the model's folder
    or Hub id). The event ``classify`` (``api_name="classify"``, for ``gradio_client``) takes the image
    files, the prior's key and one weight per class (when the page has sliders) and returns the first
    image's top-5, a table of every image's top-5, a note on the prior and the prior as a bar plot.
    Analytics are off: the app sends nothing anywhere.
    """
    gr = require_gradio()
    if isinstance(model, str | os.PathLike):
        name = name or str(model)
        model, processor = load_pretrained(model, device)
    if processor is None:
        raise ValueError("build_demo needs the model's image processor: pass processor=... "
                         "(AutoImageProcessor.from_pretrained(folder)), or a folder or Hub id to load both.")
    name = name or Path(str(model.config.name_or_path or "BalPoE model")).name
    labels = class_labels(model)
    top_k = min(TOP_K, len(labels))
    use_sliders = len(labels) <= MAX_SLIDER_CLASSES
    choices = [(text, key) for key, text in PRIOR_CHOICES.items() if use_sliders or key != "sliders"]

    def run(files: list[str] | None, choice: str, *weights: float) -> tuple[Any, ...]:
        try:
            prediction = classify(model, processor, files or [], choice, weights if use_sliders else None)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        first = dict(prediction.top()[0])
        return (first, _top_table(prediction), prediction.note, _prior_frame(labels, prediction.prior))

    with gr.Blocks(title=f"BalPoE demo: {name}", analytics_enabled=False) as demo:
        gr.Markdown(describe_model(model, name))
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], height=160,
                                elem_id="images")
                choice = gr.Radio(choices, value="uniform",
                                  label="Target prior (the test label distribution)")
                sliders = []
                if use_sliders:
                    with gr.Accordion("Per-class weights (for 'per-class sliders'; normalised to sum to 1)",
                                      open=False):
                        sliders = [gr.Slider(0.0, SLIDER_MAX, value=1.0, step=0.1, label=label)
                                   for label in labels]
                else:
                    gr.Markdown(f"(No per-class sliders: {len(labels)} classes are too many for one page.)")
                button = gr.Button("Classify", variant="primary")
            with gr.Column(scale=1):
                top = gr.Label(num_top_classes=top_k, label=f"Top-{top_k} classes of the first image",
                               elem_id="top-classes")
                note = gr.Markdown(elem_id="prior-note")
                # Class names long enough to run into each other under the bars are slanted.
                plot = gr.BarPlot(_prior_frame(labels, target_prior(model, "uniform")[0]), x="class",
                                  y="probability", sort=labels, y_lim=[0, 1], label="Target prior in use",
                                  x_label_angle=-45 if sum(map(len, labels)) > 50 else 0, height=300)
        table = gr.Dataframe(label=f"Top-{top_k} classes of every image", interactive=False,
                             elem_id="top-table")
        inputs = [files, choice, *sliders]
        outputs = [top, table, note, plot]
        button.click(run, inputs, outputs, api_name="classify")
        # A new prior re-classifies what is there already; with nothing uploaded yet it waits for the button.
        choice.change(lambda f, *rest: run(f, *rest) if f else (gr.skip(),) * len(outputs), inputs,
                      outputs, api_name=False)
    return demo
