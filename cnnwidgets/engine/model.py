"""``cw.Model``: a classification CNN plus everything needed to show what it sees.

The wrapper owns the preprocessing (so overlays line up with the exact crop the network
sees), the class labels, layer discovery and a memory-bounded activation cache. It never
changes the wrapped module for good: every call that runs it goes through
:func:`cnnwidgets.engine.hooks.restored`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .cache import TensorCache
from .hooks import capture, layer_not_found, restored, this_thread
from .images import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Module class names that never make a feature map worth showing on their own.
_SKIP_TYPES = {"Identity", "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d",
               "Dropout", "Dropout2d", "Flatten"}


@dataclass(frozen=True)
class LayerInfo:
    """What a dry forward pass learned about one layer."""

    name: str  #: qualified module name, as in ``named_modules``
    type: str  #: the module's class name
    shape: tuple  #: output shape for one image (C, h, w) — or (features,) for vectors
    calls: int  #: how many times the module runs in one forward pass
    conv: bool  #: whether it is a convolution module


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


class Model:
    """Wrap any ``torch.nn.Module`` that maps an image batch N×3×H×W to class scores N×K.

    Parameters
    ----------
    module: the network. It is used where it lives (its device is not changed).
    transform: optional callable PIL image → 3×H×W tensor; by default the image is resized so
        that its shorter side is ``input_size / crop`` and centre-cropped to ``input_size``,
        then normalised with ``mean`` / ``std``.
    labels: class names; by default ImageNet's when the model has 1,000 outputs.
    input_size: (H, W) of the network input.
    output: callable picking the class scores out of a model that returns a tuple or dict.
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
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.module = module
        self.transform = transform
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.output = output
        self.crop = float(crop)
        self.name = name or type(module).__name__
        self._labels = list(labels) if labels is not None else None
        self._info: dict[str, LayerInfo] | None = None
        self._image_bytes: int | None = None
        self.cache = TensorCache(cache_bytes)

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

    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            n = self.num_classes
            self._labels = imagenet_labels() if n == 1000 else [f"class {i}" for i in range(n)]
        return self._labels

    @property
    def num_classes(self) -> int:
        if self._labels is not None:
            return len(self._labels)
        return int(self._dry_run()[1])

    # ------------------------------------------------------------------ images
    def prepare(self, image) -> tuple[torch.Tensor, np.ndarray]:
        """``(tensor 1×3×H×W on the model's device, display image H×W×3 float in [0, 1])``.

        The display image is the exact crop the network sees, so overlays line up.
        """
        pil = load_image(image)
        crop = self._crop(pil)
        display = np.asarray(crop, dtype=np.float32) / 255.0
        if self.transform is not None:
            tensor = self.transform(pil)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (3, 4):
                raise ValueError("the model's transform must return a 3×H×W tensor")
            if tensor.ndim == 3:
                tensor = tensor[None]
            h, w = tensor.shape[-2:]
            if (h, w) != display.shape[:2]:
                display = np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR),
                                     dtype=np.float32) / 255.0
        else:
            tensor = self.normalize(torch.from_numpy(display).permute(2, 0, 1)[None])
        return tensor.to(self.device, torch.float32), display

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (N×3×H×W) to the network's input space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def _crop(self, pil: Image.Image) -> Image.Image:
        H, W = self.input_size
        w, h = pil.size
        scale = max(H / self.crop / h, W / self.crop / w)
        rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
        resized = pil.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (rw - W) // 2, (rh - H) // 2
        return resized.crop((left, top, left + W, top + H))

    # ------------------------------------------------------------------ running
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on a prepared batch and return class scores N×K (graph kept)."""
        out = self.module(x)
        if self.output is not None:
            out = self.output(out)
        if not isinstance(out, torch.Tensor):
            kind = type(out).__name__
            raise ValueError(
                f"the model returned a {kind}, not a tensor of class scores; pass "
                "output=... to cw.Model to pick them, e.g. cw.Model(net, output=lambda out: out[0]) "
                "for a tuple or output=lambda out: out['logits'] for a dict"
            )
        if out.ndim != 2:
            raise ValueError(
                f"the model returned a tensor of shape {tuple(out.shape)}; cnnwidgets needs class "
                "scores of shape N×K (a classification network). Pass output=... to cw.Model to "
                "reduce it, e.g. output=lambda out: out.flatten(1)"
            )
        return out

    def predict(self, image, k: int = 5) -> list[tuple[int, str, float]]:
        """Top-``k`` classes as ``(index, label, probability)``."""
        x, _ = self.prepare(image)
        with restored(self.module), torch.no_grad():
            probs = self.scores(x).softmax(-1)[0]
        k = max(1, min(int(k), probs.numel()))
        values, indices = probs.topk(k)
        return [(int(i), self.label(int(i)), float(v)) for v, i in zip(values, indices)]

    def label(self, index: int) -> str:
        labels = self.labels
        return labels[index] if 0 <= index < len(labels) else f"class {index}"

    def target_index(self, target, image=None) -> int:
        """Resolve ``None`` (top-1 for ``image``), an index or a label string to an index."""
        if target is None:
            if image is None:
                raise ValueError("target=None needs an image to take the top-1 prediction of")
            return self.predict(image, k=1)[0][0]
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            n = self.num_classes
            if not 0 <= int(target) < n:
                raise ValueError(f"target {target} is out of range; the model has {n} classes (0–{n - 1})")
            return int(target)
        if isinstance(target, str):
            labels = self.labels
            lowered = [lab.lower() for lab in labels]
            if target.lower() in lowered:
                return lowered.index(target.lower())
            import difflib

            close = difflib.get_close_matches(target, labels, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"no class label {target!r}{hint} (model.labels lists them all)")
        raise ValueError(f"target must be None, a class index or a label, not {type(target).__name__}")

    # ------------------------------------------------------------------ layers
    def _dry_run(self):
        """One forward pass on a blank input that records every module's output shape."""
        if self._info is not None:
            return self._info, self._num_classes
        order: dict[str, list] = {}
        handles = []
        named = [(n, m) for n, m in self.module.named_modules() if n]
        try:
            for n, m in named:
                def hook(mod, args, out, n=n):
                    t = out if isinstance(out, torch.Tensor) else None
                    entry = order.setdefault(n, [None, 0, type(mod).__name__,
                                                 isinstance(mod, nn.modules.conv._ConvNd)])
                    entry[1] += 1
                    if t is not None and entry[0] is None:
                        entry[0] = tuple(t.shape[1:])
                handles.append(m.register_forward_hook(this_thread(hook)))
            x = torch.zeros(1, 3, *self.input_size, device=self.device)
            with restored(self.module), torch.no_grad():
                scores = self.scores(x)
        finally:
            for h in handles:
                h.remove()
        self._num_classes = int(scores.shape[1])
        self._info = {
            n: LayerInfo(n, typ, shape or (), calls, conv)
            for n, (shape, calls, typ, conv) in order.items()
        }
        return self._info, self._num_classes

    def image_bytes(self) -> int:
        """Bytes of every leaf module's output for one image at ``input_size`` (from the dry
        run): an upper bound of what a forward + backward pass keeps per image (measured
        0.4–0.7 of it), used to size batches to the memory available (:mod:`.memory`)."""
        info, _ = self._dry_run()
        if self._image_bytes is None:
            modules = dict(self.module.named_modules())
            total = 0
            for name, layer in info.items():
                m = modules.get(name)
                if m is None or next(m.children(), None) is not None or not layer.shape:
                    continue
                count = 1
                for d in layer.shape:
                    count *= int(d)
                total += count * layer.calls
            p = next(self.module.parameters(), None)
            self._image_bytes = total * (p.element_size() if p is not None else 4)
        return self._image_bytes

    def layer_info(self, name: str | None = None):
        """``LayerInfo`` of one layer, or a dict of all layers in forward order."""
        info, _ = self._dry_run()
        if name is None:
            return dict(info)
        if name not in info:
            raise layer_not_found(name, self.layers("all"))
        return info[name]

    def layers(self, kind: str = "maps") -> list[str]:
        """Layer names in forward order.

        ``kind="maps"`` (default): every layer whose output is a feature map C×h×w and that
        runs once per forward pass (convolutions, batch norms, activations, pooling, blocks).
        ``"conv"``: convolution modules only. ``"all"``: every module that ran.
        """
        info, _ = self._dry_run()
        if kind == "all":
            return list(info)
        if kind == "conv":
            return [n for n, i in info.items() if i.conv]
        if kind == "maps":
            return [
                n for n, i in info.items()
                if len(i.shape) == 3 and i.shape[1] * i.shape[2] > 1 and i.calls == 1
                and i.type not in _SKIP_TYPES
            ]
        raise ValueError(f"kind must be 'maps', 'conv' or 'all', not {kind!r}")

    def last_conv_layer(self) -> str:
        """The deepest layer that outputs a feature map (the usual choice for CAM methods)."""
        maps = self.layers("maps")
        if not maps:
            raise ValueError("the model has no layer that outputs a feature map")
        return maps[-1]

    def check_layer(self, layer: str) -> LayerInfo:
        """Validate a layer name for activation capture; returns its ``LayerInfo``."""
        info, _ = self._dry_run()
        if layer not in info:
            names = dict(self.module.named_modules())
            if layer in names and layer:
                raise ValueError(f"layer {layer!r} does not run in the model's forward pass")
            raise layer_not_found(layer, list(info))
        i = info[layer]
        if i.calls > 1:
            raise ValueError(
                f"layer {layer!r} ({i.type}) runs {i.calls} times in one forward pass, so its output "
                "is ambiguous; pick the layer just before it (model.layers() lists unambiguous ones)"
            )
        return i

    # ------------------------------------------------------------------ activations
    @staticmethod
    def _key(x: torch.Tensor) -> str:
        data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def _weights_version(self) -> int:
        """A number that changes when any weight or buffer is updated in place (optimiser
        step, ``load_state_dict``, ``nn.init``) or replaced, so that cached activations of an
        older network are never served. (A change made through ``.data`` leaves no trace:
        call ``model.cache.clear()`` after one.)"""
        return hash(tuple((t.data_ptr(), t._version) for m in self.module.modules()
                          for d in (m._parameters, m._buffers) for t in d.values()
                          if t is not None))

    def layer_bytes(self, layer: str) -> int:
        """Bytes one image's output of ``layer`` takes in the activation cache."""
        n = 1
        for d in self.layer_info(layer).shape:
            n *= int(d)
        return 4 * n

    def prefetch(self, image, layers, max_bytes: int | None = None) -> list[str]:
        """Capture many layers for ``image`` in one forward pass, so later calls to
        :meth:`activations` for them are cache hits.

        Layers are taken in the order given while their total size stays within ``max_bytes``
        (default: half the activation cache). Returns the names now cached.
        """
        budget = self.cache.max_bytes // 2 if max_bytes is None else int(max_bytes)
        chosen, total = [], 0
        for name in layers:
            size = self.layer_bytes(name)
            if total + size > budget:
                continue
            chosen.append(name)
            total += size
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
        key = (self._key(x), self._weights_version())
        found = {n: self.cache.get((key, n)) for n in names}
        missing = [n for n, v in found.items() if v is None]
        if missing:
            with restored(self.module), torch.no_grad(), capture(self.module, missing) as rec:
                self.scores(x)
            for n in missing:
                if n not in rec.outputs:
                    raise ValueError(f"layer {n!r} did not produce a tensor output")
                value = rec.outputs[n][0].to("cpu")
                self.cache.put((key, n), value)
                found[n] = value
        return found[layer] if isinstance(layer, str) else found


def as_model(model, who: str) -> Model:
    """``model`` as a :class:`Model`: a ``Model`` as it is, a ``torch.nn.Module`` wrapped with
    the ImageNet defaults (``Model(module)``); anything else is a ``TypeError`` that says what
    to pass. ``who``: the function or widget, for the message."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return Model(model)
    hint = (f"; cw.load_model({model!r}) loads a model by name" if isinstance(model, str)
            else "")
    raise TypeError(f"{who} needs a cw.Model or a torch.nn.Module, not "
                    f"{type(model).__name__}{hint}")
