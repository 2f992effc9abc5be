"""Publishing a run to the Hugging Face Hub: the model card (``card``, with ``run_description``), the checks
of the folder (``folder``) and the upload (``publish``)."""

from .card import render_model_card, template_path
from .folder import DEFAULT_EVAL_REPORT, check_hub_folder
from .publish import HubFolder, prepare_hub_folder, push_to_hub
from .run_description import describe_run, run_method

__all__ = ["DEFAULT_EVAL_REPORT", "HubFolder", "check_hub_folder", "describe_run", "prepare_hub_folder",
           "push_to_hub", "render_model_card", "run_method", "template_path"]
