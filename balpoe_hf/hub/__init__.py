"""Publishing a run to the Hugging Face Hub: the model card, the folder checks and the upload."""

from .card import DEFAULT_EVAL_REPORT, HubFolder, check_hub_folder, prepare_hub_folder, push_to_hub

__all__ = ["DEFAULT_EVAL_REPORT", "HubFolder", "check_hub_folder", "prepare_hub_folder", "push_to_hub"]
