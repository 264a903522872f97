"""Feature visualisation (activation maximisation), inversion and DeconvNet projection."""
from . import objectives
from .core import (DeconvProjection, Step, Visualization, deconv, invert, invert_steps,
                   layer_outputs, optimize, visualize)
from .param import FFTParam, PixelParam, color_matrix, decorrelate, make_param
from .transforms import Robustness

__all__ = ["DeconvProjection", "FFTParam", "PixelParam", "Robustness", "Step", "Visualization",
           "color_matrix", "deconv", "decorrelate", "invert", "invert_steps", "layer_outputs",
           "make_param", "objectives", "optimize", "visualize"]
