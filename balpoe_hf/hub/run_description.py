"""What a run was, in words, for its model card: the data, the method, the loss and the prediction rule, the
schedule and the augmentation, from the model's ``config.json`` and the run's ``recipe.yaml``.

Both are read through their declarations: the config as a ``BalPoEConfig`` (its defaults and checks), the
recipe with ``Recipe``'s defaults for a field it lacks, so that no default is written again here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

from ..data.loading import FASHION_MNIST, local_name
from ..data.splits import imbalance_ratio
from ..errors import HubFolderError
from ..models.balpoe.configuration_balpoe import BalPoEConfig
from ..recipes import recipe_defaults
from ..recipes.methods import METHOD_DESCRIPTIONS, METHOD_SETTINGS

# The run's recipe, which the card links and which is published with the model.
RECIPE_NAME = "recipe.yaml"
# The Hub id of a dataset that a recipe reads from local files.
LOCAL_DATASET_HUB_IDS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}


def as_config(config: BalPoEConfig | Mapping[str, Any]) -> BalPoEConfig:
    """The model's config through its class: a ``config.json`` dict is read by ``BalPoEConfig.from_dict``
    (which fills the defaults and checks the settings); ``HubFolderError`` when it is no BalPoE config."""
    if isinstance(config, BalPoEConfig):
        return config
    try:
        return BalPoEConfig.from_dict(dict(config))
    except (ValueError, TypeError) as error:
        raise HubFolderError(f"the config is not a valid BalPoE config: {error}") from None


def with_recipe_defaults(recipe: Mapping[str, Any] | None) -> dict[str, Any]:
    """A saved recipe with ``Recipe``'s default for each field it lacks (one written by an earlier release);
    ``{}`` for no recipe."""
    return {**recipe_defaults(), **recipe} if recipe else {}


def describe_data(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """How the card names a run's data: ``train`` and ``test`` (Markdown), ``short`` (the training data in a
    few words, for the card's first sentence), ``dataset_id`` (a Hub dataset id or ``None``), ``name``
    (short, for the model-index), ``source`` (the test data as ``balpoe-evaluate`` names it in a report's
    ``"dataset"``), ``flags`` (the data flags of the command that retrains on the reader's own copy of the
    data) and ``note`` (what to adapt in it). Local paths are reduced to their file names."""
    if recipe.get("train_list"):
        train, test = local_name(recipe["train_list"]), local_name(recipe.get("test_list") or "TEST_LIST")
        return {"train": f"split list `{train}` (image paths relative to a data root)",
                "test": f"split list `{test}`", "short": f"the split list `{train}`", "dataset_id": None,
                "name": test, "source": test,
                "flags": f"--train-list {train} --test-list {test} --data-root DATA_ROOT",
                "note": "with the list files and the image folder where you keep them"}
    if recipe.get("train_file"):
        train = [local_name(p) for p in recipe["train_file"]]
        test = [local_name(p) for p in recipe.get("test_file") or []] or ["TEST_FILE"]
        files = ", ".join(f"`{name}`" for name in train)
        return {"train": f"{files} (local files)", "test": ", ".join(f"`{name}`" for name in test),
                "short": files, "dataset_id": None, "name": ", ".join(test), "source": ",".join(test),
                "flags": f"--train-file {' '.join(train)} --test-file {' '.join(test)}",
                "note": "with the data files where you keep them"}
    dataset = recipe.get("dataset")
    if dataset == FASHION_MNIST:
        hub_id = LOCAL_DATASET_HUB_IDS[FASHION_MNIST]
        return {"train": f"Fashion-MNIST training split (IDX files; on the Hub: [`{hub_id}`]"
                         f"(https://huggingface.co/datasets/{hub_id}))",
                "test": "Fashion-MNIST test split", "short": "Fashion-MNIST", "dataset_id": hub_id,
                "name": "Fashion-MNIST", "flags": "",
                "source": f"{FASHION_MNIST} ({with_recipe_defaults(recipe)['test_split']})",
                "note": "adding `--data-dir DIR` where Debian's `dataset-fashion-mnist` is not installed "
                        "(DIR: the four IDX files)"}
    if dataset:
        config = f" (configuration `{recipe['dataset_config']}`)" if recipe.get("dataset_config") else ""
        link = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
        recipe = with_recipe_defaults(recipe)
        return {"train": f"{link}{config}, split `{recipe['train_split']}`",
                "test": f"`{dataset}`, split `{recipe['test_split']}`", "short": link,
                "dataset_id": dataset, "name": dataset, "source": f"{dataset} ({recipe['test_split']})",
                "flags": "", "note": ""}
    return {"train": "not recorded", "test": "not recorded", "short": None, "dataset_id": None,
            "name": "test set", "source": None, "flags": "", "note": ""}


def run_method(config: BalPoEConfig | Mapping[str, Any], recipe: Mapping[str, Any] | None = None
               ) -> str | None:
    """The method of a run as the README names it: its ``--method`` preset, else the one preset whose
    settings the run has (a recipe may set them itself, as ``fashion-mnist-lt-quick`` sets ``balpoe-erm``'s),
    else ``None``. Without the recipe, mixup is unknown and ``balpoe`` and ``balpoe-erm`` cannot be told
    apart."""
    config = as_config(config)
    if config.method:
        return str(config.method)
    if any(isinstance(x, list) for x in config.lambdas):
        return None  # per-class lambdas: no preset has them
    run = {"num_experts": config.num_experts, "lambdas": [float(x) for x in config.lambdas],
           "loss": config.loss, "remove_mean_lambda": config.remove_mean_lambda}
    if recipe:
        run["mixup_alpha"] = float(with_recipe_defaults(recipe)["mixup_alpha"] or 0)
    matches = []
    for method, settings in METHOD_SETTINGS.items():
        same = all(run[name] == value for name, value in settings.items() if name in run)
        # The balpoe preset keeps the recipe's mixup, which must be on.
        if same and (method != "balpoe" or run.get("mixup_alpha", 1.0) > 0):
            matches.append(method)
    return matches[0] if len(matches) == 1 else None


def _loss_text(config: BalPoEConfig, lambdas: list[float]) -> str:
    if config.loss == "lade":
        weight = number_text(config.lade_weight)
        return f"balanced softmax `CE(z + log pi, y)` + {weight} x the LADE regulariser (Hong et al., 2021)"
    if len(lambdas) == 1:
        return {1.0: "cross-entropy `CE(z, y)`",
                0.0: "balanced softmax `CE(z + log pi, y)` (Ren et al., NeurIPS 2020)"}.get(
            lambdas[0], f"logit-adjusted cross-entropy `CE(z + {number_text(1 - lambdas[0])} log pi, y)`")
    return "each expert's logit-adjusted cross-entropy `CE(z_e + (1 - lambda_e) log pi, y)`, averaged"


def _prediction_text(lambdas: list[float], remove_mean_lambda: bool, per_class: bool) -> str:
    zbar = "z" if len(lambdas) == 1 else "mean_e z_e"
    mean = 0.0 if per_class or not lambdas else statistics.fmean(lambdas)
    if mean == 0 or per_class:
        bias = ""
    elif remove_mean_lambda:
        bias = " - log pi" if mean == 1 else f" - {number_text(mean)} log pi"
    elif len(lambdas) == 1 and mean == 1:
        return "`z + log pi_target`: the raw logits, which keep the training distribution's bias"
    else:
        return (f"`{zbar} + log pi_target`, keeping the mean bias (mean lambda {number_text(mean)}, as the "
                "official BalPoE code)")
    return f"`{zbar}{bias} + log pi_target`"


def _schedule_text(recipe: Mapping[str, Any]) -> str:
    schedule, epochs = recipe["lr_schedule"], recipe["epochs"]
    if schedule == "multistep":
        # Milestones past the last epoch never applied: a shortened paper schedule ran at a constant lr.
        milestones = [str(m) for m in recipe["lr_milestones"] or [] if m < (epochs or 0)]
        schedule = (f"x{number_text(recipe['lr_gamma'])} at epochs {', '.join(milestones)}"
                    if milestones else "constant")
    warmup = float(recipe["warmup_epochs"] or 0)
    lr, decay = float(recipe["lr"]), float(recipe["weight_decay"])
    momentum = "Nesterov momentum" if recipe["nesterov"] else "momentum"
    momentum += f" {number_text(recipe['momentum'])}"
    text = (f"{epochs} epoch{'s' if epochs != 1 else ''}, batch {recipe['batch_size']}, SGD lr "
            f"{number_text(lr)} ({schedule}"
            + (f", {number_text(warmup)} warm-up epoch{'s' if warmup != 1 else ''}" if warmup else "")
            + f"), {momentum}, weight decay {number_text(decay)}")
    experts = int(recipe["num_experts"] or 1)
    if recipe["scale_expert_lr"] and experts > 1:
        # training.parameter_groups: the experts' own parameters at E x lr with weight decay / E.
        text += (f"; the experts' own layers at {experts} x lr = {number_text(experts * lr)} with weight "
                 f"decay {number_text(decay)} / {experts}")
    return text


def _augmentation_text(recipe: Mapping[str, Any]) -> str:
    augment = recipe["augment"]
    if augment == "cifar":
        steps = [f"random crop (padding {recipe['crop_padding']})"]
        if recipe["hflip"]:
            steps.append("horizontal flip")
        if recipe.get("rotation"):
            steps.append(f"rotation up to {number_text(recipe['rotation'])} degrees")
    elif augment == "imagenet":
        steps = ["random resized crop", "horizontal flip"]
        if recipe.get("color_jitter"):
            steps.append(f"colour jitter {number_text(recipe['color_jitter'])}")
    else:
        steps = []
    if recipe["auto_augment"] != "none":
        steps.append(f"AutoAugment ({recipe['auto_augment']})")
    if recipe.get("rand_augment"):
        steps.append(f"RandAugment `{recipe['rand_augment']}`")
    if recipe.get("cutout"):
        steps.append(f"cutout {recipe['cutout']}")
    return ", ".join(steps) or "none"


def _headline(method: str | None, experts: int, recipe: Mapping[str, Any] | None, backbone: str,
              lambda_text: str) -> str:
    """The card's first sentence: what kind of model this is, in the words of its method."""
    mixup = float((recipe or {}).get("mixup_alpha") or 0)
    # Mixup is named only when the recipe says it was on; without a recipe the card does not guess.
    training = ("" if recipe is None else f", trained with mixup (alpha {number_text(mixup)})" if mixup > 0
                else ", trained without mixup")
    if experts > 1:
        if method == "balpoe-erm":
            training = ", trained without mixup (the paper's ERM variant)"
        named = f"; `{method}`" if method else ""
        return (f"A **Balanced Product of Calibrated Experts** (BalPoE, Sanchez Aimar et al., CVPR 2023"
                f"{named}) image classifier for long-tailed data{training}: {experts} experts "
                f"(lambda = {lambda_text}) on a shared `{backbone}` trunk, averaged into one ensemble")
    baseline = {"ce": "plain cross-entropy", "ce-la": "cross-entropy with post-hoc logit adjustment "
                "(Menon et al., ICLR 2021)", "bs": "balanced softmax (Ren et al., NeurIPS 2020)",
                "lade": "LADE (Hong et al., CVPR 2021)"}.get(method or "", "single-network")
    named = f" (`{method}`)" if method else ""
    return (f"A long-tailed image classifier, the **{baseline}** baseline{named} built with balpoe-hf"
            f"{training}: one `{backbone}` network")


def _data_sentence(counts: list[int], recipe: Mapping[str, Any], data: Mapping[str, Any] | None) -> str:
    """The card's second sentence: the training data, its classes and imbalance, the epochs."""
    ratio = imbalance_ratio(counts)
    ratio_text = "infinite" if math.isinf(ratio) else number_text(round(ratio, 2))
    source = (data or {}).get("short")
    made = " made long-tailed" if recipe.get("imbalance_ratio") is not None else ""
    epochs = recipe.get("epochs")
    classes = (f"{len(counts)} classes, {max(counts):,} down to {min(counts):,} training images per class "
               f"(imbalance ratio {ratio_text})")
    if not source:
        return f"Trained on {classes}"
    duration = f" for {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ""
    return f"Trained on {source}{made}{duration}: {classes}"


def describe_run(config: BalPoEConfig | Mapping[str, Any], recipe: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """What a card says about how its model was trained, from the saved config and the recipe as run.

    Built from the fields themselves (a recipe's ``description`` is the shipped recipe's and need not hold
    after command-line overrides, so it is not used). Returns ``headline`` (the first sentence) and
    ``rows`` (``(setting, value)`` pairs of the card's training table); without a recipe only what the
    config says (model, loss, prediction) is described.
    """
    config, recipe = as_config(config), with_recipe_defaults(recipe)
    counts = [int(c) for c in config.class_counts or []]
    per_class = any(isinstance(x, list) for x in config.lambdas)
    lambdas = [] if per_class else [float(x) for x in config.lambdas]
    lambda_text = "per class (see `config.json`)" if per_class else ", ".join(number_text(x) for x in lambdas)
    backbone, experts = config.backbone, config.num_experts
    method = run_method(config, recipe)
    rows: list[tuple[str, str]] = []
    if method:
        chosen = "" if config.method else ": the recipe's own settings are this preset's"
        rows.append(("Method", f"`{method}` ({METHOD_DESCRIPTIONS[method]}{chosen})"))
    else:
        rows.append(("Method", "the recipe's own settings, which match no preset of "
                               "`balpoe_hf.recipes.methods`"))
    shared = config.shared_stages
    trunk = "a shared trunk" + ("" if shared is None else f" of {shared} stage{'s' if shared != 1 else ''}")
    model = (f"`{backbone}` (timm): {trunk} and {experts} expert branches" if experts > 1
             else f"one `{backbone}` network (timm)")
    rows.append(("Model", f"{model}, {config.classifier} classifier; lambda = {lambda_text}"))
    rows.append(("Loss", _loss_text(config, lambdas)))
    if recipe:
        mixup = float(recipe.get("mixup_alpha") or 0)
        rows.append(("Mixup", f"alpha {number_text(mixup)} (soft targets)" if mixup > 0 else "off"))
    rows.append(("Prediction", _prediction_text(lambdas, config.remove_mean_lambda, per_class)
                 + "; target prior " + target_prior_text(config.target_prior)))
    if recipe:
        data = describe_data(recipe)
        rows.append(("Training data", data["train"]))
        ratio = recipe.get("imbalance_ratio")
        profile, seed = recipe["imbalance_profile"], recipe["split_seed"]
        split = (f"made long-tailed with imbalance ratio {number_text(ratio)} ({profile} profile, seed "
                 f"{seed})" if ratio is not None else "as given (not subsampled)")
        if float(recipe.get("holdout_fraction") or 0) > 0:
            split += (f"; {float(recipe['holdout_fraction']):.0%} of each class held out (never trained on) "
                      "to calibrate the model")
        rows.append(("Long-tailed split", split))
    if counts:
        ratio = imbalance_ratio(counts)
        ratio_text = "infinite" if math.isinf(ratio) else number_text(round(ratio, 2))
        rows.append(("Training images", f"{sum(counts):,} in {len(counts)} classes, {max(counts):,} down to "
                                        f"{min(counts):,} (imbalance ratio {ratio_text})"))
    if recipe:
        rows.append(("Test data", data["test"]))
        rows.append(("Schedule", _schedule_text(recipe)))
        rows.append(("Augmentation", f"{_augmentation_text(recipe)}; images {recipe.get('image_size')} px"))
        rows.append(("Recipe", f"`{recipe['name']}`, seed {recipe['seed']}; every "
                               f"setting in [`{RECIPE_NAME}`]({RECIPE_NAME})"))
    headline = _headline(method, experts, recipe or None, backbone, lambda_text)
    if counts:
        headline += ". " + _data_sentence(counts, recipe, describe_data(recipe) if recipe else None)
    return {"headline": headline, "rows": rows, "experts": experts, "method": method}


def label_names(config: BalPoEConfig | Mapping[str, Any], num_classes: int) -> list[str]:
    """The name of each of the ``num_classes`` classes (``LABEL_i`` where the config names none)."""
    id2label = as_config(config).id2label or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_classes)]


def number_text(value: Any) -> str:
    return f"{float(value):g}"


def target_prior_text(target_prior: Any) -> str:
    if target_prior is None or target_prior == "uniform":
        return "uniform by default (balanced predictions)"
    if target_prior == "train":
        return "the training prior by default"
    return "a custom prior by default (`config.json`, `target_prior`)"
