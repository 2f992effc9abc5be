"""``balpoe_hf.loading``: the path that the documentation showed for ``balpoe_hf.data.loading`` before the
package had subpackages, kept so that code written against it runs (with a ``FutureWarning``)."""

import sys
import warnings

from .data import loading

warnings.warn("balpoe_hf.loading is now balpoe_hf.data.loading; balpoe_hf.data exports load_split and "
              "load_training_data. The old path will be removed.", FutureWarning, stacklevel=2)
sys.modules[__name__] = loading
