"""Backward rules for ReLU-like non-linearities: plain gradient, DeconvNet, guided backprop.

    with relu_rule(model.module, "deconvnet"):
        y = model.scores(x)          # forward values are unchanged
        y[0, k].backward()           # ...but every ReLU-like op passes relu(R) backwards

The rules (``R`` is the gradient arriving from above, ``f`` the op's output):

* ``"gradient"`` — the true derivative: ``1[0 < f < cap] · R`` (``cap = ∞`` for ReLU, 6 for ReLU6)
* ``"deconvnet"`` — Zeiler & Fergus: ``relu(R)``, whatever the forward input was
* ``"guided"`` — guided backprop (Springenberg et al.): ``1[0 < f < cap] · 1[R > 0] · R``

They apply to every ReLU-like operation the model runs, not only ``nn.ReLU`` modules:

* ``nn.ReLU`` and ``nn.ReLU6`` modules (also when one module object is called several times per
  forward, as EfficientNet's shared ``_swish``) — through a forward pre-hook that keeps the
  module's input and a forward hook that returns the output of :class:`_ReluRule`, a custom
  autograd function whose forward value is the module's own output and whose backward is the rule;
* functional calls — ``torch.relu``, ``F.relu``, ``Tensor.relu`` (and their in-place ``_``
  variants), ``F.relu6`` and ``F.hardtanh(x, 0, cap)`` — through a
  :class:`torch.overrides.TorchFunctionMode` that is active only inside the context manager
  (and only in the thread that entered it).

Functional calls inside a hooked module are not wrapped twice. An in-place functional call
(``F.relu(x, inplace=True)``) is computed out of place under the rule and its result returned:
code that ignores the returned tensor and reads ``x`` afterwards would see the pre-activation.
All hooks are removed in ``finally``; the model's parameters are never touched. The hooks act
only on forward passes run by the thread that entered the block (the function mode is
thread-local anyway), so a widget's background thread is not affected.

This module is self-contained (torch only) so that both the attribution methods
(guided backprop, DeconvNet saliency) and the DeconvNet projection can share it.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

RULES = ("gradient", "deconvnet", "guided")
_ALIASES = {"plain": "gradient", "grad": "gradient", "deconv": "deconvnet",
            "guided_backprop": "guided"}


def _check_rule(rule: str) -> str:
    key = _ALIASES.get(str(rule).lower(), str(rule).lower())
    if key not in RULES:
        raise ValueError(f"unknown ReLU rule {rule!r}; choose one of {', '.join(RULES)}")
    return key


class _ReluRule(torch.autograd.Function):
    """Forward: return ``value`` (the op's real output). Backward: the rule, sent to ``x``."""

    @staticmethod
    def forward(ctx, x, value, rule, cap):
        ctx.rule = rule
        if rule != "deconvnet":
            ctx.save_for_backward(value)
        ctx.cap = cap
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.rule == "deconvnet":
            return grad.clamp(min=0), None, None, None
        (value,) = ctx.saved_tensors
        mask = value > 0
        if ctx.cap is not None and math.isfinite(ctx.cap):
            mask = mask & (value < ctx.cap)
        out = grad * mask
        if ctx.rule == "guided":
            out = out.clamp(min=0)
        return out, None, None, None


def apply_rule(x: torch.Tensor, value: torch.Tensor, rule: str, cap: float | None = None):
    """``value`` (the op's output for input ``x``) with ``rule`` as its backward to ``x``."""
    return _ReluRule.apply(x, value.detach(), _check_rule(rule), cap)


def _module_cap(module: nn.Module):
    if isinstance(module, nn.ReLU6):
        return 6.0
    if isinstance(module, nn.ReLU):
        return None
    return getattr(module, "max_val", None)


#: Module types treated as ReLU-like (Hardtanh only when its lower bound is 0, as ReLU6 is).
def is_relu_like(module: nn.Module) -> bool:
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return True
    return isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0


class _FunctionalRule(TorchFunctionMode):
    """Wraps functional ReLU-like calls made outside hooked modules."""

    def __init__(self, rule: str, state: dict):
        super().__init__()
        self.rule = rule
        self.state = state
        self.relu = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu,
                     torch.Tensor.relu_}
        self.relu6 = {F.relu6}
        self.hardtanh = {F.hardtanh, F.hardtanh_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["depth"] == 0 and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            cap = "skip"
            if func in self.relu:
                cap = None
            elif func in self.relu6:
                cap = 6.0
            elif func in self.hardtanh:
                lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
                if float(lo) == 0.0:
                    cap = float(hi)
            if cap != "skip":
                value = x.clamp(min=0) if cap is None else x.clamp(0, cap)
                return _ReluRule.apply(x, value.detach(), self.rule, cap)
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rule(module: nn.Module, rule: str = "deconvnet", *, functional: bool = True):
    """Inside the block, every ReLU-like op in ``module`` back-propagates with ``rule``.

    ``rule`` is ``"gradient"``, ``"deconvnet"`` or ``"guided"``. ``functional=False`` leaves
    functional calls (``F.relu`` in a ``forward``) alone and patches modules only.
    Forward values are unchanged. Hooks are removed (and the function mode left) in ``finally``.
    """
    rule = _check_rule(rule)
    handles = []
    entered = False
    state = {"depth": 0, "inputs": []}
    me = threading.get_ident()
    mode = _FunctionalRule(rule, state) if functional else None
    try:
        for m in module.modules():
            if not is_relu_like(m):
                continue
            cap = _module_cap(m)

            def pre(mod, args):
                if threading.get_ident() != me:  # another thread's forward: leave it alone
                    return None
                x = args[0]
                state["inputs"].append(x)
                state["depth"] += 1
                # an in-place op must not overwrite the input the rule sends gradients to
                if getattr(mod, "inplace", False):
                    return (x.detach().clone(),) + tuple(args[1:])
                return (x.detach(),) + tuple(args[1:])

            def post(mod, args, out, cap=cap):
                if threading.get_ident() != me:
                    return None
                state["depth"] -= 1
                x = state["inputs"].pop()
                if not x.requires_grad:
                    return out.detach() if isinstance(out, torch.Tensor) else None
                return _ReluRule.apply(x, out.detach(), rule, cap)

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        entered = False
        if mode is not None:
            mode.__enter__()
            entered = True
        yield module
    finally:
        if mode is not None and entered:
            mode.__exit__(None, None, None)
        for h in handles:
            h.remove()

