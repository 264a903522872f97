"""The backward walk: from the class neuron, each node's set of points goes through its
operation's rule (:mod:`.registry`) to the nodes it read from, down to the input."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import fx, nn

from ..hooks import restored
from ..targets import Resolved, resolve
from .graph import run_graph, trace_graph
from .points import flat_to_chw, shape3
from .registry import UnsupportedOperationError, describe, rule_for
from .result import Fixations, outlier_mask
from .rules.convolution import is_linear
from .rules.passthrough import passes_through
from .rules.shape import permute, permute_order


class PointWalk:
    """Reverse walk over the graph; ``points[node]`` is a 1-D LongTensor of flat indices.

    What a rule reads: ``values`` (node → its value in the forward pass), ``modules``
    (qualified name → submodule) and ``position`` (the convolution rule's mode); what it calls:
    :meth:`send`, :meth:`is_flow` and :meth:`unsupported`.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module, values: dict, position: str = "auto"):
        self.position = position
        self.graph = graph
        self.root = root
        self.values = values
        self.modules = dict(root.named_modules())
        self.points: dict = {}

    def is_flow(self, node) -> bool:
        """Whether points may be sent to ``node``: a batch-carrying tensor, not a parameter."""
        if not isinstance(node, fx.Node) or node.op == "get_attr":
            return False
        v = self.values.get(node)
        return isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1

    def send(self, node, idx: torch.Tensor) -> None:
        """Add points (flat indices into one sample of ``node``'s value) to ``node``'s set."""
        if not self.is_flow(node) or idx.numel() == 0:
            return
        prev = self.points.get(node)
        self.points[node] = idx if prev is None else torch.cat([prev, idx])

    def take(self, node) -> torch.Tensor | None:
        """The distinct points sent to ``node`` by all its consumers (None: none were)."""
        idx = self.points.pop(node, None)
        if idx is None:
            return None
        return torch.unique(idx)

    def unsupported(self, node, why: str = "") -> UnsupportedOperationError:
        """The error for an operation without a rule, or a case its rule does not handle."""
        return UnsupportedOperationError(
            f"CNN Fixations has no backtracking rule for {describe(node)} (graph node "
            f"{node.name!r}){': ' + why if why else ''}. Supported: linear, Conv2d, max/average/"
            "adaptive pooling, mean over spatial dims, resizing (interpolate, upsample), "
            "flatten/view/reshape, permute/transpose, add, "
            "multiply by a gate, cat, padding, batch/layer norm, dropout, LRN and elementwise "
            "activations"
        )

    def step(self, node: fx.Node, idx: torch.Tensor) -> None:
        """Send ``node``'s points to its inputs by the rule of its operation."""
        found = rule_for(node, self.modules)
        if found is not None:
            return found.fn(self, node, idx)
        if node.op == "call_module":
            m = self.modules[node.target]
            raise self.unsupported(node, f"{type(m).__name__} is not a known layer type")
        raise self.unsupported(node)

    def walk_back(self, start: fx.Node, progress: bool = False):
        """Visit the nodes from ``start`` (seeded with its points) to the input; returns the
        trace (name → M×3 (channel, row, col)), the shapes of the traced nodes and the points
        reaching the input (None: none did)."""
        trace: "OrderedDict[str, np.ndarray]" = OrderedDict()
        shapes: dict = {}
        input_idx = None
        nodes = list(reversed(self.graph.nodes))
        if progress:
            from tqdm.auto import tqdm

            nodes = tqdm(nodes, desc="CNN Fixations", leave=False)
        with torch.no_grad():
            for node in nodes:
                if node.op in ("output", "get_attr"):
                    continue
                idx = self.take(node)
                if idx is None:
                    continue
                name = self.trace_name(node) or (node.name if node is start else None)
                if name is not None:
                    self._record(trace, shapes, name, node, idx)
                if node.op == "placeholder":
                    input_idx = idx
                else:
                    self.step(node, idx)
        return trace, shapes, input_idx

    def trace_name(self, node: fx.Node) -> str | None:
        """Name under which a node's points appear in ``Fixations.trace`` (None: not shown)."""
        if node.op == "placeholder":
            return "input"
        found = rule_for(node, self.modules)
        if found is None or not found.shown:
            return None
        return str(node.target) if node.op == "call_module" else node.name

    def _record(self, trace: dict, shapes: dict, name: str, node: fx.Node, idx) -> None:
        """Add ``node``'s points as (channel, row, col) to the trace."""
        shape = shape3(self.values[node])
        if name in trace:  # a module called twice: keep both
            k = 2
            while f"{name}#{k}" in trace:
                k += 1
            name = f"{name}#{k}"
        if self.channels_last(node):  # N×H×W×C (ConvNeXt's block): record (c, h, w)
            i, j, c = flat_to_chw(idx, shape)
            shape = (shape[2], shape[0], shape[1])
        else:
            c, i, j = flat_to_chw(idx, shape)
        trace[name] = torch.stack([c, i, j], 1).cpu().numpy()
        shapes[name] = shape

    def channels_last(self, node) -> bool:
        """Whether ``node``'s 4-D value is a map with its channels last: made by
        ``permute(0, 2, 3, 1)``, then only same-shape layers and linear layers over the last
        dimension (ConvNeXt's blocks)."""
        for _ in range(64):
            v = self.values.get(node)
            if not isinstance(v, torch.Tensor) or v.dim() != 4 or not node.args:
                return False
            found = rule_for(node, self.modules)
            if found is not None and found.fn is permute:
                return permute_order(node, 4) == [0, 2, 3, 1]
            if not (is_linear(node, self.modules) or passes_through(node, self.modules)):
                return False
            node = node.args[0]
        return False


def backtrack(
    module: nn.Module,
    x: torch.Tensor,
    target: int | None = None,
    *,
    position: str = "auto",
    leaf_modules: Sequence = (),
    progress: bool = False,
    outlier_removal: bool = True,
    output=None,
    model=None,
) -> Fixations:
    """CNN Fixations of a prepared input ``x`` (1×C×H×W, or 1×F for a vector network) for the
    class index ``target`` (None: the top-1 score); the engine behind :func:`fixations`.

    With ``model`` (the ``cw.Model`` of ``module``) or a resolved ``target``
    (:class:`..targets.Resolved`), ``target`` is anything :func:`..targets.resolve` takes, and
    the backtrack starts from every output neuron the target's score reads (a region's pixels,
    several classes, a box's score; for a callable, the neurons its gradient reaches): the union
    rule, as for the kept neurons of any layer.

    ``output``: the callable that picks the class scores out of what the module returns (a
    ``cw.Model``'s ``output``, e.g. ``lambda out: out["logits"]``); ``None``: the module's
    output itself, or the first element of a tuple.
    The model runs once inside ``restored(module)`` (eval mode; training flags and
    ``requires_grad`` put back after) under ``torch.no_grad``; no hook is registered.
    """
    if position not in ("auto", "centre", "center", "argmax"):
        raise ValueError(f"position must be 'auto', 'centre' or 'argmax', not {position!r}")
    position = "centre" if position == "center" else position
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
        raise ValueError("backtrack needs one input with a batch dimension of 1 (1×C×H×W)")
    graph = trace_graph(module, leaf_modules)
    with restored(module), torch.no_grad():
        values, out = run_graph(graph, module, x)
    logits_node = _scores_node(graph, values, out, output)
    logits = values[logits_node]
    if model is not None or isinstance(target, Resolved):
        goal = target if isinstance(target, Resolved) else resolve(model, target, lambda: logits)
        seeds = torch.unique(goal.neurons(logits))
        tgt = goal.index if goal.index is not None else goal.spec
        label, score = goal.name, float(goal.score(logits)[0])
        probability = float(goal.probability(logits)[0])
    else:
        if logits.dim() != 2:
            raise ValueError(f"the model returned scores of shape {tuple(logits.shape)}, not N×K")
        tgt = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= tgt < logits.shape[1]:
            raise ValueError(f"target {tgt} is out of range for {logits.shape[1]} classes")
        seeds = torch.tensor([tgt], device=logits.device)
        label, score = f"class {tgt}", float(logits[0, tgt])
        probability = float(logits[0].float().softmax(-1)[tgt])

    walk = PointWalk(graph, module, values, position)
    walk.points[logits_node] = seeds
    trace, shapes, input_idx = walk.walk_back(logits_node, progress)
    h, w = x.shape[-2:] if x.dim() == 4 else (1, 1)
    if input_idx is None:
        pts = np.zeros((0, 2), np.int64)
    else:
        _, i, j = flat_to_chw(input_idx, shape3(x))
        pts = torch.unique(torch.stack([i, j], 1), dim=0).cpu().numpy().astype(np.int64)
    return Fixations(
        all_points=pts,
        keep=outlier_mask(pts, (h, w)),
        trace=trace,
        shapes=shapes,
        target=tgt,
        label=label,
        image_size=(int(h), int(w)),
        score=score,
        probability=probability,
        outlier_removal=bool(outlier_removal),
    )


def _scores_node(graph: fx.Graph, values: dict, out, output=None) -> fx.Node:
    """The node of the class scores: the one whose value ``output(out)`` is when ``output`` is
    given, else the model's output or the first element of a tuple."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    if output is not None:
        return _picked_node(graph, values, out, output)
    node = out_node.args[0]
    while isinstance(node, (tuple, list)) and node:
        node = node[0]
    if not isinstance(node, fx.Node) or not isinstance(values.get(node), torch.Tensor):
        raise UnsupportedOperationError(
            "CNN Fixations backtracks from a tensor of class scores; the model's output is "
            f"{type(out).__name__}. Pass output=... to cw.Model to pick them, e.g. "
            "cw.Model(net, output=lambda out: out['logits'])"
        )
    return node


def _picked_node(graph: fx.Graph, values: dict, out, output) -> fx.Node:
    """The graph node whose value is the very tensor ``output(out)`` returns: ``output`` must
    pick the scores out of the model's output (indexing a tuple or dict), not compute new ones,
    since the backtrack starts from a node of the traced graph."""
    picked = output(out)
    if isinstance(picked, torch.Tensor):
        out_node = next(n for n in graph.nodes if n.op == "output")
        returned: list = []
        fx.node.map_arg(out_node.args[0], returned.append)
        # the nodes the model returns first (a tensor may also be the value of a pass-through
        # node before them), then any other node, latest first
        for node in [*returned, *reversed(graph.nodes)]:
            if values.get(node) is picked:
                return node
    raise UnsupportedOperationError(
        "CNN Fixations backtracks from the class scores as a tensor the model computes; "
        f"cw.Model's output=... returned {type(picked).__name__} that is not one of them "
        "(it computed a new tensor). Give an output=... that only picks the scores out of the "
        "model's output, e.g. output=lambda out: out['logits'] or lambda out: out[1], or end "
        "the network's forward with the computation"
    )
