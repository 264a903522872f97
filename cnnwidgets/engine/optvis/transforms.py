"""Transformation robustness (Olah et al. 2017): random, differentiable changes each step.

Lucid's standard chain — pad 12, jitter 8, random scale 0.90–1.10, random rotation ±10°,
jitter 4 — done with plain torch ops on the whole batch (one ``grid_sample`` for scale and
rotation together, so the chain costs a few percent of a forward pass). Randomness comes from a
``torch.Generator`` so a seed makes runs identical. Padding uses the value 0.5 (mid grey), as
Lucid's constant pad; scale and rotation keep the image size (a zoom about the centre), where
Lucid resamples to a new size — the network (global-pooled) sees the same content either way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _randint(n: int, generator) -> int:
    return int(torch.randint(0, n, (1,), generator=generator))


def pad(x: torch.Tensor, p: int, value: float = 0.5) -> torch.Tensor:
    return F.pad(x, (p, p, p, p), mode="constant", value=value)


def jitter(x: torch.Tensor, d: int, generator=None) -> torch.Tensor:
    """Random crop that shifts the image by 0..d pixels (the output is d pixels smaller)."""
    if d <= 0:
        return x
    dy, dx = _randint(d + 1, generator), _randint(d + 1, generator)
    h, w = x.shape[-2:]
    return x[..., dy:dy + h - d, dx:dx + w - d]


def scale_rotate(x: torch.Tensor, scale: float, degrees: float, fill: float = 0.5) -> torch.Tensor:
    """Zoom by ``scale`` and rotate by ``degrees`` about the centre (bilinear, same size).
    Pixels from outside the image are ``fill`` (replicating the border instead would send
    the gradient of the whole outside onto the edge pixels, which then saturate)."""
    if scale == 1.0 and degrees == 0.0:
        return x
    a = math.radians(degrees)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


SCALES = [1 + (i - 5) / 50 for i in range(11)]  # 0.90 … 1.10
ANGLES = list(range(-10, 11))  # −10° … +10°


class Robustness:
    """The standard chain. ``Robustness(pad_=0)`` etc. switch steps off."""

    def __init__(self, pad_: int = 12, jitter1: int = 8, scales=SCALES, angles=ANGLES,
                 jitter2: int = 4):
        self.pad, self.jitter1, self.jitter2 = pad_, jitter1, jitter2
        self.scales, self.angles = list(scales), list(angles)

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        if self.pad:
            x = pad(x, self.pad)
        x = jitter(x, self.jitter1, generator)
        s = self.scales[_randint(len(self.scales), generator)] if self.scales else 1.0
        r = self.angles[_randint(len(self.angles), generator)] if self.angles else 0.0
        x = scale_rotate(x, s, float(r))
        return jitter(x, self.jitter2, generator)


def identity(x, generator=None):
    return x
