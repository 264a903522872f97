"""The engine: torch only. No matplotlib, no ipywidgets."""
from .fixations import Fixations, UnsupportedOperationError, fixation_attribution, fixations
from .hooks import LayerNotFoundError, capture, hook_count, restored
from .images import load_image, sample_image, sample_images
from .model import LayerInfo, Model, imagenet_labels
from .zoo import available_models, load_model

__all__ = [
    "Fixations", "LayerInfo", "LayerNotFoundError", "UnsupportedOperationError",
    "fixation_attribution", "fixations", "Model", "available_models", "capture", "hook_count",
    "imagenet_labels", "load_image", "load_model", "restored", "sample_image", "sample_images",
]
