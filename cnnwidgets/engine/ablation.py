"""Switching units off: ``cw.ablate`` and ``cw.prune_curve``.

``ablate(model, {layer: units})`` is a context manager under which the named channels of
each layer output zero, through the one hook mechanism (:func:`~.hooks.capture`): the hooks
are removed on exit, after an error too. Like every hook of cnnwidgets they answer only the
thread that entered the block (:func:`~.hooks.this_thread`), so a widget computing in the
background on the same network is not changed by it; every method and metric called inside
the block sees the ablated network (the fast paths of :mod:`.fast` and the activation cache
step aside while such a hook is on).

``prune_curve`` asks what a layer's units are worth: as a growing fraction of them is
switched off in the order a criterion gives, how often the top-1 class of a set of images is
still the intact network's, and how much that class's probability drops.
"""
from __future__ import annotations

import contextlib
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .checks import check_float, check_int
from .hooks import capture, resolve, restored
from .model import Model, as_model
from .progress import Progress

__all__ = ["CRITERIA", "PruneCurve", "ablate", "prune_curve", "unit_order"]

#: the built-in orders of :func:`prune_curve` (a dissection adds its concepts and categories)
CRITERIA = ("weight_l1", "activation", "random")


def map_channels(model: Model, layer, who: str) -> int:
    """The number of channels of ``layer``, which must output a C×h×w feature map."""
    if not isinstance(layer, str):
        raise TypeError(f"{who}: a layer is a name (a string), not {type(layer).__name__}")
    info = model.check_layer(layer)
    if len(info.shape) != 3:
        maps = model.layers("maps")
        raise ValueError(
            f"{who}: layer {layer!r} ({info.type}) outputs shape {tuple(info.shape)}, not a "
            f"C×h×w feature map, so it has no channels to switch off; pick a feature-map "
            f"layer, e.g. {', '.join(maps[-3:])} (model.layers() lists them)")
    return int(info.shape[0])


def _units(value, channels: int, layer: str, who: str) -> list[int]:
    if isinstance(value, numbers.Integral) or (isinstance(value, (np.ndarray, torch.Tensor))
                                              and value.ndim == 0):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{who}: the units of {layer!r} must be a channel index or a list of "
                        f"them, not {type(value).__name__}")
    units = []
    for u in list(value):
        u = check_int(u, f"unit of {layer!r}", who=who)
        if not 0 <= u < channels:
            raise ValueError(f"{who}: unit {u} is out of range for layer {layer!r}, which has "
                             f"{channels} channels (0–{channels - 1})")
        units.append(u)
    return sorted(set(units))


@contextlib.contextmanager
def ablate(model, units: dict):
    """Inside the block, the channels ``units[layer]`` of each ``layer`` output zero.

    ``units``: ``{layer name: channel index or list of them}`` (an empty list leaves the layer
    as it is). The hooks are removed when the block ends, however it ends. The block holds
    for the calling thread (see the module's docstring)::

        with cw.ablate(model, {"features.6.0": [3, 17]}):
            model.predict(image)
            cw.attribute(model, image, "grad_cam")
    """
    who = "cw.ablate"
    model = as_model(model, who)
    if not isinstance(units, dict):
        raise TypeError(f"{who}: units must be a dict {{layer name: channels}}, "
                        f"not {type(units).__name__}")
    plan = {}
    for layer, chosen in units.items():
        channels = map_channels(model, layer, who)
        plan[layer] = _units(chosen, channels, layer, who)
    plan = {layer: chosen for layer, chosen in plan.items() if chosen}
    index = {}

    def switch_off(name, out):
        chosen = plan.get(name)
        if not chosen or out.ndim != 4:
            return None
        idx = index.get((name, out.device))
        if idx is None:
            idx = index[(name, out.device)] = torch.tensor(chosen, device=out.device)
        return out.index_fill(1, idx, 0.0)

    with capture(model.module, list(plan), replace=switch_off, store=False):
        yield model


# --------------------------------------------------------------------------- orders
def _weights_of(model: Model, layer: str, channels: int, who: str) -> tuple[str, torch.Tensor]:
    """The convolution whose filters make ``layer``'s channels: the layer itself when it is
    one, else the last convolution before it (in forward order) with as many filters."""
    info = model.layer_info()
    names = list(info)
    for name in reversed(names[:names.index(layer) + 1]):
        module = resolve(model.module, name)
        if isinstance(module, nn.modules.conv._ConvNd) and module.out_channels == channels:
            return name, module.weight.detach()
    raise ValueError(f"{who}: criterion 'weight_l1' needs a convolution with {channels} filters "
                     f"at or before layer {layer!r}; the network has none. Use 'activation' "
                     "or 'random'")


def unit_order(model, layer: str, criterion: str, *, images=None, dissection=None,
               seed: int = 0, activations: torch.Tensor | None = None) -> tuple[np.ndarray, str]:
    """``(order, how)``: the channels of ``layer`` in the order :func:`prune_curve` switches
    them off, and how that order was made (for titles).

    * ``"weight_l1"``: smallest L1 norm of the filter first (Li et al. 2017);
    * ``"activation"``: smallest mean activation over ``images`` first (``activations``: the
      per-channel means when already known);
    * ``"random"``: a permutation drawn with ``seed``;
    * a concept or category of ``dissection`` (a ``DissectionResult`` of this layer): highest
      IoU with it first (a category: the best IoU over its concepts), so its detectors go first.
    Ties keep the channel order.
    """
    who = "cw.prune_curve"
    model = as_model(model, who)
    channels = map_channels(model, layer, who)
    if not isinstance(criterion, str):
        raise TypeError(f"{who}: criterion must be a name, not {type(criterion).__name__}")
    if criterion == "weight_l1":
        source, w = _weights_of(model, layer, channels, who)
        score = w.abs().flatten(1).sum(1).double().cpu().numpy()
        return np.argsort(score, kind="stable"), f"weight L1 of {source}"
    if criterion == "activation":
        if activations is None:
            activations = _mean_activations(model, _prepared(model, images, who), layer)
        return np.argsort(activations.double().cpu().numpy(), kind="stable"), "mean activation"
    if criterion == "random":
        seed = check_int(seed, "seed", 0, 2**63 - 1, who=who)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(channels, generator=g).numpy(), f"random (seed {seed})"
    if dissection is not None:
        if layer not in dissection.layers:
            raise ValueError(f"{who}: the dissection has no layer {layer!r}; it dissected "
                             f"{dissection.layers}")
        iou = np.asarray(dissection.iou(layer), dtype=np.float64)
        if iou.shape[0] != channels:
            raise ValueError(f"{who}: the dissection's layer {layer!r} has {iou.shape[0]} units, "
                             f"the model's {channels}: it was made for another network")
        columns = [i for i, c in enumerate(dissection.concepts)
                   if c == criterion or dissection.categories.get(c) == criterion]
        if columns:
            score = iou[:, columns].max(1)
            return np.argsort(-score, kind="stable"), f"IoU with {criterion!r}"
    known = list(CRITERIA)
    if dissection is not None:
        known += ["a concept or category of the dissection, e.g. "
                  + ", ".join(repr(c) for c in dissection.concepts[:3])]
    else:
        known += ["a concept (with dissection=)"]
    raise ValueError(f"{who}: unknown criterion {criterion!r}; use {', '.join(map(str, known))}")


# --------------------------------------------------------------------------- curve
@dataclass
class PruneCurve:
    """The result of :func:`prune_curve`."""

    layer: str  #: the layer whose units were switched off
    criterion: str  #: the criterion's name
    how: str  #: how the order was made (e.g. "weight L1 of features.0.0")
    fractions: np.ndarray  #: the fractions asked for
    units_off: np.ndarray  #: channels switched off at each fraction (round(f · C))
    agreement: np.ndarray  #: share of images whose top-1 is still the intact network's
    prob_drop: np.ndarray  #: mean drop of the intact top-1's probability (intact − ablated)
    order: np.ndarray  #: the channels in the order they are switched off
    channels: int  #: C, the layer's channel count
    n_images: int  #: images the curve is measured on
    top1: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  #: intact top-1 per image
    seconds: float = 0.0  #: wall-clock time

    def off(self, fraction: float) -> list[int]:
        """The channels switched off at ``fraction``."""
        fraction = check_float(fraction, "fraction", 0, 1, who="PruneCurve.off")
        return sorted(int(u) for u in self.order[:int(round(fraction * self.channels))])

    def __repr__(self) -> str:
        return (f"PruneCurve({self.layer!r}, {self.criterion!r}, {len(self.fractions)} fractions,"
                f" {self.n_images} images, agreement {np.round(self.agreement, 3).tolist()})")


def _prepared(model: Model, images, who: str) -> torch.Tensor:
    if images is None:
        raise ValueError(f"{who}: this needs images")
    if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
        images = [images]
    tensors = [model.prepare(im)[0] for im in images]
    if not tensors:
        raise ValueError(f"{who}: images is empty; pass at least one image")
    return torch.cat(tensors)


def _mean_activations(model: Model, x: torch.Tensor, layer: str, batch_size: int = 32):
    total = None
    with restored(model.module), torch.no_grad(), capture(model.module, [layer]) as rec:
        for lo in range(0, len(x), batch_size):
            model.scores(x[lo:lo + batch_size])
            part = rec.outputs[layer].double().sum(dim=(0, 2, 3))
            total = part if total is None else total + part
    h, w = rec.outputs[layer].shape[-2:]
    return total / (len(x) * h * w)


def _check_fractions(fractions, who: str) -> np.ndarray:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
        fractions = [fractions]
    values = [check_float(f, "fraction", 0, 1, who=who) for f in fractions]
    if not values:
        raise ValueError(f"{who}: fractions is empty; pass fractions in [0, 1], e.g. "
                         "[0, 0.25, 0.5, 0.75]")
    return np.array(values, dtype=np.float64)


def prune_curve(model, images, layer: str, criterion: str = "weight_l1",
                fractions=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9), *, dissection=None, seed: int = 0,
                batch_size: int = 32, cancel=None, progress=None) -> PruneCurve:
    """Switch off a growing fraction of ``layer``'s channels in ``criterion``'s order
    (:func:`unit_order`) and measure, over ``images`` (any iterable of images), how often
    the top-1 class is still the intact network's and the mean drop of that class's
    probability: :class:`PruneCurve`.

    ``fractions``: shares of the layer's channels in [0, 1] (``round(f · C)`` channels each).
    ``dissection``: a ``DissectionResult`` of the layer, for a concept or category criterion.
    One intact pass over the images (which also gives the mean activations), then one pass
    per fraction. The model is left exactly as it was, and no hook stays.
    """
    who = "cw.prune_curve"
    start = time.perf_counter()
    model = as_model(model, who)
    channels = map_channels(model, layer, who)
    fractions = _check_fractions(fractions, who)
    batch_size = check_int(batch_size, "batch_size", 1, 4096, who=who)
    if not isinstance(criterion, str):
        raise TypeError(f"{who}: criterion must be a name, not {type(criterion).__name__}")
    order = how = None
    if criterion != "activation":  # a wrong criterion fails before any pass
        order, how = unit_order(model, layer, criterion, dissection=dissection, seed=seed)
    x = _prepared(model, images, who)
    n = len(x)
    counts = np.array([int(round(f * channels)) for f in fractions])
    chunks = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    with Progress(len(chunks) * (1 + len(fractions)), "prune curve", cancel=cancel,
                  progress=progress, what=who) as bar:
        # the intact network: its top-1 and probabilities, and the layer's mean activations
        probs, sums = [], None
        with restored(model.module), torch.no_grad(), capture(model.module, [layer]) as rec:
            for lo, hi in bar.each(chunks):
                probs.append(model.scores(x[lo:hi]).softmax(-1))
                part = rec.outputs[layer].double().sum(dim=(0, 2, 3))
                sums = part if sums is None else sums + part
                bar.advance()
        h, w = rec.outputs[layer].shape[-2:]
        intact = torch.cat(probs)
        top1 = intact.argmax(-1)
        p_top = intact.gather(1, top1[:, None])[:, 0]
        if order is None:
            order, how = unit_order(model, layer, criterion, activations=sums / (n * h * w))
        agreement, drop = [], []
        for count in counts:
            off = [int(u) for u in order[:count]]
            same, lost = 0, 0.0
            with restored(model.module), torch.no_grad(), ablate(model, {layer: off}):
                for lo, hi in bar.each(chunks):
                    p = model.scores(x[lo:hi]).softmax(-1)
                    same += int((p.argmax(-1) == top1[lo:hi]).sum())
                    lost += float((p_top[lo:hi] - p.gather(1, top1[lo:hi, None])[:, 0]).sum())
                    bar.advance()
            agreement.append(same / n)
            drop.append(lost / n)
    return PruneCurve(layer=layer, criterion=criterion, how=how, fractions=fractions,
                      units_off=counts, agreement=np.array(agreement), prob_drop=np.array(drop),
                      order=np.asarray(order, dtype=np.int64), channels=channels, n_images=n,
                      top1=top1.cpu().numpy(), seconds=time.perf_counter() - start)
