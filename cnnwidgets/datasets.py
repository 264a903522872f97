"""Concept data sets for network dissection (``cw.datasets``).

``SyntheticConcepts(n_images, size, seed)``: generated offline (colours, textures, shapes with
exact masks); ``SyntheticShapes(n_images, size, seed)``: a small shape classification task for
``cw.train``; ``Broden(root)``: a local copy of Broden. The protocol any data set must follow to
be dissected is described in :mod:`cnnwidgets.engine.datasets`.
"""
from .engine.datasets import (COLORS, SHAPES, TEXTURES, Broden, SyntheticConcepts,
                              SyntheticShapes, decode_broden_mask)

__all__ = ["Broden", "SyntheticConcepts", "SyntheticShapes", "COLORS", "TEXTURES", "SHAPES",
           "decode_broden_mask"]
