"""``balpoe-demo``: the Gradio demo of a saved model (``balpoe_hf.demo``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .parsing import ArgumentParser, option, run_command

DEMO_DESCRIPTION = """Serve a Gradio demo of a saved BalPoE model in the browser.

    balpoe-demo runs/cifar10-lt                  # then open http://127.0.0.1:7860
    balpoe-demo me/balpoe-cifar10-lt --server-port 8000

Upload images (one or a batch) and see each one's top-5 classes under a target prior: uniform (a balanced test
set), training (distributed like the training set), per-class sliders, or estimated from the uploaded images
(adapt_to_unlabeled; with fewer images than classes it keeps the uniform prior and says so). A bar plot shows
the prior in use. Needs gradio: pip install 'balpoe-hf[demo]'. Stop it with Ctrl+C.
"""


@dataclass
class DemoArguments:
    """``balpoe-demo``'s options."""

    model: str = field(metadata=option("a saved BalPoE model: a training run's directory or a Hub id",
                                       positional=True, metavar="RUN_OR_REPO_ID"))
    server_name: str = field(default="127.0.0.1", metadata=option(
        "address to listen on (default: this machine only; 0.0.0.0 for the network)"))
    server_port: int | None = field(default=None, metadata=option(
        "port (default: 7860, or the next free one)"))
    device: str | None = field(default=None, metadata=option("device (default: cuda when available)"))


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-demo``: load the model (``balpoe_hf.demo.load_demo_model``), build the app and serve it."""
    (args,) = ArgumentParser([DemoArguments], DEMO_DESCRIPTION).parse(argv)
    return run_command(lambda: _demo(args), "the demo stopped.", errors=(ImportError,))


def _demo(args: DemoArguments) -> None:
    from ..demo import build_demo, load_demo_model, require_gradio

    require_gradio()
    model, processor = load_demo_model(args.model, args.device)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    build_demo(model, processor, name=name).launch(server_name=args.server_name, server_port=args.server_port)
