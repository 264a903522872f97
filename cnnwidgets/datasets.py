"""Concept data sets for network dissection (``cw.datasets``).

``SyntheticConcepts(n_images, size, seed)``: generated offline (colours, textures, shapes with
exact masks); ``SyntheticShapes(n_images, size, seed)``: a small shape classification task for
``cw.train``; ``Broden(root)``: a local copy of Broden. The protocol any data set must follow to
be dissected is described in :mod:`cnnwidgets.engine.datasets`.

``sample_variants(n, seed)``: the sample photos with seeded crops, flips and colour changes —
a few hundred offline images for measurements such as ``cw.prune_curve``.
"""
from .engine.images import sample_variants
from .engine.datasets import (COLORS, SHAPES, TEXTURES, Broden, SyntheticConcepts,
                              SyntheticShapes, decode_broden_mask)

__all__ = ["sample_variants", "Broden", "SyntheticConcepts", "SyntheticShapes", "COLORS",
           "TEXTURES", "SHAPES", "decode_broden_mask"]
