"""Pooling: max pooling and global average pooling (authors); average and adaptive pooling,
and means over the spatial dims, treated like max pooling (extension)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..points import flat_to_chw, pads_lrtb, shape3
from ..registry import rule


def _window_argmax(walk, node, idx, src, pooled_indices, pads=(0, 0, 0, 0)):
    """Move points to the input positions that ``pooled_indices`` (C×oh×ow, flat h*W+w in
    the input, or in the input padded by ``pads`` = (left, right, top, bottom)) names."""
    cin, h_in, w_in = shape3(walk.values[src])
    c, _, _ = flat_to_chw(idx, shape3(walk.values[node]))
    flat = pooled_indices.reshape(-1)[idx]
    if any(pads):  # indices are in the padded map: shift back and clip
        wp = w_in + pads[0] + pads[1]
        r = (flat // wp - pads[2]).clamp(0, h_in - 1)
        q = (flat % wp - pads[0]).clamp(0, w_in - 1)
        flat = r * w_in + q
    walk.send(src, c * (h_in * w_in) + flat)


@rule(nn.MaxPool2d, nn.AvgPool2d, shown=True)
def pool_module(walk, node, idx):
    """Max pooling (authors); average pooling treated like max pooling (extension): the point
    moves to the argmax of its window, found by ``max_pool2d(return_indices=True)`` with the
    layer's own padding, dilation and ``ceil_mode``. A ``static_padding`` submodule
    (EfficientNet's TensorFlow "same" pooling) pads the input first."""
    m = walk.modules[node.target]
    src = node.args[0]
    x = walk.values[src]
    static = getattr(m, "static_padding", None)
    pads = (0, 0, 0, 0)
    if isinstance(static, nn.Module) and hasattr(static, "padding"):
        pads = pads_lrtb(static.padding)
        x = F.pad(x, pads)
    dilation = getattr(m, "dilation", 1)
    _, ind = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, dilation, m.ceil_mode,
                          return_indices=True)
    _window_argmax(walk, node, idx, src, ind[0], pads)


@rule(F.max_pool2d, F.avg_pool2d, shown=True)
def pool_function(walk, node, idx):
    """``F.max_pool2d`` / ``F.avg_pool2d`` with their own arguments (as :func:`pool_module`)."""
    src = node.args[0]
    names = ["input", "kernel_size", "stride", "padding"]
    names += ["dilation", "ceil_mode"] if node.target is F.max_pool2d else ["ceil_mode"]
    bound = dict(zip(names, node.args))
    bound.update({k: val for k, val in node.kwargs.items() if k in names})
    k = bound["kernel_size"]
    stride = bound.get("stride") or k
    _, ind = F.max_pool2d(walk.values[src], k, stride, bound.get("padding", 0),
                          bound.get("dilation", 1), bound.get("ceil_mode", False),
                          return_indices=True)
    _window_argmax(walk, node, idx, src, ind[0])


@rule(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d,
      F.adaptive_max_pool2d, shown=True)
def adaptive_pool(walk, node, idx):
    """Adaptive (incl. global) average/max pooling: argmax of each adaptive window
    (authors' GAP rule; average treated like max, an extension for non-global output)."""
    src = node.args[0]
    out = walk.values[node]
    _, ind = F.adaptive_max_pool2d(walk.values[src], tuple(out.shape[-2:]), return_indices=True)
    _window_argmax(walk, node, idx, src, ind[0])


@rule(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax", shown=True)
def reduce(walk, node, idx):
    """``mean``/``sum``/``amax`` over trailing dims: a global pool — argmax over them."""
    src = node.args[0]
    x = walk.values[src]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        raise walk.unsupported(node, "a reduction over the whole tensor")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % x.dim() for d in dims)
    if 0 in dims or dims != list(range(x.dim() - len(dims), x.dim())):
        raise walk.unsupported(node, "only reductions over the trailing (spatial) dims")
    lead = math.prod(x.shape[1:x.dim() - len(dims)])
    flat = x[0].reshape(lead, -1)
    arg = flat.argmax(1)
    walk.send(src, idx * flat.shape[1] + arg[idx])
