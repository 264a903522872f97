"""Objectives for activation maximisation: ``cw.objectives``.

An objective is a **loss to minimise** (minus the quantity to maximise) computed from the
activations of the layers it names in ``objective.layers``. Objectives add, subtract and scale::

    obj = cw.objectives.channel("_blocks.3", 7) + 0.5 * cw.objectives.diversity("_blocks.3")

``LOGITS`` (the string ``"logits"``) names the model's class scores.

Definitions (``A`` is the layer output, N×C×h×w, averaged over the batch unless ``batch=i``
picks one image):

* ``channel(layer, c)`` — ``−mean_{y,x} A[:, c, y, x]``
* ``neuron(layer, c, y=None, x=None)`` — ``−A[:, c, y, x]``, the centre position by default
* ``direction(layer, v)`` — ``−mean_{y,x} cos(A[:, :, y, x], v)``
* ``class_logit(target)`` — ``−logit[:, k]`` (``target`` an index or label)
* ``diversity(layer)`` — ``Σ_{i≠j} cos(G_i, G_j) / N``, the Gram matrices ``G_i`` of the
  batch's images at ``layer`` (Lucid's diversity term, as a loss: similar images cost more)
"""
from __future__ import annotations

from typing import Callable

import torch

LOGITS = "logits"


class Objective:
    """A loss built from layer activations. ``fn(acts, model) → scalar tensor``."""

    def __init__(self, fn: Callable, layers, name: str):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: dict, model=None) -> torch.Tensor:
        return self.fn(acts, model)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # ---------------------------------------------------------------- algebra
    def __add__(self, other):
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            return Objective(lambda a, m: self(a, m) + other, self.layers, f"{self.name} + {other}")
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda a, m: self(a, m) + other(a, m), self.layers + other.layers,
                         f"{self.name} + {other.name}")

    def __radd__(self, other):  # sum([...]) starts from 0
        return self.__add__(other)

    def __mul__(self, k):
        if not isinstance(k, (int, float)):
            return NotImplemented
        k = float(k)
        return Objective(lambda a, m: k * self(a, m), self.layers, f"{k:g}·({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / float(k))

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-other)


def _pick(t: torch.Tensor, batch):
    return t if batch is None else t[batch:batch + 1]


def _channel_values(t: torch.Tensor, c: int, layer: str) -> torch.Tensor:
    if t.ndim < 2 or not 0 <= c < t.shape[1]:
        raise ValueError(
            f"channel {c} is out of range for layer {layer!r} with output shape "
            f"{tuple(t.shape[1:])} (channels 0–{t.shape[1] - 1})" if t.ndim >= 2 else
            f"layer {layer!r} has no channels"
        )
    return t[:, c]


def channel(layer: str, n: int, batch: int | None = None) -> Objective:
    """Maximise the mean activation of channel ``n`` of ``layer``."""
    n = int(n)

    def fn(acts, model):
        return -_channel_values(_pick(acts[layer], batch), n, layer).mean()

    return Objective(fn, [layer], f"{layer}:{n}" + (f"[{batch}]" if batch is not None else ""))


def neuron(layer: str, n: int, y: int | None = None, x: int | None = None,
           batch: int | None = None) -> Objective:
    """Maximise one position of channel ``n`` (the centre unless ``y``, ``x`` are given)."""
    n = int(n)

    def fn(acts, model):
        a = _channel_values(_pick(acts[layer], batch), n, layer)
        if a.ndim == 3:
            h, w = a.shape[-2:]
            yy = h // 2 if y is None else int(y)
            xx = w // 2 if x is None else int(x)
            a = a[:, yy, xx]
        return -a.mean()

    return Objective(fn, [layer], f"neuron {layer}:{n}")


def direction(layer: str, vector, batch: int | None = None) -> Objective:
    """Maximise the cosine similarity between ``vector`` (C) and the activation at each position."""
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()

    def fn(acts, model):
        a = _pick(acts[layer], batch)
        if a.shape[1] != v.numel():
            raise ValueError(f"direction has {v.numel()} entries but layer {layer!r} has "
                             f"{a.shape[1]} channels")
        d = v.to(a.device, a.dtype).view(1, -1, *([1] * (a.ndim - 2)))
        return -torch.cosine_similarity(a, d, dim=1).mean()

    return Objective(fn, [layer], f"direction {layer}")


def class_logit(target, batch: int | None = None) -> Objective:
    """Maximise the logit of class ``target`` (an index, or a label resolved by the model)."""

    def fn(acts, model):
        k = target if model is None else model.target_index(target)
        logits = _pick(acts[LOGITS], batch)
        return -logits[:, int(k)].mean()

    return Objective(fn, [LOGITS], f"class {target!r}")


def diversity(layer: str) -> Objective:
    """Penalise similar Gram matrices across the batch (needs a batch of 2 or more)."""

    def fn(acts, model):
        a = acts[layer]
        n = a.shape[0]
        if n < 2:
            return a.sum() * 0.0
        flat = a.flatten(2)
        gram = torch.bmm(flat, flat.transpose(1, 2)).flatten(1)
        gram = torch.nn.functional.normalize(gram, dim=1)
        sim = gram @ gram.T
        return (sim.sum() - sim.diagonal().sum()) / n

    return Objective(fn, [layer], f"diversity {layer}")


def parse(spec, model=None) -> Objective:
    """An ``Objective`` from a spec: an ``Objective``, ``"layer:channel"``, a class index or label."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, bool):
        raise ValueError("objective must be 'layer:channel', a class index or label, or an Objective")
    if isinstance(spec, int) or (hasattr(spec, "__index__") and not isinstance(spec, str)):
        return class_logit(int(spec))
    if isinstance(spec, str):
        if ":" in spec:
            layer, _, ch = spec.rpartition(":")
            try:
                return channel(layer, int(ch))
            except ValueError:
                raise ValueError(
                    f"objective {spec!r}: the part after ':' must be a channel number, "
                    "e.g. '_blocks.3._project_conv:7'"
                ) from None
        if model is not None:
            names = model.layers("all")
            if spec in names:
                raise ValueError(
                    f"objective {spec!r} is a layer; add a channel, e.g. '{spec}:0' "
                    "(or use cw.objectives.channel / direction)"
                )
        return class_logit(spec)
    raise ValueError(
        f"objective must be 'layer:channel', a class index or label, or a cw.objectives "
        f"Objective, not {type(spec).__name__}"
    )


__all__ = ["LOGITS", "Objective", "channel", "class_logit", "direction", "diversity", "neuron",
           "parse"]
