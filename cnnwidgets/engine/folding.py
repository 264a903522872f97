"""An inference twin of a network: batch normalisation folded into the convolution before it.

In eval mode a ``BatchNorm`` that directly follows a convolution is an affine map per channel,
so ``bn(conv(x)) = conv'(x)`` with ``w' = w · s`` and ``b' = (b − μ) · s + β`` where
``s = γ / √(σ² + ε)``. :func:`folded` returns a ``torch.fx`` graph module that runs the network
with those pairs merged: the same function (to float rounding, ~1e-6 relative), one pass over
each activation tensor fewer, forward and backward. Gradient and perturbation attribution
methods run hundreds of forward/backward passes that need no layer tap; on ResNet-18 on a CPU
they run about 15% faster on the twin.

The twin shares every module with the original except the folded convolutions, which are
new modules built from the current weights. Nothing on the original is changed. It is cached
per network and refolded when a folded weight or statistic changes: an in-place update
(optimiser step, ``load_state_dict``, ``nn.init``) bumps the tensor's version and assigning
``.data`` replaces its storage, both seen at the next call; an in-place change made *through*
``.data`` (``p.data.mul_(2)``) is invisible to both — call :func:`forget` after one. The twin is
rebuilt when modules are replaced. :func:`folded` returns the original module itself
when the network cannot be traced by ``torch.fx``, has nothing to fold, or carries hooks on
the folded modules or the root (a hook someone registered must keep firing).

**The linear head.** When the network's input goes straight into a convolution and nowhere
else, that first layer is affine in the input, so the gradient of any score with respect to the
input is ``Wᵀ`` applied to the gradient at the layer's output. Methods that only need a
weighted *sum* of input gradients over many inputs (SmoothGrad, Integrated Gradients) can add
up the gradients at the head's output and apply ``Wᵀ`` once, instead of once per input: the
head's backward pass — on ResNet-18 a 7×7 stride-2 convolution whose backward is the most
expensive single operation of the network on a CPU — runs once per call instead of once per
sample. :class:`Head` (the twin's first layer) and :func:`head_of` give access to it.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import torch
import torch.fx as fx
from torch import nn

from .hooks import MODEL_GATE

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")


class _Tracer(fx.Tracer):
    """The default tracer, with every convolution and batch norm kept as one call — also
    subclasses outside ``torch.nn`` (EfficientNet's static-"same"-padding convolution)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _CONVS + _NORMS) or super().is_leaf_module(m, qualname)


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and isinstance(bn, _NORMS)
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels
            and conv.weight.dtype in (torch.float32, torch.float64)
            and not _has_hooks(conv) and not _has_hooks(bn))


def _state(*modules: nn.Module) -> tuple:
    """What a folded convolution was built from: every tensor's storage and version."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for m in modules for d in (m._parameters, m._buffers) for t in d.values()
                 if t is not None)


def _fold_into(target: nn.Module, conv: nn.Module, bn: nn.Module) -> None:
    """Set ``target``'s weight and bias to ``conv`` followed by ``bn`` (eval mode)."""
    with torch.no_grad():
        w = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(
            w.shape[0], dtype=torch.float64, device=w.device)
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale = scale * bn.weight.double()
            shift = shift * bn.weight.double() + bn.bias.double()
        dtype = conv.weight.dtype
        target.weight = nn.Parameter((w * scale.view(-1, *[1] * (w.ndim - 1))).to(dtype),
                                     requires_grad=False)
        target.bias = nn.Parameter((b * scale + shift).to(dtype), requires_grad=False)


class Head(nn.Module):
    """The twin's first layer: a convolution applied to the network's input and to nothing
    else, hence affine in the input (see the module docstring). Inside :meth:`capture` on the
    calling thread, a forward pass records the head's output as a leaf tensor the caller can
    differentiate with respect to, and the head's own backward pass is not part of the graph;
    :meth:`transpose` then maps a gradient at the output back to the input."""

    def __init__(self, conv: nn.Module, fresh: bool):
        super().__init__()
        self.conv = conv
        #: whether the layer after the head may change its input in place (``ReLU(inplace)``):
        #: then it is given a copy, as an in-place change of the recorded leaf is not allowed
        self.fresh = fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box = getattr(_CAPTURE, "boxes", {}).get(id(self))
        if box is None:
            return self.conv(x)
        with torch.no_grad():
            z = self.conv(x)
        z.requires_grad_(True)
        box.append(z)
        return z + 0 if self.fresh else z

    @contextlib.contextmanager
    def capture(self):
        """Record the head's outputs (a list, one leaf tensor per forward pass) on this thread."""
        boxes = _CAPTURE.__dict__.setdefault("boxes", {})
        previous = boxes.get(id(self))
        box: list = []
        boxes[id(self)] = box
        try:
            yield box
        finally:
            if previous is None:
                boxes.pop(id(self), None)
            else:
                boxes[id(self)] = previous

    def transpose(self, grad: torch.Tensor, input_shape) -> torch.Tensor:
        """The gradient at the input (``input_shape``, one image) of ``<grad, head(x)>``."""
        x0 = torch.zeros((1, *input_shape[1:]), dtype=grad.dtype, device=grad.device,
                         requires_grad=True)
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(self.conv(x0), x0, grad)
        return gx


_CAPTURE = threading.local()  # per thread: {id(head): list of recorded outputs}


def head_of(net: nn.Module) -> "Head | None":
    """The :class:`Head` of a twin returned by :func:`folded`, or ``None``."""
    head = getattr(net, "cw_head", None)
    return head if isinstance(head, Head) else None


def _in_place(node: fx.Node, named: dict) -> bool:
    """Whether ``node`` may change its first argument in place (or cannot be told)."""
    if node.op == "call_module":
        return bool(getattr(named.get(node.target), "inplace", False))
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return bool(node.kwargs.get("inplace")) or name.endswith("_")
    return True


def _is_affine(conv: nn.Module, shape) -> bool:
    """Check on random inputs that ``conv`` is affine in its input (a convolution subclass
    could do anything in its ``forward``)."""
    try:
        p = next(conv.parameters())
        g = torch.Generator(device="cpu").manual_seed(0)
        a, b = (torch.randn(shape, generator=g).to(p) for _ in range(2))
        with torch.no_grad():
            f0 = conv(torch.zeros_like(a))
            lhs = conv(a + 2 * b) - f0
            rhs = (conv(a) - f0) + 2 * (conv(b) - f0)
        return bool(torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * float(lhs.abs().max()) + 1e-6))
    except Exception:  # noqa: BLE001 - anything odd: no head
        return False


def _add_head(graph: fx.Graph, named: dict) -> bool:
    """Route the input's one convolution through a :class:`Head` (see the module docstring)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    users = [u for u in inputs[0].users
             if not (u.op == "call_method" and u.target in ("size", "dim"))]
    if len(users) != 1 or users[0].op != "call_module" or users[0].kwargs:
        return False
    node = users[0]
    conv = named.get(node.target)
    if not isinstance(conv, nn.Conv2d) or conv.weight.dtype not in (torch.float32, torch.float64):
        return False
    k = conv.kernel_size
    shape = (1, conv.in_channels, k[0] * 2 + 5, k[1] * 2 + 5)
    if not _is_affine(conv, shape):
        return False
    named["cw_head"] = Head(conv, fresh=any(_in_place(u, named) for u in node.users))
    node.target = "cw_head"
    return True


class _Twin:
    def __init__(self, structure, graph_module, pairs):
        self.structure = structure
        self.module = graph_module  # None: use the original
        self.pairs = pairs  # [(conv, bn, folded module, state)]


_TWINS: "weakref.WeakKeyDictionary[nn.Module, _Twin]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class _Busy(Exception):
    pass


def _build(module: nn.Module, structure) -> _Twin:
    try:
        # fx patches nn.Module.__call__ for every thread while it traces: wait briefly for
        # other threads' forward passes; if they go on, run unfolded this time
        with MODEL_GATE.exclusive(timeout=0.5):
            try:
                graph = _Tracer().trace(module)
            except Exception:  # noqa: BLE001 - any model fx cannot trace runs unfolded
                return _Twin(structure, None, [])
    except RuntimeError as exc:  # the gate's timeout
        raise _Busy() from exc
    named = dict(module.named_modules())
    pairs = []
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = named.get(src.target), named.get(node.target)
        if conv is None or bn is None or not _foldable(conv, bn):
            continue
        fused = copy.deepcopy(conv)
        _fold_into(fused, conv, bn)
        name = f"cw_folded_{len(pairs)}"
        named[name] = fused
        src.target = name
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        pairs.append((conv, bn, fused, _state(conv, bn)))
    if not pairs:
        return _Twin(structure, None, [])
    _add_head(graph, named)
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    root = {}
    for t in targets:
        obj = named.get(t)
        if obj is None:  # a parameter or buffer read with get_attr
            obj = module
            for part in str(t).split("."):
                obj = getattr(obj, part)
        root[t] = obj
    try:
        gm = fx.GraphModule(root, graph, class_name=f"Folded{type(module).__name__}").eval()
    except Exception:  # noqa: BLE001
        return _Twin(structure, None, [])
    return _Twin(structure, gm, pairs)


def folded(module: nn.Module) -> nn.Module:
    """``module`` with eval-mode batch norms folded into their convolutions (see the module
    docstring), or ``module`` itself when that is not possible. Only valid in eval mode:
    call it inside :func:`~cnnwidgets.engine.hooks.restored`."""
    if module.training or _has_hooks(module):
        return module
    structure = tuple(id(m) for m in module.modules())
    with _LOCK:
        twin = _TWINS.get(module)
        if twin is None or twin.structure != structure:
            try:
                twin = _build(module, structure)
            except _Busy:
                return module
            _TWINS[module] = twin
        if twin.module is None:
            return module
        for i, (conv, bn, fused, state) in enumerate(twin.pairs):
            if _has_hooks(conv) or _has_hooks(bn):
                return module
            now = _state(conv, bn)
            if now != state:  # weights or statistics changed since: fold again
                _fold_into(fused, conv, bn)
                twin.pairs[i] = (conv, bn, fused, now)
        return twin.module


def forget(module: nn.Module) -> None:
    """Drop ``module``'s folded twin; the next :func:`folded` call builds it again. Needed only
    after changing a weight in place through ``.data``, which leaves no trace PyTorch exposes."""
    with _LOCK:
        _TWINS.pop(module, None)
