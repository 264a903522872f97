"""Resizing (extension; the authors' networks do not resize): ``F.interpolate`` and the
upsampling modules, as segmentation networks use them to bring class scores back to the input
size (torchvision's FCN, DeepLabV3, LR-ASPP) and to spread a pooled 1×1 map (ASPP's pooling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..points import chw_to_flat, flat_to_chw, shape3
from ..registry import rule


def source_index(i: torch.Tensor, size_in: int, size_out: int, mode: str,
                 align_corners) -> torch.Tensor:
    """The input row (or column) that output row ``i`` reads most from: for ``nearest`` the
    one it copies (``floor(i · in / out)``), for the linear modes the nearest of the rows it
    blends, i.e. the one with the largest interpolation weight (the source coordinate
    ``(i + ½) · in / out − ½``, or ``i · (in − 1) / (out − 1)`` with ``align_corners``, rounded)."""
    if size_in == 1:
        return torch.zeros_like(i)
    scale = size_in / size_out
    if mode in ("nearest", "nearest-exact"):
        src = torch.floor(i.double() * scale) if mode == "nearest" else \
            torch.floor((i.double() + 0.5) * scale)
    elif align_corners:
        src = torch.round(i.double() * ((size_in - 1) / max(size_out - 1, 1)))
    else:
        src = torch.round((i.double() + 0.5) * scale - 0.5)
    return src.clamp(0, size_in - 1).to(i.dtype)


def _send(walk, node, idx, mode: str, align_corners) -> None:
    src = node.args[0]
    x = walk.values[src]
    if x.dim() != 4:
        raise walk.unsupported(node, "only resizing of 2-D maps (N×C×H×W)")
    shape_in, shape_out = shape3(x), shape3(walk.values[node])
    c, i, j = flat_to_chw(idx, shape_out)
    i = source_index(i, shape_in[1], shape_out[1], mode, align_corners)
    j = source_index(j, shape_in[2], shape_out[2], mode, align_corners)
    walk.send(src, chw_to_flat(c, i, j, shape_in))


@rule(F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest)
def interpolate(walk, node, idx):
    """Each point moves, in its channel, to the input pixel it reads most from (extension:
    the resize's own "centre" rule, see :func:`source_index`)."""
    if node.target is F.upsample_bilinear:
        mode, align = "bilinear", True
    elif node.target is F.upsample_nearest:
        mode, align = "nearest", None
    else:
        names = ["input", "size", "scale_factor", "mode", "align_corners"]
        bound = dict(zip(names, node.args))
        bound.update({k: v for k, v in node.kwargs.items() if k in names})
        mode, align = bound.get("mode", "nearest"), bound.get("align_corners")
    _send(walk, node, idx, mode, align)


@rule(nn.Upsample)
def upsample(walk, node, idx):
    """``nn.Upsample`` (and ``UpsamplingBilinear2d`` / ``UpsamplingNearest2d``): as
    :func:`interpolate`."""
    m = walk.modules[node.target]
    _send(walk, node, idx, m.mode, m.align_corners)
