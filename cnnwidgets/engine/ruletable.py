"""A table of rules per graph operation, shared by the rule sets that walk a ``torch.fx`` graph
(CNN Fixations' backtracking rules, incremental inference's rules).

An operation is named by what ``torch.fx`` records: a module type (``call_module``; subclasses
match too, the closest registered base class wins), :class:`ClassName` for a module type
matched by its class name only (classes of other packages, not imported here), a function
(``call_function``), or a string: a tensor method's name (``call_method``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import fx, nn


@dataclass(frozen=True)
class ClassName:
    """A module type named by its class name (``ClassName("FrozenBatchNorm2d")``)."""

    name: str


class RuleTable:
    """Operations → one entry each (a rule: whatever the rule set stores)."""

    def __init__(self, what: str, fn_of: Callable[[Any], Callable] = lambda entry: entry):
        self.what = what  #: what an entry is, for error messages ("fixation rule")
        self.fn_of = fn_of  #: the function of an entry (two entries of one function may share an op)
        self.module_types: dict = {}  #: nn.Module subclass → entry
        self.module_names: dict = {}  #: class name → entry
        self.functions: dict = {}  #: function → entry
        self.methods: dict = {}  #: tensor method name → entry

    def add(self, operations: Iterable, entry) -> None:
        """Register ``entry`` for each of ``operations``; an operation already registered for
        another function is an error."""
        for op in operations:
            if isinstance(op, type) and issubclass(op, nn.Module):
                table = self.module_types
            elif isinstance(op, ClassName):
                table, op = self.module_names, op.name
            elif isinstance(op, str):
                table = self.methods
            elif callable(op):
                table = self.functions
            else:
                raise TypeError(f"cannot register a {self.what} for {op!r}")
            old = table.get(op)
            if old is not None and self.fn_of(old) is not self.fn_of(entry):
                raise ValueError(f"{op!r} already has the {self.what} {self.fn_of(old).__name__}")
            table[op] = entry

    def for_module(self, m: nn.Module):
        """The entry of a module: its closest registered base class, else its class name."""
        for cls in type(m).__mro__:
            found = self.module_types.get(cls)
            if found is not None:
                return found
        return self.module_names.get(type(m).__name__)

    def has_module(self, m: nn.Module) -> bool:
        """Whether a module has an entry (the rule then expects it as one graph node)."""
        return isinstance(m, tuple(self.module_types)) or type(m).__name__ in self.module_names

    def for_node(self, node: fx.Node, modules: dict):
        """The entry registered for ``node``'s operation, or None."""
        if node.op == "call_module":
            return self.for_module(modules[node.target])
        if node.op == "call_function":
            return self.functions.get(node.target)
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None
