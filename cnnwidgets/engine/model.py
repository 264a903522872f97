"""``cw.Model``: a classification CNN plus everything needed to show what it sees.

The wrapper is the one face of a few small parts: the preprocessing (:mod:`.preprocess`, so
overlays line up with the exact crop the network sees), the class labels and targets
(:mod:`.labels`), the layer index from one dry forward pass (:mod:`.layer_index`), memory sizing
(:mod:`.memory`) and a memory-bounded activation cache (:mod:`.activations`). It never changes
the wrapped module for good: every call that runs it goes through
:func:`cnnwidgets.engine.hooks.restored`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .activations import ActivationCache, map_bytes
from .checks import check_int
from .hooks import restored
from .labels import class_index, default_labels, imagenet_labels, label_of
from .layer_index import LayerIndex, LayerInfo
from .memory import image_bytes
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

# LayerInfo, imagenet_labels and the ImageNet statistics are importable from here as before
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LayerInfo", "Model", "as_model", "check_dtype",
           "imagenet_labels"]


class Model:
    """Wrap any ``torch.nn.Module`` that maps an image batch N×3×H×W to class scores N×K —
    or to a dense map N×C×H×W (segmentation), scored boxes N×B×(4+K), or anything a callable
    target reads (:mod:`.targets`).

    Parameters
    ----------
    module: the network. It is used where it lives (its device is not changed).
    transform: optional callable PIL image → 3×H×W tensor; by default the image is resized so
        that its shorter side is ``input_size / crop`` and centre-cropped to ``input_size``,
        then normalised with ``mean`` / ``std``.
    labels: class names; by default ImageNet's when the model has 1,000 outputs.
    input_size: (H, W) of the network input.
    output: picks the scores out of a model that returns a tuple or dict: a key or index
        (``output="out"`` for torchvision's segmentation networks, ``output=0``) or a callable
        (``output=lambda out: out["logits"]``).
    crop: fraction of the resized image kept by the centre crop (0.875 = 224 of 256).
    cache_bytes: memory bound of the activation cache.
    name: shown in titles.
    """

    def __init__(
        self,
        module: nn.Module,
        transform: Callable | None = None,
        labels: Sequence[str] | None = None,
        input_size=(224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        *,
        output: Callable | None = None,
        crop: float = 0.875,
        cache_bytes: int = 256 * 2**20,
        name: str | None = None,
    ):
        if isinstance(module, Model):
            module = module.module
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"cw.Model wraps a torch.nn.Module, not a {type(module).__name__}; "
                "for a torchvision model by name use cw.load_model('resnet18')"
            )
        if not any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()):
            raise ValueError(
                f"{type(module).__name__} has no convolution layer; cnnwidgets shows what a "
                "convolutional network sees, so wrap a CNN (e.g. cw.load_model('efficientnet_lite0'))"
            )
        self.module = module
        cache_bytes = check_int(cache_bytes, "cache_bytes", 0, None, who="cw.Model")
        self._preprocess = Preprocess(transform, input_size, mean, std, crop)
        self.output = pick(output)
        self.name = name or type(module).__name__
        self._labels = list(labels) if labels is not None else None
        self._index: LayerIndex | None = None  # from the dry run, on first need
        self._image_bytes: int | None = None
        self.cache = ActivationCache(cache_bytes)


    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"cw.Model({self.name}, input_size={self.input_size}, device={self.device})"

    # ------------------------------------------------------------------ images
    transform = property(lambda self: self._preprocess.transform,
                         doc="callable PIL image → 3×H×W tensor, or None (resize, crop, normalise)")
    input_size = property(lambda self: self._preprocess.input_size, doc="(H, W) of the input")
    mean = property(lambda self: self._preprocess.mean, doc="per-channel mean of normalisation")
    std = property(lambda self: self._preprocess.std, doc="per-channel std of normalisation")
    crop = property(lambda self: self._preprocess.crop, doc="share of the resized image kept")

    def prepare(self, image) -> tuple[torch.Tensor, np.ndarray]:
        """``(tensor 1×3×H×W on the model's device, display image H×W×3 float in [0, 1])``.

        The display image is the exact crop the network sees, so overlays line up.
        """
        dtype = check_dtype(self.module)
        tensor, display = self._preprocess.prepare(image)
        return tensor.to(self.device, dtype), display

    def map_boxes(self, boxes, width: int, height: int) -> tuple[np.ndarray, int, int]:
        """Boxes in a ``width`` × ``height`` image's pixels → the pixels of the crop the
        network sees (aligned with ``prepare(image)[1]`` and with attribution maps), with the
        numbers of boxes clipped and dropped; see :meth:`.preprocess.Preprocess.map_boxes`."""
        return self._preprocess.map_boxes(boxes, width, height)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (N×3×H×W) to the network's input space."""
        return self._preprocess.normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        return self._preprocess.denormalize(x)

    # ------------------------------------------------------------------ running
    def run(self, x: torch.Tensor):
        """Run the network on a prepared batch and return its output, picked by ``output``
        (graph kept); whatever it is — targets read their score off it (:mod:`.targets`)."""
        out = self.module(x)
        return self.output(out) if self.output is not None else out

    @property
    def output_shape(self) -> tuple | None:
        """One image's output shape from the dry run (``(K,)`` for a classifier,
        ``(C, H, W)`` for a dense output); ``None`` when the output is not a tensor."""
        return self._layer_index().output_shape

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on a prepared batch and return its scores (graph kept): class
        scores N×K, a dense map N×C×H×W or boxes N×B×D; an error for anything else."""
        out = self.run(x)
        if not isinstance(out, torch.Tensor):
            kind = type(out).__name__
            raise ValueError(
                f"the model returned a {kind}, not a tensor of class scores; pass "
                "output=... to cw.Model to pick them, e.g. cw.Model(net, output=lambda out: out[0]) "
                "for a tuple or output=lambda out: out['logits'] for a dict"
            )
        if out.ndim not in (2, 3, 4):
            raise ValueError(
                f"the model returned a tensor of shape {tuple(out.shape)}; cnnwidgets needs class "
                "scores of shape N×K (a classification network), a dense map N×C×H×W or boxes "
                "N×B×(4+K). Pass output=... to cw.Model to reduce it, e.g. "
                "output=lambda out: out.flatten(1)"
            )
        return out

    def predict(self, image, k: int = 5) -> list[tuple[int, str, float]]:
        """Top-``k`` classes as ``(index, label, probability)``. For a dense output N×C×H×W the
        "probability" is the share of output pixels where the class scores highest."""
        k = check_int(k, "k", 1, None, who="model.predict")
        x, _ = self.prepare(image)
        with restored(self.module), torch.no_grad():
            out = self.scores(x)
        if out.ndim == 4:
            top = out[0].argmax(0).reshape(-1)
            probs = torch.bincount(top, minlength=out.shape[1]).to(out.dtype) / top.numel()
        elif out.ndim == 2:
            probs = out.softmax(-1)[0]
        else:
            raise ValueError("model.predict ranks classes of a classifier (N×K) or a dense "
                             f"output (N×C×H×W); this model returns {tuple(out.shape)}")
        k = min(k, probs.numel())
        values, indices = probs.topk(k)
        return [(int(i), self.label(int(i)), float(v)) for v, i in zip(values, indices)]

    # ------------------------------------------------------------------ labels and targets
    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            self._labels = default_labels(self.num_classes)
        return self._labels

    @property
    def num_classes(self) -> int:
        if self._labels is not None:
            return len(self._labels)
        n = self._layer_index().num_classes
        if n is None:
            raise ValueError("the model's output is not class scores, so it has no number of "
                             "classes; pass labels=... to cw.Model, or use a callable target")
        return n

    def label(self, index: int) -> str:
        return label_of(self.labels, index)

    def target_index(self, target, image=None) -> int:
        """Resolve ``None`` (top-1 for ``image``), an index or a label string to an index."""
        if target is None:
            if image is None:
                raise ValueError("target=None needs an image to take the top-1 prediction of")
            return self.predict(image, k=1)[0][0]
        return class_index(target, lambda: self.num_classes, lambda: self.labels)

    # ------------------------------------------------------------------ layers
    def _layer_index(self) -> LayerIndex:
        """The layer index, from one dry forward pass on the first call."""
        if self._index is None:
            self._index = LayerIndex.dry_run(self.module, self.run, self.input_size,
                                             self.device, check_dtype(self.module))
        return self._index

    def layer_info(self, name: str | None = None):
        """``LayerInfo`` of one layer, or a dict of all layers in forward order."""
        index = self._layer_index()
        return dict(index.info) if name is None else index.get(name)

    def layers(self, kind: str = "maps") -> list[str]:
        """Layer names in forward order.

        ``kind="maps"`` (default): every layer whose output is a feature map C×h×w and that
        runs once per forward pass (convolutions, batch norms, activations, pooling, blocks).
        ``"conv"``: convolution modules only. ``"all"``: every module that ran.
        """
        return self._layer_index().names(kind)

    def last_map_layer(self) -> str:
        """The deepest layer that outputs a feature map (the usual choice for CAM methods);
        often a batch norm or an activation rather than a convolution."""
        return self._layer_index().last_map_layer()

    def check_layer(self, layer: str) -> LayerInfo:
        """Validate a layer name for activation capture; returns its ``LayerInfo``."""
        return self._layer_index().check(layer, self.module)

    # ------------------------------------------------------------------ memory
    def image_bytes(self) -> int:
        """Bytes of every leaf module's output for one image at ``input_size`` (from the dry
        run): an upper bound of what a forward + backward pass keeps per image, used to size
        batches to the memory available (:mod:`.memory`)."""
        if self._image_bytes is None:
            self._image_bytes = image_bytes(self.module, self._layer_index().info)
        return self._image_bytes

    def layer_bytes(self, layer: str) -> int:
        """Bytes one image's output of ``layer`` takes in the activation cache."""
        return map_bytes(self.layer_info(layer).shape)

    # ------------------------------------------------------------------ activations
    def prefetch(self, image, layers, max_bytes: int | None = None) -> list[str]:
        """Capture many layers for ``image`` in one forward pass, so later calls to
        :meth:`activations` for them are cache hits.

        Layers are taken in the order given while their total size stays within ``max_bytes``
        (default: half the activation cache). Returns the names now cached.
        """
        chosen = self.cache.fitting(((n, self.layer_bytes(n)) for n in layers), max_bytes)
        if chosen:
            self.activations(image, chosen)
        return chosen

    def activations(self, image, layer):
        """The layer's output for ``image`` as a C×h×w tensor on the CPU (cached).

        ``layer`` may be a list of names: then a dict name → tensor is returned, computed in
        one forward pass.
        """
        names = [layer] if isinstance(layer, str) else list(layer)
        for n in names:
            self.check_layer(n)
        x, _ = self.prepare(image)
        found = self.cache.outputs(self.module, x, names, self.run)
        return found[layer] if isinstance(layer, str) else found


class _Pick:
    """``output="out"`` / ``output=0``: the item of a dict or tuple output."""

    def __init__(self, key):
        self.key = key

    def __call__(self, out):
        try:
            return out[self.key]
        except (KeyError, IndexError, TypeError) as exc:
            keys = list(out.keys()) if isinstance(out, dict) else None
            raise ValueError(f"cw.Model(output={self.key!r}): the model's output "
                             f"({type(out).__name__}{f' with keys {keys}' if keys else ''}) "
                             f"has no item {self.key!r}") from exc

    def __repr__(self) -> str:
        return f"output[{self.key!r}]"


def pick(output):
    """``cw.Model``'s ``output``: ``None``, a callable, or a key / index made a callable."""
    if output is None or callable(output):
        return output
    if isinstance(output, (str, int)) and not isinstance(output, bool):
        return _Pick(output)
    raise TypeError(f"output must be a key ('out'), an index or a callable, not {type(output).__name__}")


def check_dtype(module: nn.Module, who: str = "") -> torch.dtype:
    """The network's floating-point type: float32, or float64 (its inputs are converted
    exactly); a ``TypeError`` for half precision or a mix, whose gradients are too coarse for
    attribution maps. The message says how to convert (``module.float()``)."""
    found = set()
    for kind, tensors in (("parameters", module.parameters()), ("buffers", module.buffers())):
        for t in tensors:
            if t.is_floating_point():
                found.add(t.dtype)
            if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                where = f"{who}: " if who else ""
                raise TypeError(
                    f"{where}the network's {kind} are {str(t.dtype).replace('torch.', '')}; "
                    "cnnwidgets expects float32 (or float64: half-precision gradients are "
                    "too coarse for attribution maps). Convert it with module.float(), e.g. "
                    "cw.Model(net.float()); it can stay on its device"
                )
    if len(found) > 1:
        raise TypeError(f"{who + ': ' if who else ''}the network mixes float32 and float64 "
                        "parameters or buffers; convert it with module.float()")
    return found.pop() if found else torch.float32


def as_model(model, who: str) -> Model:
    """``model`` as a :class:`Model`: a ``Model`` as it is, a ``torch.nn.Module`` wrapped with
    the ImageNet defaults (``Model(module)``); anything else is a ``TypeError`` that says what
    to pass. A half-precision network is a ``TypeError`` saying how to convert it
    (:func:`check_dtype`). ``who``: the function or widget, for the message."""
    if isinstance(model, Model):
        check_dtype(model.module, who)
        return model
    if isinstance(model, nn.Module):
        check_dtype(model, who)
        return Model(model)
    hint = (f"; cw.load_model({model!r}) loads a model by name" if isinstance(model, str)
            else "")
    raise TypeError(f"{who} needs a cw.Model or a torch.nn.Module, not "
                    f"{type(model).__name__}{hint}")
