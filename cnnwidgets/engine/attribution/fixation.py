"""CNN Fixations as an attribution method: its map is the fixation heatmap.

The backtracking itself lives in :mod:`cnnwidgets.engine.fixations`; this unit only adapts it
to the registry, so ``cw.attribute(model, image, "fixations")`` and the attribution explorer
offer it beside Grad-CAM.
"""
from __future__ import annotations

import math

import torch

from ..fixations import backtrack
from .registry import Param, register


@register(
    "fixations",
    params=[
        Param("sigma", float, 20.0, (1.0, 100.0),
              "heatmap blur σ in pixels for a 224-px input (scaled with the input size)", step=1.0),
        Param("outlier_removal", bool, True,
              help="drop points with fewer than 5% of all points within 10% of the diagonal"),
    ],
    kind="other",
    help="CNN Fixations (Mopuri et al. 2019): unravel the forward pass to the pixels; no gradients",
)
def fixations_method(ctx, sigma, outlier_removal):
    """raw: the H×W mask of kept fixation points; map: their Gaussian-blurred heatmap."""
    fix = backtrack(ctx.model.module, ctx.x, ctx.target, outlier_removal=outlier_removal,
                    output=ctx.model.output, model=ctx.model)
    h, w = fix.image_size
    heat = fix.heatmap(sigma * math.sqrt(h * w) / 224.0)
    return torch.from_numpy(fix.mask()), torch.from_numpy(heat)
