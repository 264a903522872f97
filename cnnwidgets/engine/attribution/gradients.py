"""Gradient methods: saliency, gradient × input, SmoothGrad, Integrated Gradients,
guided backprop, DeconvNet. Each raw output is input-shaped (3×H×W, in the network's
normalised input space)."""
from __future__ import annotations

import numpy as np
import torch

from .registry import Param, register

BATCH = Param("batch_size", int, 16, (1, 1024), "images per forward/backward pass")
SEED = Param("seed", int, 0, (0, 2**31 - 1), "random seed (same seed, same result)")


@register("saliency", kind="gradient",
          help="|∂score/∂input| (Simonyan et al. 2014); map: largest over colour channels")
def saliency(ctx):
    g, s = ctx.input_grad(ctx.x)
    ctx.base_score = float(s[0])
    return g[0].abs()


@register("gradient_x_input", kind="gradient", signed=True,
          help="input × gradient (Shrikumar et al. 2016); map: sum over colour channels")
def gradient_x_input(ctx):
    g, s = ctx.input_grad(ctx.x)
    ctx.base_score = float(s[0])
    return (ctx.x * g)[0]


@register(
    "smoothgrad",
    params=[
        Param("n_samples", int, 25, (1, 1000), "number of noisy copies averaged"),
        Param("noise", float, 0.15, (0.0, 1.0), "noise σ as a fraction of the input range",
              step=0.01),
        BATCH,
        SEED,
    ],
    kind="gradient",
    help="mean gradient over noisy copies (Smilkov et al. 2017); map: largest |.| over channels",
)
def smoothgrad(ctx, n_samples, noise, batch_size, seed):
    x = ctx.x
    sigma = float(noise) * float(x.max() - x.min())
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def noisy(a, b):  # x + N(0, σ²), one draw per sample: independent of the batching
        eps = torch.empty((b - a, *x.shape[1:]), dtype=x.dtype)
        for row in eps:
            row.normal_(generator=generator)
        return eps.to(x.device).mul_(sigma).add_(x)

    return ctx.input_grad_sum(noisy, n_samples, batch_size, desc="smoothgrad") / n_samples


def path_weights(steps: int, rule: str):
    """``(alphas, weights)`` of the quadrature rule on [0, 1] (as Captum's)."""
    if rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * w
    if rule == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        w = np.full(steps, 1.0 / steps)
        w[0] /= 2
        w[-1] /= 2
        return alphas, w
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    alphas = (np.arange(steps) + offsets[rule]) / steps
    return alphas, np.full(steps, 1.0 / steps)


def baseline_for(ctx, name: str) -> torch.Tensor:
    """A baseline in the network's input space: ``"black"`` (a black image, normalised),
    ``"zeros"`` (all-zero network input: the data set's mean colour for ImageNet-normalised
    models)."""
    if name == "black":
        return ctx.model.normalize(torch.zeros_like(ctx.x))
    return torch.zeros_like(ctx.x)


@register(
    "integrated_gradients",
    params=[
        Param("steps", int, 50, (2, 1000), "points on the path from the baseline"),
        Param("rule", str, "gausslegendre", help="quadrature rule of the path integral",
              choices=("gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left",
                       "riemann_right")),
        Param("baseline", str, "black", help="reference input: black image or zero input",
              choices=("black", "zeros")),
        BATCH,
    ],
    kind="gradient",
    signed=True,
    help="(x − x′) · mean gradient on the path from a baseline (Sundararajan et al. 2017)",
)
def integrated_gradients(ctx, steps, rule, baseline, batch_size):
    x = ctx.x
    base = baseline_for(ctx, baseline)
    alphas, weights = path_weights(steps, rule)
    alphas = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
    weights = torch.tensor(weights, dtype=x.dtype, device=x.device)
    delta = x - base
    path = ctx.input_grad_sum(lambda a, b: base + alphas[a:b] * delta, steps, batch_size,
                              weights, "integrated gradients")  # Σ wᵢ ∂F/∂x at x′ + αᵢ(x − x′)
    return delta[0] * path


@register("guided_backprop", kind="gradient",
          help="gradient with negative signals stopped at every ReLU-like unit (Springenberg 2015)")
def guided_backprop(ctx):
    g, s = ctx.input_grad(ctx.x, rule="guided")
    ctx.base_score = float(s[0])
    return g[0]


@register("deconvnet", kind="gradient",
          help="backward pass with ReLU applied to the signal itself (Zeiler & Fergus 2014)")
def deconvnet(ctx):
    g, s = ctx.input_grad(ctx.x, rule="deconvnet")
    ctx.base_score = float(s[0])
    return g[0]
