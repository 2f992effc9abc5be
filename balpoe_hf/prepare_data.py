"""``balpoe_hf.prepare_data``: the path that the documentation showed for ``balpoe_hf.data.prepare`` before
the package had subpackages, kept so that code written against it runs (with a ``FutureWarning``)."""

import sys
import warnings

from .data import prepare

warnings.warn("balpoe_hf.prepare_data is now balpoe_hf.data.prepare; balpoe_hf.data exports prepare_data. "
              "The old path will be removed.", FutureWarning, stacklevel=2)
sys.modules[__name__] = prepare
