"""cnnwidgets: Jupyter widgets that show what a convolutional neural network sees.

    import cnnwidgets as cw
    model = cw.load_model("efficientnet_lite0")
    cw.FeatureMapExplorer(model, cw.sample_image("cat"))
"""
from importlib import import_module

from . import datasets, metrics
from .engine import (
    Adversarial,
    Drift,
    Pixels,
    PruneCurve,
    ablate,
    attack,
    layer_drift,
    prune_curve,
    DissectionResult,
    Evaluation,
    Fixations,
    LayerNotFoundError,
    Model,
    available_models,
    dissect,
    evaluate,
    fixations,
    load_image,
    load_model,
    sample_image,
    sample_images,
    targets,
)
from .engine.attribution import Attribution, Cancelled, attribute, methods
from .engine.compare import Comparison, compare
from .engine.optvis import Visualization, deconv, invert, objectives, visualize
from .engine.training import Monitor, NonFiniteLoss, Snapshot, TrainResult, train

__version__ = "0.1.0"

# Widgets import ipywidgets and matplotlib: load them on first use only.
_LAZY = {
    "FeatureMapExplorer": "cnnwidgets.widgets.feature_maps",
    "AttributionExplorer": "cnnwidgets.widgets.attribution",
    "FixationExplorer": "cnnwidgets.widgets.fixations",
    "DissectionExplorer": "cnnwidgets.widgets.dissection",
    "FeatureVisualizer": "cnnwidgets.widgets.optvis",
    "InversionExplorer": "cnnwidgets.widgets.optvis",
    "Explorer": "cnnwidgets.widgets.explorer",
    "AttackExplorer": "cnnwidgets.widgets.applications",
    "PruningExplorer": "cnnwidgets.widgets.applications",
    "TrainingMonitor": "cnnwidgets.widgets.training",
    "CompareExplorer": "cnnwidgets.widgets.compare",
    "EvaluationExplorer": "cnnwidgets.widgets.evaluation",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnwidgets' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "Adversarial", "Drift", "Pixels", "PruneCurve", "ablate", "attack", "layer_drift",
    "prune_curve",
    "Attribution", "Cancelled", "DissectionResult", "Fixations", "LayerNotFoundError", "Model",
    "Visualization", "attribute", "available_models", "datasets", "deconv", "dissect",
    "fixations", "invert", "load_image", "load_model", "methods", "metrics", "objectives", "sample_image",
    "sample_images", "targets", "visualize", "evaluate", "Evaluation", "compare", "train", "Comparison", "Monitor",
    "NonFiniteLoss", "Snapshot", "TrainResult", *_LAZY,
]
