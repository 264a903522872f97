"""The layers of a network as one dry forward pass saw them: names in forward order, output
shapes, how often each runs, which are convolutions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .hooks import layer_not_found, restored, this_thread

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


class LayerIndex:
    """Every module that ran in one forward pass, in the order it first ran; built by
    :meth:`dry_run`. ``num_classes``: the width of the scores that pass returned."""

    def __init__(self, info: dict[str, LayerInfo], num_classes: int | None,
                 output_shape: tuple | None = None):
        self.info = info
        self.num_classes = num_classes  #: classes of the output (None: not class scores)
        self.output_shape = output_shape  #: one image's output shape (None: not a tensor)

    @classmethod
    def dry_run(cls, module: nn.Module, scores: Callable[[torch.Tensor], torch.Tensor],
                input_size: tuple, device, dtype=torch.float32) -> "LayerIndex":
        """Run ``scores`` (the network with its output picked) once on a blank input, recording
        every named module's output shape and number of calls, and the output's shape."""
        order: dict[str, list] = {}  # name → [shape of the first output, calls, type, conv]

        def hook(name, mod, args, out):
            entry = order.setdefault(name, [None, 0, type(mod).__name__,
                                            isinstance(mod, nn.modules.conv._ConvNd)])
            entry[1] += 1
            if isinstance(out, torch.Tensor) and entry[0] is None:
                entry[0] = tuple(out.shape[1:])

        handles = []
        try:
            for n, m in module.named_modules():
                if n:
                    handles.append(m.register_forward_hook(
                        this_thread(lambda *a, n=n: hook(n, *a))))
            x = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)
            with restored(module), torch.no_grad():
                out = scores(x)
        finally:
            for h in handles:
                h.remove()
        info = {n: LayerInfo(n, typ, shape or (), calls, conv)
                for n, (shape, calls, typ, conv) in order.items()}
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else None
        # classes: K of N×K, C of N×C×H×W, K of boxes N×B×(4+K)
        classes = None if shape is None else {1: shape[0], 3: shape[0]}.get(
            len(shape), shape[-1] - 4 if len(shape) == 2 and shape[-1] > 4 else None)
        return cls(info, classes, shape)

    def get(self, name: str) -> LayerInfo:
        """One layer's :class:`LayerInfo` (a helpful error for a name that did not run)."""
        if name not in self.info:
            raise layer_not_found(name, self.names("all"))
        return self.info[name]

    def names(self, kind: str = "maps") -> list[str]:
        """Layer names in forward order: ``"maps"`` (feature maps C×h×w, h·w > 1, one call per
        pass, not a padding / dropout / identity), ``"conv"`` or ``"all"``."""
        if kind == "all":
            return list(self.info)
        if kind == "conv":
            return [n for n, i in self.info.items() if i.conv]
        if kind == "maps":
            return [
                n for n, i in self.info.items()
                if len(i.shape) == 3 and i.shape[1] * i.shape[2] > 1 and i.calls == 1
                and i.type not in _SKIP_TYPES
            ]
        raise ValueError(f"kind must be 'maps', 'conv' or 'all', not {kind!r}")

    def last_map_layer(self) -> str:
        """The deepest layer that outputs a feature map (the usual choice for CAM methods; it
        need not be a convolution: a batch norm or an activation after it often is)."""
        maps = self.names("maps")
        if not maps:
            raise ValueError("the model has no layer that outputs a feature map")
        return maps[-1]

    def check(self, layer: str, module: nn.Module) -> LayerInfo:
        """``layer``'s :class:`LayerInfo` if its output can be captured unambiguously (it ran,
        once); otherwise an error that says why. ``module``: the network, for the message."""
        if layer not in self.info:
            if layer and layer in dict(module.named_modules()):
                raise ValueError(f"layer {layer!r} does not run in the model's forward pass")
            raise layer_not_found(layer, list(self.info))
        i = self.info[layer]
        if i.calls > 1:
            raise ValueError(
                f"layer {layer!r} ({i.type}) runs {i.calls} times in one forward pass, so its output "
                "is ambiguous; pick the layer just before it (model.layers() lists unambiguous ones)"
            )
        return i
