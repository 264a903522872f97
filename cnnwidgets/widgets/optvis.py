"""``cw.FeatureVisualizer`` and ``cw.InversionExplorer``, under the import path they have always
had; each lives in a file of its own (``feature_visualizer.py``, ``inversion.py``), on the live
optimisation base in ``live.py``."""
from .feature_visualizer import FeatureVisualizer
from .inversion import InversionExplorer

__all__ = ["FeatureVisualizer", "InversionExplorer"]
