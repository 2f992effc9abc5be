"""``balpoe_hf.label_shift``: the path that the documentation showed for
``balpoe_hf.models.balpoe.label_shift`` before the package had subpackages, kept so that code written against
it runs (with a ``FutureWarning``)."""

import sys
import warnings

from .models.balpoe import label_shift

warnings.warn("balpoe_hf.label_shift is now balpoe_hf.models.balpoe.label_shift; balpoe_hf exports "
              "estimate_prior, PriorStream and ShiftEstimator. The old path will be removed.", FutureWarning,
              stacklevel=2)
sys.modules[__name__] = label_shift
