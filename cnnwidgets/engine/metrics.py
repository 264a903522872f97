"""How good is an attribution map? ``cw.metrics``: deletion, insertion, pointing game and the
model-randomisation sanity check. No matplotlib here: results draw themselves through
:mod:`cnnwidgets.render.metrics` when ``.plot()`` is called.

* :func:`deletion` / :func:`insertion` (Petsiuk et al., RISE, BMVC 2018): remove the most
  important pixels first (replaced by a substrate: black by default) — a faithful map makes
  the class probability fall fast, so a *low* area under the curve is good; or insert them
  first into a blurred copy — the probability should rise fast, a *high* area is good.
* :func:`pointing_game` (Zhang et al., ECCV 2016): does the map's maximum fall on the object
  (within 15 px of its box or mask)?
* :func:`sanity_check` (Adebayo et al., NeurIPS 2018, cascading model-parameter
  randomisation): re-initialise the weights from the top layer down, recompute the map, and
  measure its rank correlation with the original. A map that stays the same while the
  network is destroyed does not explain the network.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attribution.core import Attribution, Context, attribute, input_only
from . import targets
from .checks import check_float, check_int, check_progress
from .model import Model, as_model

BASELINES = ("black", "zeros", "blur")


# --------------------------------------------------------------------------- deletion / insertion
@dataclass
class Curve:
    """A deletion or insertion curve: the target's score as pixels are removed or inserted in
    the order of the map."""

    kind: str  #: "deletion" or "insertion"
    fractions: np.ndarray  #: fraction of the pixels removed / inserted (0 … 1)
    scores: np.ndarray  #: the target's probability (or logit) at each fraction
    auc: float  #: area under the curve (trapezoid rule over fractions in [0, 1])
    target: object  #: class index explained (or the target as given: engine.targets)
    label: str = ""  #: its label
    method: str = ""  #: the attribution method whose map ordered the pixels
    score: str = "probability"  #: "probability" (softmax) or "logit"
    baseline: str = "black"  #: what removed pixels become / inserted pixels start from
    images: np.ndarray | None = None  #: a few of the perturbed images (display, H×W×3)

    @property
    def better(self) -> str:
        """Which way is better for this curve's area: "lower" (deletion) or "higher"."""
        return "lower" if self.kind == "deletion" else "higher"

    def plot(self, ax=None, **kwargs):
        """Draw the curve with its area shaded; returns the Axes."""
        from ..render.metrics import plot_curve  # matplotlib only when plotting

        return plot_curve(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return (f"Curve({self.kind}, method={self.method!r}, target={self.target} "
                f"({self.label!r}), auc={self.auc:.4f} ({self.better} is better), "
                f"{len(self.fractions)} points)")


def _map_for(model: Model, image, attribution, target, params) -> tuple[np.ndarray, int, str]:
    """``(H×W map at the model's input resolution, target, method name)``."""
    if isinstance(attribution, str):
        a = attribute(model, image, attribution, target=target, **params)
        return a.map, a.target, a.method
    if params:
        raise ValueError(f"parameters {sorted(params)} are only used when attribution is a "
                         "method name; the map given is used as it is")
    if isinstance(attribution, Attribution):
        t = attribution.target if target is None else target
        return np.asarray(attribution.map, dtype=np.float32), t, attribution.method
    heat = np.asarray(attribution, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"attribution must be a cw.Attribution, a method name or an H×W map, "
                         f"not an array of shape {heat.shape}")
    size = tuple(model.input_size)
    if heat.shape != size:
        raise ValueError(f"the map is {heat.shape[0]}×{heat.shape[1]} but the model sees "
                         f"{size[0]}×{size[1]} pixels; pass a map aligned with "
                         "model.prepare(image)[1] (what cw.attribute returns)")
    return heat, target, ""


def _substrate(model: Model, x: torch.Tensor, baseline) -> torch.Tensor:
    """The image pixels are replaced with (network input space, 1×3×H×W)."""
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, (bool, np.bool_)):
        return torch.full_like(x, check_float(baseline, "baseline"))
    if baseline == "black":
        return model.normalize(torch.zeros_like(x))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "blur":  # RISE's insertion substrate: Gaussian blur, σ = 5 px, 11 taps
        taps = torch.arange(11, dtype=x.dtype, device=x.device) - 5
        k = torch.exp(-taps ** 2 / (2 * 5.0 ** 2))
        k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
        y = F.conv2d(F.pad(x, (5, 5, 0, 0), mode="replicate"), k, groups=x.shape[1])
        return F.conv2d(F.pad(y, (0, 0, 5, 5), mode="replicate"), k.transpose(2, 3),
                        groups=x.shape[1])
    raise ValueError(f"baseline must be one of {BASELINES} or a number, not {baseline!r}")


def _curve(kind, model, image, attribution, target, steps, baseline, score, batch_size,
           progress, cancel, params) -> Curve:
    model = as_model(model, f"cw.{kind}")
    who = f"cw.metrics.{kind}"
    steps = check_int(steps, "steps", 1, 100_000, who=who)
    batch_size = check_int(batch_size, "batch_size", 1, None, who=who)
    progress = check_progress(progress, who=who)
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', not {score!r}")
    heat, index, method = _map_for(model, image, attribution, target, params)
    x, display = model.prepare(image)
    sub = _substrate(model, x, baseline)
    h, w = heat.shape
    n = h * w
    # pixel order: most important first (stable: ties keep reading order)
    order = torch.from_numpy(np.argsort(-heat.reshape(-1), kind="stable").copy()).to(x.device)
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[order] = torch.arange(n, device=x.device)
    rank = rank.view(1, 1, h, w)
    counts = [round(i * n / steps) for i in range(steps + 1)]
    scores = np.empty(steps + 1, dtype=np.float64)
    keep = sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps})
    shown = {}
    with input_only(model.module), torch.no_grad():
        goal = targets.resolve(model, index, lambda: model.run(x))
        ctx = Context(model, x, goal, None, kind, cancel, progress)
        for lo, hi in ctx.batches(steps + 1, batch_size, kind):
            k = torch.tensor(counts[lo:hi], device=x.device).view(-1, 1, 1, 1)
            changed = rank < k  # N×1×H×W: the first k pixels in the order
            if kind == "deletion":
                batch = torch.where(changed, sub, x)
            else:
                batch = torch.where(changed, x, sub)
            out = ctx.logits(batch)
            found = goal.probability(out) if score == "probability" else goal.score(out)
            scores[lo:hi] = found.double().cpu().numpy()
            for i in range(lo, hi):
                if i in keep:
                    shown[i] = batch[i - lo]
    fractions = np.asarray(counts, dtype=np.float64) / n
    auc = float(np.sum((scores[1:] + scores[:-1]) * np.diff(fractions)) / 2)
    images = torch.stack([shown[i] for i in keep])
    images = model.denormalize(images).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    spec = goal.index if goal.index is not None else goal.spec
    return Curve(kind, fractions, scores, auc, spec, goal.name, method, score,
                 str(baseline), images.astype(np.float32))


def deletion(model, image, attribution="grad_cam", *, target=None, steps: int = 50,
             baseline="black", score: str = "probability", batch_size: int = 16,
             progress=None, cancel=None, **params) -> Curve:
    """Deletion curve (Petsiuk et al. 2018): the target's probability as the most important
    pixels, by ``attribution``, are replaced by ``baseline`` in ``steps`` equal steps.
    Lower area = a more faithful map.

    ``attribution``: a :class:`cw.Attribution`, an H×W map aligned with
    ``model.prepare(image)[1]``, or a method name (computed with ``params``).
    ``baseline``: "black" (default), "zeros" (the network's zero input: the data set's mean
    colour), "blur" or a number (network input space). ``score``: "probability" or "logit".
    One forward pass per step, in batches of ``batch_size``, with a progress bar when slow.
    """
    return _curve("deletion", model, image, attribution, target, steps, baseline, score,
                  batch_size, progress, cancel, params)


def insertion(model, image, attribution="grad_cam", *, target=None, steps: int = 50,
              baseline="blur", score: str = "probability", batch_size: int = 16,
              progress=None, cancel=None, **params) -> Curve:
    """Insertion curve (Petsiuk et al. 2018): the target's probability as the most important
    pixels are put back into a blurred copy of the image (``baseline="blur"``). Higher area =
    a more faithful map. Arguments as :func:`deletion`."""
    return _curve("insertion", model, image, attribution, target, steps, baseline, score,
                  batch_size, progress, cancel, params)


# --------------------------------------------------------------------------- pointing game
@dataclass
class PointingGame:
    """The result of :func:`pointing_game`; true when it is a hit."""

    hit: bool  #: whether the map's maximum is within ``tolerance`` px of the object
    point: tuple  #: (row, column) of the map's maximum
    distance: float  #: its distance in pixels to the nearest object pixel (0 inside)
    tolerance: float

    def __bool__(self) -> bool:
        return bool(self.hit)


def pointing_game(attribution, box, *, tolerance: float = 15.0) -> PointingGame:
    """Pointing game (Zhang et al. 2016): a hit when the map's maximum lies on the object, or
    within ``tolerance`` pixels of it.

    ``attribution``: a :class:`cw.Attribution` or an H×W map. ``box``: ``(x0, y0, x1, y1)`` in
    the map's pixels (the crop the network sees, ``attribution.image``; ``x1``, ``y1``
    excluded) or a boolean H×W object mask.
    """
    tolerance = check_float(tolerance, "tolerance", 0, None, who="cw.metrics.pointing_game")
    heat = np.asarray(attribution.map if isinstance(attribution, Attribution) else attribution,
                      dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"expected an H×W map, not shape {heat.shape}")
    h, w = heat.shape
    if isinstance(box, np.ndarray) and box.ndim == 2:
        if box.shape != heat.shape:
            raise ValueError(f"the mask is {box.shape} but the map is {heat.shape}")
        mask = box.astype(bool)
    else:
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError("box must be (x0, y0, x1, y1) or a boolean H×W mask") from None
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {tuple(box)} is empty: it needs x0 < x1 and y0 < y1")
        rows = np.arange(h)[:, None] + 0.5
        cols = np.arange(w)[None, :] + 0.5
        mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    if not mask.any():
        raise ValueError("the object box or mask covers no pixel of the map")
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    ys, xs = np.nonzero(mask)
    distance = float(np.sqrt(((ys - r) ** 2 + (xs - c) ** 2).min()))
    return PointingGame(distance <= tolerance, (int(r), int(c)), distance, float(tolerance))


# --------------------------------------------------------------------------- sanity check
@dataclass
class SanityCheck:
    """Cascading model-parameter randomisation (Adebayo et al. 2018)."""

    method: str
    target: int
    stages: list  #: stage i re-initialised every weighted layer from the top down to stages[i]
    maps: list  #: the original map, then one per stage (H×W, as Attribution.map)
    similarity: np.ndarray  #: Spearman rank correlation of |map| with the original, per stage
    image: np.ndarray | None = None
    label: str = ""
    signed: bool = False
    params: dict = field(default_factory=dict)
    fine: bool = False  #: whether the maps are pixel-level (see Attribution.fine)

    def plot(self, fig=None, **kwargs):
        """The original map and one per stage, each titled with its similarity."""
        from ..render.metrics import plot_sanity  # matplotlib only when plotting

        return plot_sanity(self, fig=fig, **kwargs)

    def __repr__(self) -> str:
        sims = ", ".join(f"{s:.2f}" for s in self.similarity)
        return (f"SanityCheck({self.method!r}, target={self.target}, stages={len(self.stages)}, "
                f"similarity=[{sims}])")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def weighted_layers(module: nn.Module) -> list[str]:
    """Names of the modules holding their own weights, in definition order."""
    return [n for n, m in module.named_modules()
            if n and any(True for _ in m.parameters(recurse=False))]


def _reinit(module: nn.Module, generator_seed: int) -> None:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(generator_seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)


def sanity_check(model, image, method: str = "grad_cam", *, target=None, stages: int = 5,
                 layers=None, seed: int = 0, progress=None, **params) -> SanityCheck:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018).

    A copy of the network is re-initialised from the top down in ``stages`` steps — the
    classifier alone, then evenly down to every weighted layer — or down to each of the
    ``layers`` given (:func:`weighted_layers` names them); at each step ``method`` is
    computed again for the same target and compared with the original map by the Spearman
    rank correlation of the magnitudes. The user's model is not touched.
    """
    model = as_model(model, "cw.sanity_check")
    who = "cw.metrics.sanity_check"
    stages = check_int(stages, "stages", 1, None, who=who)
    seed = check_int(seed, "seed", 0, None, who=who)
    progress = check_progress(progress, who=who)
    original = attribute(model, image, method, target=target, progress=False, **params)
    names = weighted_layers(model.module)
    top_first = names[::-1]
    if layers is None:
        stages = min(stages, len(names))
        # the classifier alone first (as Adebayo et al.), then evenly down to every layer
        n = len(names)
        cuts = sorted({n} if stages == 1 else
                      {1} | {min(n, math.ceil(i * n / (stages - 1))) for i in range(1, stages)})
        chosen = [top_first[c - 1] for c in cuts]
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ValueError(f"{unknown} hold no weights of their own; pick from "
                             f"weighted_layers(model.module) (e.g. {names[-3:]})")
        chosen.sort(key=lambda n: -names.index(n))  # top first
    clone = copy.copy(model)
    clone.module = copy.deepcopy(model.module)
    clone.cache = type(model.cache)(model.cache.max_bytes)
    mods = dict(clone.module.named_modules())
    maps, sims = [original.map], []
    done = 0  # how many of the top-first names have been re-initialised
    bar = None
    if progress is None or progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc=f"sanity check ({method})", leave=False,
                   disable=progress is None and len(chosen) < 3)
    try:
        for stop in chosen:
            end = top_first.index(stop) + 1
            for i in range(done, end):
                _reinit(mods[top_first[i]], seed + i)
            done = max(done, end)
            a = attribute(clone, image, method, target=original.target, progress=False, **params)
            maps.append(a.map)
            sims.append(spearman(np.abs(original.map), np.abs(a.map)))
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(len(sims), len(chosen))
    finally:
        if bar is not None:
            bar.close()
    return SanityCheck(original.method, original.target, chosen, maps, np.asarray(sims),
                       original.image, original.label, original.signed, original.params,
                       original.fine)
