"""The engine: torch only. No matplotlib, no ipywidgets."""
from .dissection import DissectionResult, UnitRecord, dissect
from .evaluation import Evaluation, evaluate
from .fixations import Fixations, UnsupportedOperationError, fixation_attribution, fixations
from .hooks import LayerNotFoundError, capture, hook_count, restored
from .images import load_image, sample_image, sample_images
from .labels import imagenet_labels
from .layer_index import LayerInfo
from .model import Model
from .zoo import available_models, load_model

__all__ = [
    "DissectionResult", "UnitRecord", "dissect", "Evaluation", "evaluate",
    "Fixations", "UnsupportedOperationError", "fixation_attribution", "fixations",
    "LayerInfo", "LayerNotFoundError", "Model", "available_models", "capture", "hook_count",
    "imagenet_labels", "load_image", "load_model", "restored", "sample_image", "sample_images",
]
