"""The demo of a BalPoE model: a Gradio app (``balpoe-demo``) and the Space files of ``balpoe-push --demo``.

The app lives in ``app``, which imports nothing of balpoe_hf so that a Hugging Face Space runs the same code
as its ``app.py``; ``space`` loads models with the package's checks and writes a Space's ``app.py`` and
``requirements.txt``.

    from balpoe_hf.demo import build_demo, load_demo_model

    model, processor = load_demo_model("runs/cifar10-lt")
    build_demo(model, processor).launch()
"""

from .app import (
    DEMO_EXTRA,
    PRIOR_CHOICES,
    Prediction,
    build_demo,
    class_labels,
    classify,
    require_gradio,
    slider_prior,
    target_prior,
)
from .space import (
    SPACE_FILES,
    load_demo_model,
    space_app,
    space_files_for_push,
    space_requirements,
    write_space_files,
)

__all__ = [
    "DEMO_EXTRA",
    "PRIOR_CHOICES",
    "SPACE_FILES",
    "Prediction",
    "build_demo",
    "class_labels",
    "classify",
    "load_demo_model",
    "require_gradio",
    "slider_prior",
    "space_app",
    "space_files_for_push",
    "space_requirements",
    "target_prior",
    "write_space_files",
]
