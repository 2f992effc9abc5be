"""The BalPoE model and the code that travels with every saved model as its remote code.

Like transformers' ``models/<name>/``: ``configuration_balpoe`` and ``modeling_balpoe``, and the modules they
import with flat relative imports (``from .priors import ...``), which ``save_pretrained`` copies next to the
weights so that ``trust_remote_code=True`` loads the folder without balpoe-hf. These modules import torch,
timm, transformers and each other only, never the rest of ``balpoe_hf``; this file is not shipped.
"""

from .configuration_balpoe import BalPoEConfig
from .label_shift import PriorStream, ShiftEstimator, estimate_prior
from .modeling_balpoe import BalPoEForImageClassification, BalPoEModel
from .pipeline_balpoe import BalPoEImageClassificationPipeline
from .processing import build_image_processor

__all__ = [
    "BalPoEConfig",
    "BalPoEForImageClassification",
    "BalPoEImageClassificationPipeline",
    "BalPoEModel",
    "PriorStream",
    "ShiftEstimator",
    "build_image_processor",
    "estimate_prior",
]
