"""The engine: torch only. No matplotlib, no ipywidgets."""
from .ablation import PruneCurve, ablate, prune_curve
from .attack import Adversarial, Drift, attack, layer_drift
from .dissection import DissectionResult, UnitRecord, dissect
from .evaluation import Evaluation, evaluate
from .fixations import Fixations, UnsupportedOperationError, fixation_attribution, fixations
from .hooks import LayerNotFoundError, capture, hook_count, restored
from . import targets
from .images import load_image, sample_image, sample_images
from .labels import imagenet_labels
from .layer_index import LayerInfo
from .model import Model
from .preprocess import Pixels
from .zoo import available_models, load_model

__all__ = [
    "Adversarial", "Drift", "Pixels", "PruneCurve", "ablate", "attack", "layer_drift",
    "prune_curve",
    "DissectionResult", "UnitRecord", "dissect", "Evaluation", "evaluate",
    "Fixations", "UnsupportedOperationError", "fixation_attribution", "fixations",
    "LayerInfo", "LayerNotFoundError", "Model", "available_models", "capture", "hook_count",
    "imagenet_labels", "load_image", "load_model", "restored", "sample_image", "sample_images",
    "targets",
]
