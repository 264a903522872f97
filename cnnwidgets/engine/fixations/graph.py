"""The model as a graph: ``torch.fx`` tracing with every module that has a backtracking rule
kept as one node, and one forward pass that records every node's value."""
from __future__ import annotations

import operator
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..guard import guard
from .registry import UnsupportedOperationError, is_leaf_type


class FixationTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every module with a backtracking rule as one node.

    Subclasses of ``nn.Conv2d``/``nn.MaxPool2d`` with their own ``forward`` (EfficientNet's
    ``Conv2dStaticSamePadding``, whose ``static_padding`` submodule pads before the convolution)
    are leaves too; their rule reads the padding from the module. ``leaf_modules`` adds more
    (types or qualified names) for code that does not trace.
    """

    def __init__(self, leaf_modules: Sequence = ()):
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf_type(m):
            return True
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def trace_graph(module: nn.Module, leaf_modules: Sequence = ()) -> fx.Graph:
    """The module's ``torch.fx`` graph in eval mode (cached while its submodules are the same)."""
    signature = (tuple((n, id(m)) for n, m in module.named_modules()), tuple(map(str, leaf_modules)))
    hit = _GRAPHS.get(module)
    if hit is not None and hit[0] == signature:
        return hit[1]
    model_guard = guard(module)
    try:
        # every model's forward passes wait: fx patches nn.Module.__call__ while it traces
        with model_guard.tracing(), model_guard.restored():
            graph = FixationTracer(leaf_modules).trace(module)
    except Exception as exc:  # noqa: BLE001 - explained to the user
        raise UnsupportedOperationError(
            f"CNN Fixations needs to trace {type(module).__name__} with torch.fx, which failed: "
            f"{type(exc).__name__}: {exc}. Pass leaf_modules=[...] (module types or qualified "
            "names) to keep the submodule that does not trace as one node"
        ) from exc
    _GRAPHS[module] = (signature, graph)
    return graph


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether the node's operation writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        return bool(node.kwargs.get("inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    return False


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv}


def _evaluate(node: fx.Node, module: nn.Module | None, args, kwargs):
    """One node's value, leaving its input intact: an in-place operation runs as its
    out-of-place twin where there is one (no copy), else on a copy of its input."""
    if _is_inplace(node, module) and args and isinstance(args[0], torch.Tensor):
        if node.op == "call_module" and type(module) is nn.ReLU:
            return torch.relu(args[0])
        if node.op == "call_module" and isinstance(module, nn.Hardtanh):  # incl. ReLU6
            return F.hardtanh(args[0], module.min_val, module.max_val)
        if node.op == "call_function" and node.target in _OUT_OF_PLACE:
            return _OUT_OF_PLACE[node.target](*args, **kwargs)
        if node.op == "call_function" and "inplace" in kwargs:
            return node.target(*args, **{**kwargs, "inplace": False})
        args = (args[0].clone(),) + tuple(args[1:])
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)  # call_method


def run_graph(graph: fx.Graph, root: nn.Module, x: torch.Tensor) -> tuple[dict, Any]:
    """Evaluate the graph on ``x``; returns (node → value, output value). Each recorded value
    is the one the next operation saw (nothing later writes into it)."""
    values: dict = {}
    modules = dict(root.named_modules())
    load = lambda a: fx.node.map_arg(a, lambda n: values[n])  # noqa: E731
    out = None
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = x
        elif node.op == "get_attr":
            obj = root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            values[node] = obj
        elif node.op == "output":
            out = load(node.args[0])
            break
        else:
            module = modules[node.target] if node.op == "call_module" else None
            values[node] = _evaluate(node, module, load(node.args), load(node.kwargs))
    return values, out
