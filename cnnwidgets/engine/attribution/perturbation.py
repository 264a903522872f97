"""Perturbation methods: occlusion and RISE. They need no gradients; they run the model on
batches of perturbed copies of the input."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gradients import SEED, baseline_for
from .registry import Param, register

BATCH = Param("batch_size", int, 32, (1, 1024), "perturbed copies per forward pass")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of each window along one axis: every ``stride`` pixels until the window reaches
    the edge, the last one clipped at the edge (as Captum's ``Occlusion``)."""
    count = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(count)]


@register(
    "occlusion",
    params=[
        Param("window", int, 32, (1, 1024), "side of the square patch, in input pixels"),
        Param("stride", int, 16, (1, 1024), "step between patches, in input pixels"),
        Param("baseline", str, "zeros", help="what the patch shows: zero input or black",
              choices=("zeros", "black")),
        BATCH,
    ],
    kind="perturbation",
    signed=True,
    help="score drop when a patch is replaced by the baseline, averaged per pixel (Zeiler 2014)",
)
def occlusion(ctx, window, stride, baseline, batch_size):
    x = ctx.x
    _, _, H, W = x.shape
    kh, kw = min(window, H), min(window, W)
    base = baseline_for(ctx, baseline)
    boxes = [(r, c) for r in window_starts(H, kh, stride) for c in window_starts(W, kw, stride)]
    total = torch.zeros(H, W, dtype=x.dtype, device=x.device)
    count = torch.zeros(H, W, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        y = float(ctx.score(x)[0])
        ctx.base_score = y
        for lo, hi in ctx.batches(len(boxes), batch_size, "occlusion"):
            batch = x.repeat(hi - lo, 1, 1, 1)
            for i, (r, c) in enumerate(boxes[lo:hi]):
                batch[i, :, r:r + kh, c:c + kw] = base[0, :, r:r + kh, c:c + kw]
            drops = y - ctx.score(batch)
            for (r, c), d in zip(boxes[lo:hi], drops):
                total[r:r + kh, c:c + kw] += d
                count[r:r + kh, c:c + kw] += 1
    heat = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return heat.expand(x.shape[1], H, W), heat


def rise_draws(n: int, size, cells: int, p: float, generator: torch.Generator):
    """The random part of ``n`` RISE masks: binary grids and shifts, drawn up front so that the
    result does not depend on the batch size."""
    H, W = size
    ch, cw = math.ceil(H / cells), math.ceil(W / cells)
    grid = (torch.rand(n, 1, cells, cells, generator=generator) < p).float()
    dy = torch.randint(0, ch, (n,), generator=generator)
    dx = torch.randint(0, cw, (n,), generator=generator)
    return grid, dy, dx


def masks_from(grid, dy, dx, size) -> torch.Tensor:
    """Upsample the grids bilinearly to (cells+1)×cell size and crop H×W at the shifts."""
    H, W = size
    cells = grid.shape[-1]
    ch, cw = math.ceil(H / cells), math.ceil(W / cells)
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear",
                       align_corners=False)[:, 0]
    return torch.stack([up[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(grid.shape[0])])


def rise_masks(n: int, size, cells: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` RISE masks N×H×W: random binary ``cells``×``cells`` grids (1 with probability
    ``p``), upsampled bilinearly and cropped at a random shift (Petsiuk et al. 2018)."""
    return masks_from(*rise_draws(n, size, cells, p, generator), size)


@register(
    "rise",
    params=[
        Param("n_masks", int, 1000, (1, 20000), "number of random masks"),
        Param("cells", int, 7, (2, 64), "mask grid size (cells per side)"),
        Param("p", float, 0.5, (0.05, 0.95), "probability that a cell is kept", step=0.05),
        Param("baseline", str, "black", help="what masked pixels show", choices=("black", "zeros")),
        BATCH,
        SEED,
    ],
    kind="perturbation",
    help="average of random masks weighted by the class probability (Petsiuk et al. 2018)",
    # (for a dense output: the class's mean probability over the region; boxes and callable
    # targets: their score — see targets.Resolved.probability)
)
def rise(ctx, n_masks, cells, p, baseline, batch_size, seed):
    x = ctx.x
    size = tuple(x.shape[-2:])
    base = baseline_for(ctx, baseline)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    grid, dy, dx = rise_draws(n_masks, size, cells, p, generator)
    total = torch.zeros(size, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        ctx.base_score = float(ctx.score(x)[0])
        for lo, hi in ctx.batches(n_masks, batch_size, "rise"):
            masks = masks_from(grid[lo:hi], dy[lo:hi], dx[lo:hi], size).to(x.device)[:, None]
            probs = ctx.target.probability(ctx.logits(base + masks * (x - base)))
            total += torch.einsum("n,nhw->hw", probs, masks[:, 0])
    return total / (n_masks * p)
