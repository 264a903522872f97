"""Backward rules for ReLU-like non-linearities (guided backprop, DeconvNet).

``relu_rule("guided")`` is a context manager that makes every ReLU-like operation run in its
body — ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, t)``, ``torch.relu``, ``F.relu``,
``F.relu6``, ``F.hardtanh(x, 0, t)``, ``x.clamp(0, t)``, ``x.clamp_min(0)`` and their in-place
forms — through an autograd function with the chosen backward rule. ``nn`` modules are covered
because their ``forward`` calls these functions. It works through a
:class:`torch.overrides.TorchFunctionMode`, which is thread-local and popped in ``finally``;
nothing is registered on the model. For the output ``f`` of the non-linearity and the gradient
``R`` arriving from above, the rules are

* ``"plain"``:      ``1[0 < f < t] · R``  (what autograd does anyway)
* ``"guided"``:     ``1[0 < f < t] · 1[R > 0] · R``  (Springenberg et al. 2015)
* ``"deconvnet"``:  ``relu(R)``  (Zeiler & Fergus 2014: the forward mask is ignored)

Rules that patch only ``nn.ReLU`` modules (Captum's, for one) silently return the plain gradient
on a network built from ``ReLU6`` such as EfficientNet-Lite; ``tests/test_attribution.py``
shows the difference. This module serves attribution and ``cw.deconv`` alike.

An in-place call (``nn.ReLU(inplace=True)``, ``x.relu_()``) is computed out of place inside the
context; code that ignores the returned value of an in-place ReLU would not see the rule.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("plain", "guided", "deconvnet")
_ALIASES = {"gradient": "plain"}


class _ReluLike(torch.autograd.Function):
    """``clamp(x, 0, high)`` with a replaceable backward rule."""

    @staticmethod
    def forward(ctx, x, high, mode):
        y = torch.relu(x) if high is None else F.hardtanh(x, 0.0, high)
        ctx.save_for_backward(y)
        ctx.high = high
        ctx.mode = mode  # the rule is read when the backward pass runs (see _RuleMode.rule)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return backward_rule(grad, y, ctx.high, ctx.mode.rule), None, None


def backward_rule(grad: torch.Tensor, y: torch.Tensor, high: "float | None", rule: str):
    """The gradient below a ReLU-like unit with output ``y`` (``clamp(·, 0, high)``) for the
    gradient ``grad`` above it, under ``rule`` (see the module docstring)."""
    if rule == "deconvnet":
        return torch.relu(grad)
    # the fused masks autograd itself uses: 1[f > 0], or 1[0 < f < t] for the clipped form
    # (the output f is inside (0, t) exactly when the input is)
    if high is None:
        out = torch.ops.aten.threshold_backward(grad, y, 0)
    else:
        out = torch.ops.aten.hardtanh_backward(grad, y, 0.0, high)
    if rule == "guided":  # 1[R > 0], in place on the fresh tensor: measured 4× faster
        out.clamp_min_(0.0)  # than relu(R) first (one allocation fewer)
    return out


def watching() -> "tuple[bool, _RuleMode | None]":
    """``(clear, mode)``: ``clear`` when no TorchFunctionMode watches this thread's calls other
    than, at most, one ReLU rule, which is ``mode`` (code that applies ReLUs itself — the packed
    convolutions of :mod:`.fast` — then applies the rule)."""
    try:
        n = torch._C._len_torch_function_stack()
    except AttributeError:  # pragma: no cover - older torch: assume someone watches
        return False, None
    if n == 0:
        return True, None
    if n == 1:
        try:
            mode = torch._C._get_function_stack_at(0)
        except (AttributeError, RuntimeError, IndexError):  # pragma: no cover
            return False, None
        if isinstance(mode, _RuleMode):
            return True, mode
    return False, None


_RELU = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU6 = {F.relu6}
_HARDTANH = {F.hardtanh, F.hardtanh_}
_CLAMP = {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clamp_, torch.Tensor.clip,
          torch.Tensor.clip_, torch.clamp_}
_CLAMP_MIN = {torch.clamp_min, torch.Tensor.clamp_min, torch.Tensor.clamp_min_, torch.clamp_min_}
try:  # the C function behind F.relu6 in some torch versions
    _RELU6.add(torch._C._nn.relu6)
except AttributeError:  # pragma: no cover
    pass


_CANDIDATES = frozenset(_RELU | _RELU6 | _HARDTANH | _CLAMP | _CLAMP_MIN)


def _arg(args, kwargs, index, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _relu_bounds(func, args, kwargs):
    """``(x, high)`` when the call is ReLU-like (clamps below at exactly 0), else ``None``."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if func in _RELU:
        return x, None
    if func in _RELU6:
        return x, 6.0
    if func in _HARDTANH:
        low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    elif func in _CLAMP:
        low, high = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    elif func in _CLAMP_MIN:
        low, high = _arg(args, kwargs, 1, "min"), None
    else:
        return None
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        return None
    if low is None or float(low) != 0.0 or (high is not None and float(high) <= 0.0):
        return None
    return x, (None if high is None else float(high))


class _RuleMode(TorchFunctionMode):
    """The mode :func:`relu_rule` yields. Its ``rule`` is read by each backward pass, so one
    forward pass can serve two backward passes with different rules (guided Grad-CAM: the
    plain gradient to a layer, then the guided one to the input); set it with :meth:`use`."""

    def __init__(self, rule: str):
        super().__init__()
        self.use(rule)
        self.calls = 0  #: how many ReLU-like calls the rule replaced (for tests)

    def use(self, rule: str) -> None:
        """Apply ``rule`` in the backward passes run from now on."""
        rule = _ALIASES.get(rule, rule)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _CANDIDATES:  # every torch call passes here: the common case first
            return func(*args, **kwargs)
        bounds = _relu_bounds(func, args, kwargs)
        if bounds is None:
            return func(*args, **kwargs)
        x, high = bounds
        self.calls += 1
        return _ReluLike.apply(x, high, self)


@contextlib.contextmanager
def relu_rule(rule: str = "guided"):
    """Apply ``rule`` to every ReLU-like call in the body (see the module docstring).

    The one implementation shared by attribution (guided backprop, DeconvNet, guided Grad-CAM)
    and DeconvNet projections (``cw.deconv``). ``"gradient"`` is another name for ``"plain"``.
    """
    mode = _RuleMode(rule)  # checks the rule
    with mode:  # TorchFunctionMode.__exit__ pops the mode, also on exceptions
        yield mode
