"""The incremental-inference rules: for each operation, the changed box of its output and the
values inside it, from its inputs' :class:`~.Patch` values (see the package docstring)."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..fixations.graph import _evaluate
from ..fixations.points import height_width
from ..fixations.rules.convolution import _conv_padding
from . import ClassName, Patch, Whole, clean_window, rule, span


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def changed_rows(first: torch.Tensor, length: int, pad: int, k: int, s: int, d: int,
                 size: int, threshold: float = 1.0):
    """``(first, length)`` of the output rows of a sliding window (kernel ``k``, stride ``s``,
    dilation ``d``, ``pad`` rows of padding before the map) whose windows meet the input rows
    ``first … first + length − 1``: output row ``o`` reads input rows ``o·s − pad … o·s − pad
    + d·(k − 1)``, so ``o`` runs from ``ceil((first + pad − d·(k − 1)) / s)`` to
    ``floor((first + length − 1 + pad) / s)`` (:func:`~.span` makes one length of them)."""
    low = -_floor_div(-(first + pad - d * (k - 1)), s)  # ceil
    high = _floor_div(first + length - 1 + pad, s)
    return span(low, high, size, threshold)


def sliding(run, x: Patch, out_full: torch.Tensor, kernel, stride, dilation, pads, op,
            fill: float = 0.0) -> Patch:
    """A sliding-window operation (convolution, pooling) on the changed region: the output's
    box from :func:`changed_rows`, its values ``op(window, (0, 0))`` where ``window`` is the
    input around the box (``pads`` = rows above, columns left of the map; ``fill`` outside it);
    ``op(t, padding)`` runs the operation with that padding (the operation's own padding value,
    which ``fill`` must be)."""
    (kh, kw), (sh, sw), (dh, dw), (top, left) = kernel, stride, dilation, pads
    oh, ow = out_full.shape[-2:]
    t, h = changed_rows(x.top, x.h, top, kh, sh, dh, oh, run.threshold)
    l, w = changed_rows(x.left, x.w, left, kw, sw, dw, ow, run.threshold)
    rows, cols = (h - 1) * sh + dh * (kh - 1) + 1, (w - 1) * sw + dw * (kw - 1) + 1
    H, W = x.full.shape[-2:]
    if ((x.h, x.w, h, w) == (H, W, oh, ow) and rows - H - top == top
            and cols - W - left == left):
        # the whole map in and out, padded alike on both sides: the operation pads itself
        return Patch(out_full, op(x.values, (top, left)), t, l)
    window = x.window(t * sh - top, l * sw - left, rows, cols, fill)
    return Patch(out_full, op(window, (0, 0)), t, l)


def _trusted(run, node: fx.Node, compute) -> bool:
    """Whether ``compute(patch)`` gives the stored value of ``node`` on the whole map of its
    stored input (checked once per node): a subclass of a convolution or pooling may do more
    than its base class."""
    ok = run.trust.get(node)
    if ok is None:
        full = run.clean[node.args[0]]
        zero = torch.zeros(1, dtype=torch.long, device=full.device)
        threshold, run.threshold = run.threshold, 1.0
        try:
            got = compute(Patch(full, full, zero, zero)).whole()
            want = run.clean[node]
            ok = got.shape == want.shape and bool(torch.allclose(
                got, want, rtol=1e-4, atol=1e-5 * (1.0 + float(want.abs().max()))))
        except Exception:  # noqa: BLE001 - anything odd: that node runs whole
            ok = False
        finally:
            run.threshold = threshold
        run.trust[node] = ok
    return ok


# ------------------------------------------------------------------ convolution, pooling
def convolve(run, node: fx.Node, x: Patch, out_full: torch.Tensor, weight: torch.Tensor,
             bias) -> "Patch | None":
    """The convolution of ``node`` (a module call) on the changed region, with ``weight`` and
    ``bias`` (its own, or folded with the batch norm after it) and ``out_full`` the stored
    output; ``None`` where there is no rule (padding other than zeros, not 2-D)."""
    m = run.modules[node.target]
    if (not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros" or x.full.dim() != 4
            or len(node.args) != 1 or node.kwargs):
        return None
    stride, dilation = height_width(m.stride), height_width(m.dilation)
    kernel = tuple(m.weight.shape[-2:])
    left, _, top, _ = _conv_padding(m, x.full.shape[-2:], run.clean[node].shape[-2:], kernel,
                                    stride, dilation)

    def conv(p: Patch, out, w, b):
        return sliding(run, p, out, kernel, stride, dilation, (top, left),
                       lambda t, pad: F.conv2d(t, w, b, stride, pad, dilation, m.groups))

    if type(m) is not nn.Conv2d and not _trusted(
            run, node, lambda p: conv(p, run.clean[node], m.weight, m.bias)):
        return None
    return conv(x, out_full, weight, bias)


@rule(nn.Conv2d)
def convolution(run, node, args, kwargs):
    """Any stride, padding (also TensorFlow's static "same" padding), dilation and groups."""
    m = run.modules[node.target]
    if len(args) != 1 or kwargs or not isinstance(args[0], Patch):
        return None
    return convolve(run, node, args[0], run.clean[node], m.weight, m.bias)


@rule(nn.MaxPool2d, nn.AvgPool2d)
def pooling(run, node, args, kwargs):
    """Max pooling (the padding reads as −∞, ``ceil_mode`` as the forward pass had it) and
    average pooling whose padding counts as zeros."""
    m = run.modules[node.target]
    x = args[0]
    if len(args) != 1 or kwargs or not isinstance(x, Patch) or x.full.dim() != 4:
        return None
    kernel, stride = height_width(m.kernel_size), height_width(m.stride or m.kernel_size)
    pad = height_width(m.padding)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            return None
        dilation, fill = height_width(m.dilation), float("-inf")

        def op(t, pad):
            return F.max_pool2d(t, kernel, stride, pad, dilation)
    else:
        if m.ceil_mode or (not m.count_include_pad and any(pad)):
            return None
        dilation, fill = (1, 1), 0.0

        def op(t, pad):
            return F.avg_pool2d(t, kernel, stride, pad, False, True, m.divisor_override)

    def pool(p: Patch):
        return sliding(run, p, run.clean[node], kernel, stride, dilation, pad, op, fill)

    if type(m) not in (nn.MaxPool2d, nn.AvgPool2d) and not _trusted(run, node, pool):
        return None
    return pool(x)


def fold_pairs(run) -> dict:
    """batch-norm node → (convolution node, folded weight, folded bias) for every eval-mode
    batch norm whose only input is a convolution read by nothing else."""
    from ..fast import _foldable, folded_weights

    pairs = {}
    for node in run.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or len(src.args) != 1 or src.kwargs):
            continue
        conv, bn = run.modules.get(src.target), run.modules.get(node.target)
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm) and not bn.training
                and _foldable(conv, bn)):
            pairs[node] = (src, *folded_weights(conv, bn))
    return pairs


# ------------------------------------------------------------------ same box
@rule(
    _BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd,
    ClassName("FrozenBatchNorm2d"), ClassName("MemoryEfficientSwish"), ClassName("Swish"),
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu,
    F.leaky_relu, F.mish, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
    torch.tanh, torch.relu_, F.relu_, torch.clamp, torch.clip,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_min_", "contiguous", "clone", "detach", "float", "hardtanh_",
)
def pointwise(run, node, args, kwargs):
    """Batch norm (eval, running statistics), activations, dropout (eval), identity: each output
    value depends on the input value at the same place only, so the box stays."""
    x, rest = args[0], args[1:]
    if not isinstance(x, Patch) or any(isinstance(a, (Patch, Whole)) for a in rest) \
            or any(isinstance(a, (Patch, Whole)) for a in kwargs.values()):
        return None
    module = run.modules[node.target] if node.op == "call_module" else None
    if module is not None and (module.training or (
            isinstance(module, _BatchNorm) and module.running_mean is None)):
        return None  # statistics of the batch: every value depends on the whole map
    value = _evaluate(node, module, (x.values, *rest), kwargs)
    if not isinstance(value, torch.Tensor) or value.shape != x.values.shape:
        return None
    return Patch(run.clean[node], value, x.top, x.left)


# ------------------------------------------------------------------ union of boxes
def union(patches, threshold: float = 1.0):
    """``(top, h, left, w)``: one box per copy covering the boxes of all ``patches``."""
    first = patches[0]
    size = first.full.shape[-2:]
    top = torch.stack([p.top for p in patches]).amin(0)
    bottom = torch.stack([p.top + p.h for p in patches]).amax(0) - 1
    left = torch.stack([p.left for p in patches]).amin(0)
    right = torch.stack([p.left + p.w for p in patches]).amax(0) - 1
    t, h = span(top, bottom, size[0], threshold)
    l, w = span(left, right, size[1], threshold)
    return t, h, l, w


def _spatially_constant(a) -> bool:
    """A value that is the same at every place of a map (a number, a per-channel vector)."""
    if isinstance(a, (Patch, Whole)):
        return False
    return not isinstance(a, torch.Tensor) or a.dim() < 2 or tuple(a.shape[-2:]) == (1, 1)


@rule(operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
      operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
      torch.div, "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_")
def elementwise(run, node, args, kwargs):
    """Residual sums, products, differences: the union of the boxes (a number or a per-channel
    vector keeps the box; a whole batch, as squeeze-excitation's pooled weights, makes the
    changed region the whole map)."""
    if len(args) != 2 or not all(_spatially_constant(v) for v in kwargs.values()):
        return None
    patches = [a for a in args if isinstance(a, Patch)]
    if any(not isinstance(a, Patch) and not _spatially_constant(a) for a in args):
        return None
    size = patches[0].full.shape[-2:]
    if any(p.full.shape[-2:] != size or p.full.dim() != 4 for p in patches):
        return None
    t, h, l, w = union(patches)
    parts = [a.window(t, l, h, w) if isinstance(a, Patch) else a for a in args]
    value = _evaluate(node, None, tuple(parts), kwargs)
    out = run.clean[node]
    if not isinstance(value, torch.Tensor) or out.dim() != 4 \
            or value.shape != (patches[0].n, out.shape[1], h, w):
        return None
    return Patch(out, value, t, l)


@rule(*{torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)})
def concatenation(run, node, args, kwargs):
    """Concatenation along channels: the union of the boxes."""
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    out = run.clean[node]
    if (not isinstance(tensors, (list, tuple)) or out.dim() != 4 or dim not in (1, -3)
            or not all(isinstance(a, Patch) for a in tensors)):
        return None
    t, h, l, w = union(list(tensors))
    return Patch(out, torch.cat([a.window(t, l, h, w) for a in tensors], 1), t, l)


# ------------------------------------------------------------------ global pooling
def _global(run, node, args, kwargs) -> bool:
    """Whether the node averages each whole map to one value."""
    if node.op == "call_module":
        size = run.modules[node.target].output_size
    elif node.target is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
    else:  # mean over dims
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return dims is not None and sorted(d % 4 for d in dims) == [2, 3] and len(args) <= 3 \
            and kwargs.keys() <= {"dim", "keepdim"}
    return size == 1 or tuple(size if isinstance(size, (tuple, list)) else ()) == (1, 1)


@rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, torch.mean, "mean")
def global_average(run, node, args, kwargs):
    """Global average pooling: the stored mean plus the box's change over the map's area. From
    here on every value is changed: a whole batch."""
    x = args[0]
    if not isinstance(x, Patch) or x.full.dim() != 4 or not _global(run, node, args, kwargs):
        return None
    H, W = x.full.shape[-2:]
    change = (x.values - clean_window(x.full, x.top, x.left, x.h, x.w)).sum((2, 3)) / (H * W)
    out = run.clean[node]
    return Whole(out + change.reshape(x.n, *out.shape[1:]))
