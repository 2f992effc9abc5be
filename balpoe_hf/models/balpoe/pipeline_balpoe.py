"""The image-classification pipeline of BalPoE models: transformers' own, plus a per-call ``target_prior``.

``pipeline("image-classification", model=folder_or_hub_id, trust_remote_code=True)`` returns this pipeline:
``save_pretrained`` names it in ``config.json`` (``custom_pipelines``) and the model module imports it, so it
travels with every saved model as remote code. Without ``target_prior`` a call is the standard
``ImageClassificationPipeline``'s; with it, the model predicts for that test label distribution:

- a sequence of one probability per class: a known test prior;
- ``"uniform"`` (balanced predictions) or ``"train"`` (the training distribution);
- ``"auto"``: the prior of the call's own images, estimated by ``model.adapt_to_unlabeled`` (its default
  method, which keeps the uniform prior unless the shift is larger than its uncertainty) before predicting;
  the model is run twice on them. Pass the images of one deployment together:
  a handful of images says little about a label distribution.

The model's own target prior (``model.config.target_prior``) is never changed by a call: the next call
without ``target_prior`` predicts as before.

This module is shipped as remote code next to a saved model: it imports numpy, PIL, torch and transformers
only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import ImageClassificationPipeline

# The named priors a call accepts; a sequence of probabilities is checked by the model.
NAMED_PRIORS = ("uniform", "train", "auto")


class BalPoEImageClassificationPipeline(ImageClassificationPipeline):
    """``ImageClassificationPipeline`` with a ``target_prior`` call parameter (see the module docstring).

    Example::

        classifier = pipeline("image-classification", model="me/balpoe-model", trust_remote_code=True)
        classifier(image)                              # the model's target prior (uniform unless set)
        classifier(image, target_prior="train")        # a known test label distribution
        classifier(images, target_prior="auto")        # estimated from these unlabelled images
    """

    def _sanitize_parameters(self, top_k: int | None = None, function_to_apply: Any = None,
                             timeout: float | None = None, target_prior: Any = None
                             ) -> tuple[dict, dict, dict]:
        preprocess, forward, postprocess = super()._sanitize_parameters(top_k, function_to_apply, timeout)
        if target_prior is not None:
            if isinstance(target_prior, str) and target_prior not in NAMED_PRIORS:
                raise ValueError(f"target_prior must be one of {', '.join(map(repr, NAMED_PRIORS))} or one "
                                 f"probability per class ({self.model.config.num_labels}), got "
                                 f"{target_prior!r}.")
            forward["target_prior"] = target_prior
        return preprocess, forward, postprocess

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        # A prior given when the pipeline was built (pipeline(..., target_prior=...)) applies to every call.
        prior = kwargs.get("target_prior", self._forward_params.get("target_prior"))
        if isinstance(prior, str) and prior == "auto":
            kwargs["target_prior"] = self._estimate_prior(inputs, kwargs.get("timeout"))
        return super().__call__(inputs, **kwargs)

    def _estimate_prior(self, inputs: Any, timeout: float | None) -> list[float]:
        """The test prior of the call's images, estimated without changing the model."""
        single = isinstance(inputs, str | Image.Image | np.ndarray | torch.Tensor)
        if not single and not isinstance(inputs, list | tuple):
            raise TypeError("target_prior='auto' estimates the label distribution of the images of one call: "
                            f"pass them as a list (got {type(inputs).__name__}).")
        images = [inputs] if single else list(inputs)
        if not images:
            raise ValueError("target_prior='auto' needs at least one image.")
        pixel_values = torch.cat([self.preprocess(image, timeout=timeout)["pixel_values"]
                                  for image in images])
        estimate = self.model.adapt_to_unlabeled(pixel_values, set_prior=False)
        return estimate.prior.tolist()

    def _forward(self, model_inputs: Any, target_prior: Any = None) -> Any:
        if target_prior is None:
            return self.model(**model_inputs)
        return self.model(**model_inputs, target_prior=target_prior)
