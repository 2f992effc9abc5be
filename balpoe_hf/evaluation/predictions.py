"""The model's predictions on a dataset: uniform-prior logits and each expert's, one pass over the images."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from ..data.transforms import to_rgb
from ..errors import EvaluationError
from ..models.balpoe.modeling_balpoe import BalPoEForImageClassification


@torch.inference_mode()
def predict(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset,
            image_column: str = "image", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a uniform target prior ``(N, C)`` and expert logits ``(N, E, C)``, one pass over ``ds``."""
    if image_column not in ds.column_names:
        raise EvaluationError(f"the test set has no image column {image_column!r}; its columns are "
                              f"{ds.column_names}. Name it with --image-column.")
    if not isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image())
    images = ds.select_columns([image_column])
    device = next(model.parameters()).device
    logits, expert_logits = [], []
    for start in range(0, len(images), batch_size):
        batch = [to_rgb(image) for image in images[start:start + batch_size][image_column]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out = model(pixel_values=pixel_values, target_prior="uniform")
        logits.append(out.logits.float().cpu())  # (B, C)
        expert_logits.append(out.expert_logits.float().cpu())  # (B, E, C)
    return torch.cat(logits), torch.cat(expert_logits)
