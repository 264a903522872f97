"""What incremental inference can save at best: multiply-adds counted from the boxes.

A convolution's cost per output pixel is ``C_out · C_in / groups · k_h · k_w`` multiply-adds
and a linear layer's ``out · in`` per row; the full network costs, per copy, the sum over its
convolutions and linear layers of the cost per output pixel times the output's area. An
incremental pass (:class:`~.Session`) computes each node only inside its box, so its cost per
copy is the same sum with each node's *box* area instead (the whole area where the node ran
whole, nothing where its value is the stored one). The ratio of the two, over every window of an
occlusion map, is the best speed-up exact incremental inference can give on that network
whatever the implementation (Krypton's "theoretical speed-up"): the time of everything else —
pointwise operations, copying windows, patching boxes — is left out.

Only ``nn.Conv2d`` (and subclasses) and ``nn.Linear`` modules are counted; a functional
convolution is counted on neither side.
"""
from __future__ import annotations

import math
from typing import Iterable

from torch import fx, nn

__all__ = ["macs_per_pixel", "network_macs", "node_macs", "pass_macs", "speedup_bound"]


def macs_per_pixel(module: nn.Module) -> int:
    """Multiply-adds per output pixel (per row for a linear layer); 0 for anything else."""
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.weight.shape[-2:]
        return module.out_channels * (module.in_channels // module.groups) * k_h * k_w
    if isinstance(module, nn.Linear):
        return module.out_features * module.in_features
    return 0


def _counted(run):
    """(node whose box is recorded, cost per output pixel, full output area) for each counted
    module of the session's graph (a convolution folded with its batch norm: the norm's node
    records the box)."""
    carrier = {conv: bn for bn, (conv, _, _) in run.folded.items()}
    for node in run.graph.nodes:
        if node.op != "call_module":
            continue
        cost = macs_per_pixel(run.modules[node.target])
        if not cost:
            continue
        out = run.clean[node]
        m = run.modules[node.target]
        channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        yield carrier.get(node, node), cost, out.numel() // channels


def network_macs(run) -> int:
    """Multiply-adds of the whole network on one copy (the session's stored image)."""
    return sum(node_macs(run).values())


def pass_macs(run, sizes: dict) -> int:
    """Multiply-adds per copy of an incremental pass whose boxes were ``sizes`` (node name →
    ``(h, w)`` of its box, ``None`` where it ran whole: :attr:`~.Session.sizes` after a run).
    A node missing from ``sizes`` did not depend on the input (its stored value served)."""
    return sum(node_macs(run, sizes).values())


def speedup_bound(run, batches: Iterable) -> float:
    """The multiply-adds of the full network on every copy ÷ those of the incremental passes,
    ``batches`` being ``(n, sizes)`` per pass (``n`` copies, :attr:`~.Session.sizes`)."""
    full = incr = 0
    for n, sizes in batches:
        full += n * network_macs(run)
        incr += n * pass_macs(run, sizes)
    return full / incr if incr else math.inf


def node_macs(run, sizes: "dict | None" = None) -> "dict[fx.Node, int]":
    """Per counted node (the node that records its box): its multiply-adds per copy, whole
    (``sizes`` None) or inside the boxes of ``sizes``."""
    out = {}
    for node, cost, area in _counted(run):
        if sizes is None:
            out[node] = cost * area
        elif node.name in sizes:
            size = sizes[node.name]
            out[node] = cost * (area if size is None else size[0] * size[1])
    return out
