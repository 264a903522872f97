"""Class names, and a target (an index or a label) resolved to a class index."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_synsets() -> list[str]:
    """The 1,000 ILSVRC-2012 WordNet synset ids (``"n01440764"``, …) in class-index order (the
    order of torchvision's and timm's ImageNet classifiers: the ids sorted), from the plain
    text list shipped with cnnwidgets (``engine/data/imagenet_synsets.txt``, one id a line).

    The list was taken from timm's ``timm/data/_info/imagenet_synsets.txt`` (the wheel on this
    project's package mirror); torchvision ships only the class names, not the ids."""
    from pathlib import Path

    path = Path(__file__).with_name("data") / "imagenet_synsets.txt"
    return path.read_text().split()


def default_labels(count: int) -> list[str]:
    """ImageNet's names for 1,000 classes, else ``"class 0"``, ``"class 1"``, …"""
    return imagenet_labels() if count == 1000 else [f"class {i}" for i in range(count)]


def label_of(labels: Sequence[str], index: int) -> str:
    """The name of class ``index`` (``"class <index>"`` outside the list)."""
    return labels[index] if 0 <= index < len(labels) else f"class {index}"


def class_index(target, count: Callable[[], int], labels: Callable[[], Sequence[str]]) -> int:
    """Resolve a class index (checked against ``count()``) or a label (looked up, without case,
    in ``labels()``) to an index; the callables are asked only when needed."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        n = count()
        if not 0 <= int(target) < n:
            raise ValueError(f"target {target} is out of range; the model has {n} classes (0–{n - 1})")
        return int(target)
    if isinstance(target, str):
        names = labels()
        lowered = [lab.lower() for lab in names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        import difflib

        close = difflib.get_close_matches(target, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"no class label {target!r}{hint} (model.labels lists them all)")
    raise ValueError(f"target must be None, a class index or a label, not {type(target).__name__}")
