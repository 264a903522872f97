"""Incremental inference for occlusion (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019).

An occluded copy of an image differs from the image only inside its patch, and each layer's
output differs from the image's own only inside the patch's *projective field* there. So, from
the image's stored activations (one forward pass, :func:`~..fixations.graph.run_graph`), the
scores of a batch of occluded copies are computed layer by layer on that region only: each
node's value is a :class:`Patch` — the stored activation, and per copy a box (the same size for
every copy of the batch, placed per copy) with the copy's values inside it. A rule computes the
box of a node's output from its inputs' boxes and the values inside it from the inputs' values
around it (read from the stored activation with the inputs' boxes patched in: :meth:`Patch.window`).

The rules (:mod:`.rules`, one function per family, registered per operation with :func:`rule`):

* **convolution** (any stride, padding — also asymmetric, EfficientNet's static "same" padding —
  dilation and groups), **max / average pooling**: the output rows whose input windows meet the
  changed rows (``ceil((top + P − D(K−1)) / S) … floor((bottom + P) / S)``); the input read
  around them with the padding's value outside the map;
* **batch norm** (eval, running statistics), **pointwise activations**, dropout, identity: the
  same box;
* **residual sums, products, differences**, **concatenation** along channels: the union of the
  inputs' boxes;
* **global average pooling** (and ``mean`` over the map): the stored mean corrected by the box's
  change — from there on the value is a whole batch, as after squeeze-excitation's product with
  a pooled vector, where the changed region is the whole map;
* any other operation: its inputs are made whole (the stored activation with the box pasted in,
  per copy) and it runs as usual; so does everything after it ("falls back to full inference
  from there").

A convolution followed only by its eval-mode batch norm runs with the norm folded into it (the
``fold`` trick of :mod:`..fast`), as in the network's fast twin.

Approximation (Krypton's *projective-field threshold*, ``threshold`` τ < 1): a box that would
grow beyond ``ceil(τ · side)`` rows (or columns) of a map is cut to that many, around its
centre; the values outside are then the stored ones. τ = 1 is exact. (Krypton's other
approximation, adaptive drill-down, chooses which windows to score: the occlusion method's.)

Nothing here runs while a hook is registered on the network (hooks are part of the network;
:func:`..hooks.hooked`), for a network ``torch.fx`` cannot trace, or in training mode:
:func:`session` then answers ``None`` and the caller runs the network on the occluded copies.
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..hooks import hooked
from ..ruletable import ClassName, RuleTable

__all__ = ["ClassName", "Patch", "Session", "Whole", "clean_window", "occluded_input", "rule",
           "session", "span"]

_TABLE = RuleTable("incremental-inference rule")


def rule(*operations):
    """Register the decorated function ``fn(run, node, args, kwargs)`` as the incremental rule
    of ``operations`` (module types, :class:`ClassName`, functions, tensor method names). It is
    called when at least one argument is a :class:`Patch` and returns the node's value (a
    :class:`Patch`, or a whole batch wrapped in :class:`Whole`) — or ``None`` when it cannot
    handle these arguments, and the node runs whole."""
    def register(fn):
        _TABLE.add(operations, fn)
        return fn
    return register


class Whole:
    """A value computed for the whole batch of copies (after a fallback or global pooling)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@dataclass
class Patch:
    """N copies of a stored activation ``full`` (1×C×H×W) that differ from it only inside one
    box each: rows ``top[i] … top[i] + h − 1``, columns ``left[i] … left[i] + w − 1`` of copy
    ``i``, whose values there are ``values[i]`` (N×C×h×w). Every box lies inside the map."""

    full: torch.Tensor  #: 1×C×H×W: the clean image's value
    values: torch.Tensor  #: N×C×h×w: each copy's values inside its box
    top: torch.Tensor  #: N (int64): first row of each box
    left: torch.Tensor  #: N (int64): first column of each box

    @property
    def n(self) -> int:
        return self.values.shape[0]

    @property
    def h(self) -> int:
        return self.values.shape[-2]

    @property
    def w(self) -> int:
        return self.values.shape[-1]

    def window(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int,
               fill: float = 0.0) -> torch.Tensor:
        """N×C×h×w: rows ``top[i] …`` and columns ``left[i] …`` of copy ``i`` (positions
        outside the map hold ``fill``: the padding's value)."""
        if (h, w) == (self.h, self.w) and torch.equal(top, self.top) \
                and torch.equal(left, self.left):
            return self.values
        H, W = self.full.shape[-2:]
        if (self.h, self.w) == (H, W) and bool((top == top[0]).all()) \
                and bool((left == left[0]).all()):
            # the whole map changed (deep layers): the window is the values, padded or cut
            t, c = int(top[0]), int(left[0])
            return F.pad(self.values, (-c, c + w - W, -t, t + h - H), value=fill)
        out = clean_window(self.full, top, left, h, w, fill)
        r0, c0 = self.top - top, self.left - left  # each box's place in its window
        if bool(((r0 >= 0) & (r0 + self.h <= h) & (c0 >= 0) & (c0 + self.w <= w)).all()):
            # every box inside its window (the usual case): pasted in, one slice per place
            places = r0 * (w + 1) + c0
            kinds, counts = torch.unique(places, return_counts=True)
            for place, count in zip(kinds.tolist(), counts.tolist()):
                a, b = divmod(place, w + 1)
                rows, cols = slice(a, a + self.h), slice(b, b + self.w)
                if count == self.n:
                    out[:, :, rows, cols] = self.values
                else:
                    for i in (places == place).nonzero()[:, 0].tolist():
                        out[i, :, rows, cols] = self.values[i]
            return out
        rows = top[:, None] - self.top[:, None] + torch.arange(h, device=top.device)  # N×h
        cols = left[:, None] - self.left[:, None] + torch.arange(w, device=top.device)  # N×w
        in_r = (rows >= 0) & (rows < self.h)
        in_c = (cols >= 0) & (cols < self.w)
        if not (bool(in_r.any()) and bool(in_c.any())):
            return out
        n = torch.arange(self.n, device=top.device)[:, None, None]
        mine = self.values.permute(0, 2, 3, 1)[n, rows.clamp(0, self.h - 1)[:, :, None],
                                               cols.clamp(0, self.w - 1)[:, None, :]]
        take = (in_r[:, :, None] & in_c[:, None, :])[:, None]  # N×1×h×w
        return torch.where(take, mine.permute(0, 3, 1, 2), out)

    def whole(self) -> torch.Tensor:
        """N×C×H×W: each copy in full (the stored activation with its box pasted in)."""
        out = self.full.expand(self.n, *self.full.shape[1:]).clone()
        for i, (t, l) in enumerate(zip(self.top.tolist(), self.left.tolist())):
            out[i, :, t:t + self.h, l:l + self.w] = self.values[i]
        return out


def clean_window(full: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int,
                 fill: float = 0.0) -> torch.Tensor:
    """N×C×h×w (a new tensor, channels-last): rows ``top[i] …``, columns ``left[i] …`` of
    ``full`` (1×C×H×W) for each ``i``, ``fill`` outside the map."""
    H, W = full.shape[-2:]
    hwc = full[0].permute(1, 2, 0)  # H×W×C: a view (contiguous when full is channels-last)
    tops, lefts = top.tolist(), left.tolist()
    above, below = max(0, -min(tops)), max(0, max(tops) + h - H)
    before, after = max(0, -min(lefts)), max(0, max(lefts) + w - W)
    if above or below or before or after:  # windows that leave the map read ``fill`` there
        hwc = F.pad(hwc, (0, 0, before, after, above, below), value=fill)
    out = torch.stack([hwc[t + above:t + above + h, c + before:c + before + w]
                       for t, c in zip(tops, lefts)])  # N×h×w×C
    return out.permute(0, 3, 1, 2)


def span(low: torch.Tensor, high: torch.Tensor, size: int, threshold: float = 1.0):
    """``(first, length)``: one length for the whole batch and a first index per copy such that
    ``first[i] … first[i] + length − 1`` covers ``low[i] … high[i]`` inside ``0 … size − 1``.
    With ``threshold`` τ < 1 the length is at most ``ceil(τ · size)``, placed around the
    middle of ``low … high`` (Krypton's projective-field threshold: what lies outside is
    left as stored)."""
    low = low.clamp(0, size - 1)
    high = torch.maximum(high.clamp(max=size - 1), low)
    length = int((high - low).max()) + 1
    if threshold < 1.0:
        cap = max(1, math.ceil(threshold * size))
        if length > cap:
            middle = (low + high + 1) // 2
            low, length = middle - cap // 2, cap
    return low.clamp(0, size - length), length


class Session:
    """One image's stored activations and the plan to score occluded copies of it."""

    def __init__(self, graph: fx.Graph, root: nn.Module, x: torch.Tensor, fold: bool = True):
        from ..fixations.graph import run_graph

        self.graph = graph
        self.lock = threading.Lock()  # one run at a time (a run's threshold and records)
        self.placeholder = next(n for n in graph.nodes if n.op == "placeholder")
        self.modules = dict(root.named_modules())
        self.root = root
        clean, _ = run_graph(graph, root, x)
        #: node → the image's value (maps channels-last: a box's window reads whole pixels)
        self.clean = {k: _channels_last(v) for k, v in clean.items()}
        self.threshold = 1.0  #: Krypton's projective-field threshold τ of the current run
        self.trust: dict = {}  # node → whether its rule reproduced its stored value
        #: of the last run: node name → its box's (h, w), or None for a whole batch
        self.sizes: dict = {}
        #: of the last run: the nodes that ran whole on a changed region (no rule for them, or
        #: a product with a whole batch, as squeeze-excitation's)
        self.whole: list = []
        # nodes whose value depends on the input (the others are the stored constants)
        self.flows: set = set()
        for node in graph.nodes:
            if node.op == "placeholder" or any(a in self.flows for a in node.all_input_nodes):
                self.flows.add(node)
        self.folded: dict = {}  # batch-norm node → (convolution node, weight, bias)
        if fold:
            from .rules import fold_pairs
            self.folded = fold_pairs(self)
        skipped = {conv for conv, _, _ in self.folded.values()}
        self.order = [n for n in graph.nodes if n.op != "placeholder" and n not in skipped]
        # when each value is last read, so that it can be let go
        self.last_use: dict = {}
        for node in self.order:
            for a in self._reads(node):
                self.last_use[a] = node

    def _reads(self, node):
        if node in self.folded:
            return self.folded[node][0].all_input_nodes
        return node.all_input_nodes

    def run(self, start: Patch, threshold: float = 1.0, clock=None):
        """The network's output (N×…) for the copies of the input ``start`` describes.
        ``clock(node, seconds)``, when given, is told how long each node took (benchmarks)."""
        with self.lock:
            self.threshold = threshold
            self.sizes, self.whole = {}, []
            return self._run(start, clock)

    def _run(self, start: Patch, clock):
        from ..fixations.graph import _evaluate

        env: dict = {self.placeholder: start}
        n_copies = start.n
        for node in self.order:
            began = time.perf_counter() if clock is not None else 0.0
            if node.op == "output":
                return fx.node.map_aggregate(_load(node.args[0], env, self), _whole)
            if node not in self.flows:
                env[node] = self.clean[node]
            elif node in self.folded:
                conv, weight, bias = self.folded[node]
                from .rules import convolve
                x = _load(conv.args[0], env, self)
                env[node] = (convolve(self, conv, x, self.clean[node], weight, bias)
                             if isinstance(x, Patch) else None)
                if env[node] is None:  # whole: the two modules as the network runs them
                    if isinstance(x, Patch):
                        self.whole.append(node)
                    v = _evaluate(conv, self.modules[conv.target], (_whole(x),), {})
                    env[node] = Whole(self.modules[node.target](v))
            else:
                env[node] = self.step(node, _load(node.args, env, self),
                                      _load(node.kwargs, env, self), n_copies)
            if clock is not None:
                clock(node, time.perf_counter() - began)
            value = env[node]
            if isinstance(value, (Patch, Whole)):
                self.sizes[node.name] = (value.h, value.w) if isinstance(value, Patch) else None
            for a in self._reads(node):
                if self.last_use.get(a) is node:
                    env.pop(a, None)
        raise RuntimeError("the graph has no output node")  # pragma: no cover

    def step(self, node: fx.Node, args, kwargs, n_copies: int):
        """One node's value for the batch: its rule when an argument is a :class:`Patch`, else
        the operation run on whole values."""
        from ..fixations.graph import _evaluate

        patched = []
        fx.node.map_aggregate((args, kwargs), lambda a: patched.append(a)
                              if isinstance(a, Patch) else None)
        if patched:
            if _is_shape_query(node):
                return _shape(node, args, kwargs, n_copies)
            fn = _TABLE.for_node(node, self.modules)
            if fn is not None:
                value = fn(self, node, args, kwargs)
                if value is not None:
                    return value
            self.whole.append(node)
        module = self.modules[node.target] if node.op == "call_module" else None
        value = _evaluate(node, module, fx.node.map_aggregate(args, _whole),
                          fx.node.map_aggregate(kwargs, _whole))
        return Whole(value)


def _channels_last(v):
    if isinstance(v, torch.Tensor) and v.dim() == 4 and not isinstance(v, nn.Parameter):
        return v.contiguous(memory_format=torch.channels_last)
    return v


def _load(a, env, run: Session):
    return fx.node.map_arg(a, lambda n: env[n] if n in run.flows else run.clean[n])


def _whole(a):
    if isinstance(a, Patch):
        return a.whole()
    if isinstance(a, Whole):
        return a.value
    return a


def _is_shape_query(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in ("size", "dim"))
            or (node.op == "call_function" and node.target is getattr
                and len(node.args) > 1 and node.args[1] in ("shape", "ndim")))


def _shape(node: fx.Node, args, kwargs, n_copies: int):
    """``size`` / ``shape`` / ``dim`` of a :class:`Patch`: the stored value's, with N copies."""
    full = args[0].full
    shape = torch.Size((n_copies, *full.shape[1:]))
    if node.op == "call_method" and node.target == "dim":
        return full.dim()
    if node.op == "call_function":
        return shape if args[1] == "shape" else full.dim()
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return shape if dim is None else shape[dim]


_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def session(module: nn.Module, x: torch.Tensor, fold: bool = True) -> "Session | None":
    """The incremental-inference session of ``module`` for the image ``x`` (1×C×H×W), or
    ``None`` where it may not run (a hook on the network, training mode, a network ``torch.fx``
    cannot trace, an input that is not an image batch). The last one made for a network is
    kept, and served again for the same image while the network's modules, weights and
    buffers are the same (an explorer's next window or stride)."""
    from ..cache import weights_state
    from ..fixations.graph import trace_graph
    from ..fixations.registry import UnsupportedOperationError
    from . import rules  # noqa: F401  (the rules register themselves)

    if module.training or hooked(module) or x.dim() != 4:
        return None
    state = (tuple(id(m) for m in module.modules()), weights_state(*module.modules()), fold)
    with _SESSIONS_LOCK:
        kept = _SESSIONS.get(module)
    if kept is not None and kept[0] == state and kept[1].shape == x.shape \
            and kept[1].dtype == x.dtype and kept[1].device == x.device \
            and torch.equal(kept[1], x):
        return kept[2]
    try:
        graph = trace_graph(module)
    except UnsupportedOperationError:
        return None
    if sum(1 for n in graph.nodes if n.op == "placeholder") != 1:
        return None
    made = Session(graph, module, x.detach().clone(), fold=fold)
    with _SESSIONS_LOCK:
        _SESSIONS[module] = (state, made.clean[made.placeholder], made)
    return made


def occluded_input(x: torch.Tensor, base: torch.Tensor, boxes: Sequence[tuple[int, int]],
                   size: tuple[int, int]) -> Patch:
    """The input of the copies of ``x`` whose boxes ``(top, left)`` of ``size`` (clipped at the
    map's edge) show ``base`` instead (1×C×H×W, as ``x``)."""
    H, W = x.shape[-2:]
    kh, kw = size
    r = torch.tensor([b[0] for b in boxes], dtype=torch.long, device=x.device)
    c = torch.tensor([b[1] for b in boxes], dtype=torch.long, device=x.device)
    top, left = r.clamp(max=H - kh), c.clamp(max=W - kw)  # boxes clipped at the edge
    inside_r = top[:, None] + torch.arange(kh, device=x.device) >= r[:, None]
    inside_c = left[:, None] + torch.arange(kw, device=x.device) >= c[:, None]
    take = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]
    values = torch.where(take, clean_window(base, top, left, kh, kw),
                         clean_window(x, top, left, kh, kw))
    return Patch(x, values, top, left)

