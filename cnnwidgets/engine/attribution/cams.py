"""Class activation map methods. Each weighs a layer's activations A (C×h×w) and returns the
h×w map as ``raw``; the definitions follow the papers and, where they leave a choice open,
pytorch-grad-cam (so that ``raw`` can be compared with its maps before their min-max scaling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..relu_rules import relu_rule
from .core import class_weights
from .registry import Param, register

CAM_BATCH = Param("batch_size", int, 32, (1, 1024), "masked or ablated copies per forward pass")


def weighted_sum(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k A_k for weights (C,) and activations 1×C×h×w → h×w."""
    return torch.einsum("c,chw->hw", weights.to(a.dtype), a[0])


@register("cam", kind="cam", layer=True, signed=False,
          help="Σ_k w_ck A_k with the final linear layer's weights (Zhou et al. 2016; GAP models)")
def cam(ctx):
    a, out = ctx.layer_value()
    w = class_weights(ctx, a.shape[1])
    ctx.base_score = float(ctx.target.score(out)[0])
    raw = weighted_sum(w, a)  # no ReLU in the paper's definition
    return raw, raw.clamp(min=0)


def grad_cam_of(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """relu(Σ_k mean(∂y/∂A_k) A_k) for activations and gradients 1×C×h×w."""
    return weighted_sum(g.mean(dim=(2, 3))[0], a).clamp(min=0)


def grad_cam_map(ctx, layer=None) -> torch.Tensor:
    a, g, s = ctx.layer_and_grad(layer)
    ctx.base_score = float(s[0])
    return grad_cam_of(a, g)


@register("grad_cam", kind="cam", layer=True,
          help="relu(Σ_k mean(∂y/∂A_k) A_k) (Selvaraju et al. 2017)")
def grad_cam(ctx):
    return grad_cam_map(ctx)


@register("grad_cam_pp", kind="cam", layer=True,
          help="Grad-CAM with second-order weights (Chattopadhyay et al. 2018)")
def grad_cam_pp(ctx):
    a, g, s = ctx.layer_and_grad()
    ctx.base_score = float(s[0])
    # paper eq. 19 with the exponential-output trick: higher derivatives are powers of g
    g2, g3 = g * g, g * g * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (g.clamp(min=0) * alpha).sum(dim=(2, 3))[0]
    return weighted_sum(weights, a).clamp(min=0)


@register("xgrad_cam", kind="cam", layer=True,
          help="Grad-CAM with activation-normalised gradient weights (Fu et al. 2020)")
def xgrad_cam(ctx):
    a, g, s = ctx.layer_and_grad()
    ctx.base_score = float(s[0])
    weights = (g * a / (a.sum(dim=(2, 3), keepdim=True) + 1e-7)).sum(dim=(2, 3))[0]
    return weighted_sum(weights, a).clamp(min=0)


@register("layer_cam", kind="cam", layer=True,
          help="relu(Σ_k relu(∂y/∂A_k) ⊙ A_k), pixel-wise weights (Jiang et al. 2021)")
def layer_cam(ctx):
    a, g, s = ctx.layer_and_grad()
    ctx.base_score = float(s[0])
    return (g.clamp(min=0) * a)[0].sum(0).clamp(min=0)


@register("eigen_cam", kind="cam", layer=True, signed=False,
          help="projection of the activations on their first principal component (Muhammad 2020)")
def eigen_cam(ctx):
    a, out = ctx.layer_value()
    ctx.base_score = float(ctx.target.score(out)[0])
    c, h, w = a.shape[1:]
    flat = a[0].reshape(c, h * w).T.double()  # hw × C
    flat = flat - flat.mean(dim=0)
    _, _, vt = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[0]
    # the sign of a principal component is arbitrary: orient it with the mean activation
    mean = a[0].mean(0).reshape(-1).double()
    if torch.dot(proj - proj.mean(), mean - mean.mean()) < 0:
        proj = -proj
    raw = proj.reshape(h, w).float()
    return raw, raw.clamp(min=0)


def distinct_masks(a: torch.Tensor):
    """``(first, inverse)`` for Score-CAM's masks of the channels of ``a`` (C×h×w): the first
    channel of each distinct mask, and for each channel the index of its mask in ``first``.
    A mask is the channel upsampled (a linear map) and min-max scaled, so channels equal up to
    a positive scale and offset give the same mask, and constant channels all give the zero
    mask (after a ReLU, channels active at a single position are common)."""
    c = a.shape[0]
    flat = a.reshape(c, -1)
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    keys = torch.where(span > 0, (flat - low) / span.clamp(min=1e-30), torch.zeros_like(flat))
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), c, dtype=torch.long, device=a.device)
    first.scatter_reduce_(0, inverse, torch.arange(c, device=a.device), reduce="amin")
    return first, inverse


@register("score_cam", params=[Param("batch_size", int, 16, (1, 1024),
                                      "masked copies per forward pass")],
          kind="cam", layer=True,
          help="channels as input masks, weighted by the softmax of the masked scores (Wang 2020)")
def score_cam(ctx, batch_size):
    a, out = ctx.layer_value()
    ctx.base_score = float(ctx.target.score(out)[0])
    first, inverse = distinct_masks(a[0])  # each distinct mask is scored once
    # S_k = f(X ∘ s(Up(A_k))), s: min-max scaling to [0, 1]
    scores = ctx.masked_scores(a[0, first], batch_size, "score-cam")[inverse]
    return weighted_sum(torch.softmax(scores, dim=0), a).clamp(min=0)


@register("ablation_cam", params=[CAM_BATCH], kind="cam", layer=True,
          help="weights = relative score drop when each channel is zeroed (Desai & Ramaswamy 2020)")
def ablation_cam(ctx, batch_size):
    a, out = ctx.layer_value()
    y = ctx.target.score(out)[0]
    ctx.base_score = float(y)
    c = a.shape[1]
    drops = torch.empty(c, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        for lo, hi in ctx.batches(c, batch_size, "ablation-cam"):
            n = hi - lo
            ablated = a.expand(n, -1, -1, -1).clone()
            ablated[torch.arange(n), torch.arange(lo, hi)] = 0  # copy i: channel lo + i zeroed
            drops[lo:hi] = ctx.layer_scores(ablated)
    weights = (y - drops) / y
    return weighted_sum(weights, a).clamp(min=0)


@register("guided_grad_cam", kind="cam", layer=True,
          help="guided backprop × upsampled Grad-CAM (Selvaraju et al. 2017); raw is 3×H×W")
def guided_grad_cam(ctx):
    # One forward pass serves both backward passes: the plain gradient to the layer for
    # Grad-CAM, then (the ReLU rule switched to "guided") the guided gradient to the input.
    x = ctx.x.detach().requires_grad_(True)
    with torch.enable_grad(), relu_rule("plain") as mode:
        with ctx.tap() as box:
            s = ctx.score(x)
        a = box["value"]
        (g,) = torch.autograd.grad(s.sum(), a, retain_graph=True)
        mode.use("guided")
        (guided,) = torch.autograd.grad(s.sum(), x)
    ctx.base_score = float(s.detach()[0])
    heat = grad_cam_of(a.detach(), g)
    up = F.interpolate(heat[None, None], size=ctx.x.shape[-2:], mode="bilinear",
                       align_corners=False)[0]
    return guided[0] * up
