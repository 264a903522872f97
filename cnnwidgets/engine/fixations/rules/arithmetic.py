"""Elementwise arithmetic of two operands: residual addition (authors), subtraction, and
multiplication by a gate (extension; squeeze-excitation)."""
from __future__ import annotations

import operator

import torch

from ..registry import rule


def _operands(node) -> list:
    """The two operands of a binary operation node (the second may be a number)."""
    args = list(node.args[:2])
    if node.op == "call_function" and node.target in (torch.add, torch.sub, torch.mul, torch.div):
        args = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
    return args


def _follow_larger(walk, node, idx, negate_second: bool):
    """Residual addition: each point follows the larger summand there (authors).
    A scalar or broadcast operand (a bias) is not followed."""
    out = walk.values[node]
    args = _operands(node)
    full = [k for k, a in enumerate(args) if walk.is_flow(a) and walk.values[a].shape == out.shape]
    if len(full) == 0:
        if any(walk.is_flow(a) for a in args):
            raise walk.unsupported(node, "a broadcast addition of feature maps")
        return
    if len(full) == 1:
        return walk.send(args[full[0]], idx)
    a = walk.values[args[0]][0].reshape(-1)[idx]
    b = walk.values[args[1]][0].reshape(-1)[idx]
    if negate_second:
        b = -b
    first = a >= b
    walk.send(args[0], idx[first])
    walk.send(args[1], idx[~first])


@rule(operator.add, operator.iadd, torch.add, "add", "add_")
def add(walk, node, idx):
    """``a + b``: each point follows the larger summand there."""
    _follow_larger(walk, node, idx, negate_second=False)


@rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def sub(walk, node, idx):
    """``a - b``: each point follows the larger of ``a`` and ``-b`` there."""
    _follow_larger(walk, node, idx, negate_second=True)


def _to_full_factors(walk, node, idx, factors: list):
    """Multiplication (extension): a broadcast gate (squeeze-excitation, N×C×1×1) passes
    the point through to the gated map; full-size factors all receive it."""
    out = walk.values[node]
    full = [a for a in factors if walk.is_flow(a) and walk.values[a].shape == out.shape]
    if not full and any(walk.is_flow(a) for a in factors):
        raise walk.unsupported(node, "a broadcast product with no full-size factor")
    for a in full:
        walk.send(a, idx)


@rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def mul(walk, node, idx):
    """``a * b``: the point goes to every full-size factor (a broadcast gate is not followed)."""
    _to_full_factors(walk, node, idx, _operands(node))


@rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def div(walk, node, idx):
    """``a / b``: the point goes to the dividend when it is full-size."""
    _to_full_factors(walk, node, idx, _operands(node)[:1])
