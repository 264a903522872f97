"""Points as the rules carry them: flat indices into one sample of a tensor, and the
conversions between those and (channel, row, column) coordinates."""
from __future__ import annotations

import torch

from .registry import UnsupportedOperationError


def shape3(t: torch.Tensor) -> tuple:
    """One sample's shape padded to 3 dims: N×F → (F, 1, 1), N×C×H×W → (C, H, W)."""
    s = tuple(t.shape[1:])
    if len(s) > 3:
        raise UnsupportedOperationError(f"tensors of {t.dim()} dimensions are not supported")
    return s + (1,) * (3 - len(s))


def flat_to_chw(idx: torch.Tensor, shape) -> tuple:
    """(channel, row, col) of flat indices into a sample of ``shape`` = (C, H, W)."""
    c_, h_, w_ = shape
    return idx // (h_ * w_), (idx // w_) % h_, idx % w_


def chw_to_flat(c, h, w, shape) -> torch.Tensor:
    """Flat indices of (channel, row, col) in a sample of ``shape`` = (C, H, W)."""
    _, h_, w_ = shape
    return (c * h_ + h) * w_ + w


def ravel_coords(coords, shape) -> torch.Tensor:
    """Flat indices of per-dimension coordinates in ``shape`` (one sample, no batch dim)."""
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


def height_width(v) -> tuple:
    """(height, width) of a layer setting given as one int or a pair (stride, dilation…)."""
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def pads_lrtb(pad) -> tuple:
    """(left, right, top, bottom) from an F.pad/ZeroPad2d padding spec over the last dims."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return pad + (0, 0)
    if len(pad) == 4:
        return pad
    raise UnsupportedOperationError(f"padding {pad} over more than the last two dimensions")
