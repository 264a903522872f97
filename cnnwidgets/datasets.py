"""Data sets (``cw.datasets``).

``SyntheticConcepts(n_images, size, seed)``: generated offline (colours, textures, shapes with
exact masks); ``SyntheticShapes(n_images, size, seed)``: a small shape classification task for
``cw.train``; ``Broden(root)``: a local copy of Broden. The protocol any data set must follow to
be dissected is described in :mod:`cnnwidgets.engine.datasets`.

``sample_variants(n, seed)``: the sample photos with seeded crops, flips and colour changes —
a few hundred offline images for measurements such as ``cw.prune_curve``.

Box data sets for :func:`cnnwidgets.evaluate`: ``ImageFolderBoxes(root)`` (the ILSVRC
validation layout — JPEG + PASCAL VOC XML — or a CSV ``path,x0,y0,x1,y1,class``) and
``SyntheticBoxes(n_images, size, seed)`` (offline: objects from scikit-image's photos pasted at
known boxes); their protocol is described in :mod:`cnnwidgets.engine.boxdata`.
"""
from .engine.boxdata import (
    OBJECTS,
    AnnotationError,
    BoxProblem,
    ImageFolderBoxes,
    SyntheticBoxes,
    read_voc,
)
from .engine.datasets import (COLORS, SHAPES, TEXTURES, Broden, SyntheticConcepts,
                              SyntheticShapes, decode_broden_mask)
from .engine.images import sample_variants
from .engine.labels import imagenet_synsets

__all__ = ["sample_variants", "Broden", "SyntheticConcepts", "SyntheticShapes", "COLORS",
           "TEXTURES", "SHAPES", "decode_broden_mask", "ImageFolderBoxes", "SyntheticBoxes",
           "OBJECTS", "AnnotationError", "BoxProblem", "read_voc", "imagenet_synsets"]
