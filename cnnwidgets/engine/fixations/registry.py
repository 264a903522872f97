"""The table of backtracking rules: which function carries a node's points to its inputs.

A rule is a function ``rule_fn(walk, node, idx)``: ``walk`` is the :class:`~.walk.PointWalk`
(the recorded values and ``walk.send``), ``node`` the ``torch.fx`` node, ``idx`` the node's
points (1-D flat indices into one sample of its output). It is registered for the operations
it handles with :func:`rule`::

    @rule(nn.Hardswish, F.hardswish, "hardswish")
    def my_rule(walk, node, idx): ...

An operation is named by what ``torch.fx`` records: a module type (``call_module``; subclasses
match too, the closest registered base class wins), :class:`ClassName` for a module type
matched by its class name only (classes of other packages, not imported here), a function
(``call_function``), or a string: a tensor method's name (``call_method``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx, nn

from ..ruletable import ClassName, RuleTable

__all__ = ["ClassName", "FixationRule", "UnsupportedOperationError", "describe", "is_leaf_type",
           "module_rule", "rule", "rule_for"]


class UnsupportedOperationError(NotImplementedError):
    """The backtrack reached an operation that CNN Fixations has no rule for."""


@dataclass(frozen=True)
class FixationRule:
    """One registered rule: the function, and whether the points of the nodes it handles are
    shown in ``Fixations.trace`` (the layers: linear, convolution, pooling)."""

    fn: Callable
    shown: bool


_TABLE = RuleTable("fixation rule", fn_of=lambda entry: entry.fn)


def rule(*operations, shown: bool = False):
    """Register the decorated function as the backtracking rule of ``operations``.

    ``shown``: the points at these nodes appear in ``Fixations.trace`` (under the module's
    qualified name, or the graph node's name for a function or method). A module type
    registered here is kept whole by :class:`~.graph.FixationTracer` (one graph node).
    """
    def register(fn):
        _TABLE.add(operations, FixationRule(fn, shown))
        return fn
    return register


def module_rule(m: nn.Module) -> FixationRule | None:
    """The rule of a module: its closest registered base class, else its class name."""
    return _TABLE.for_module(m)


def is_leaf_type(m: nn.Module) -> bool:
    """Whether a module has a rule that expects it as one graph node."""
    return _TABLE.has_module(m)


def rule_for(node: fx.Node, modules: dict) -> FixationRule | None:
    """The rule registered for ``node``'s operation, or None."""
    return _TABLE.for_node(node, modules)


def describe(node: fx.Node) -> str:
    """The operation of a node in words, for error messages."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod and mod != '_operator' else ''}{name}"
    return f"{node.op} {node.target}"
