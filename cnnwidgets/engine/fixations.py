"""CNN Fixations (Mopuri, Garg & Babu, IEEE TIP 2019): unravel the forward pass.

No gradients, no bias terms, no tuning parameters. Starting from the class neuron, the set of
*points* (channel, row, col) that decided each layer's kept outputs is carried back, layer by
layer, down to the input pixels. This module does it for any network ``torch.fx`` can trace,
with one rule per operation instead of one loop per architecture:

1. The model is traced once (``torch.fx`` symbolic tracing with :class:`FixationTracer`, cached
   per module) into a graph of nodes.
2. One forward pass walks the graph with a tiny interpreter that keeps every node's value.
   No hook is registered at all; operations that write into their input (in-place ReLU,
   ``out += identity``) get a copy, so each recorded value is the one the next layer saw.
3. Nodes are visited in reverse order from the logits. Each node holds a *set* of points —
   flat indices into one sample of its output (deduplicated with ``torch.unique``) — and its
   rule sends points to the nodes it read from, where the sets of all consumers are merged.

The authors' rules (see ``shared/ALGORITHMS.md``):

* **linear → linear**: keep every input whose contribution ``a_j W_ij`` is positive for some
  kept neuron i (union); **linear on a flattened C×H×W map**: per neuron the single argmax of
  the contribution. Only the weight rows of the kept neurons are read, in chunks (the authors'
  VGG fc6 step builds a ~411 MB product; here it is a few MB at a time).
* **convolution**: in the receptive-field window of the point, the contributions
  ``x[:, window] * W[c]`` summed over the window give one score per input channel; the new
  channel is the argmax, the new position the window centre ``S*h - P + D*((K-1)//2)``,
  clipped to the map. One point in, one point out. Only the windows at the points are read.
  Departure (``position="auto"``, the default): for *strided* convolutions the point moves to
  the window position where the chosen channel contributes most, as the authors' ResNet-101
  code does for its 3×3 convolutions — the centre rule would put every point of a network that
  downsamples by strided convolutions (EfficientNet, MobileNet) on a grid of the total stride.
  ``position="centre"`` is the paper's rule everywhere.
* **max pooling**: the point moves to the argmax of its window (via ``return_indices``, so
  padding, dilation and ``ceil_mode`` are exactly those of the forward pass).
* **global average pooling**: the pooled vector is 1-D for the linear rule that follows; each
  kept channel then goes to the argmax location of its map.
* **residual addition**: the point follows the larger of the two summands at that point.
* **concatenation**: the channel index selects the branch.
* **ReLU, LRN, dropout**: passed through.

Extensions the authors did not cover, made here (each also noted at its rule):

* **batch norm** (and group/instance norm, frozen BN): passed through, as the authors ignore it.
* **any elementwise activation** (ReLU6, hard-swish, SiLU, GELU, sigmoid…): passed through.
* **stochastic depth** (torchvision's EfficientNet, ConvNeXt): the identity in eval mode,
  passed through; **layer norm** (ConvNeXt) passed through like batch norm.
* **permute / transpose** (ConvNeXt's channels-last blocks, ShuffleNet's channel shuffle):
  coordinates permuted back; a **linear layer over the last dimension of a map** is a 1×1
  convolution and gets its rule; a piece of **chunk / split** shifts the point by the pieces
  before it.
* **grouped and depthwise convolution**: the candidate input channels of output channel c are
  those of c's group (``groups`` split by the *input* channels per group, not the output count,
  which is the bug in the public code).
* **dilation and asymmetric/static padding** (TensorFlow "same" padding in EfficientNet's
  ``Conv2dStaticSamePadding``, ``padding="same"``): the window is taken in the padded input;
  padded positions contribute zero; the centre is clipped into the map.
* **average pooling and adaptive pooling** (incl. DenseNet transitions and AlexNet's adaptive
  6×6 pool): treated like max pooling — the argmax of the window (adaptive windows as PyTorch
  defines them, via ``adaptive_max_pool2d(return_indices=True)``).
* **mean/sum over trailing dimensions** (``x.mean((2, 3))``): a global pool, as above.
* **DenseNet concatenation**: the concatenation rule on the growing feature list.
* **explicit padding layers** (``ZeroPad2d``, ``F.pad``…): the point is shifted by the padding
  and clipped into the unpadded map.
* **multiplication by a broadcast gate** (squeeze-excitation in MobileNetV3 / EfficientNet):
  the point passes through to the gated feature map; the gate (N×C×1×1) is not backtracked.
  Products of two full-size maps send the point to both.
* **flatten / view / reshape / squeeze**: they keep the memory order, so a flat index is
  unchanged. **Basic indexing** (``x[:, 0]``, GoogLeNet's ``transform_input``) maps each point
  to the element it was read from.
* **several outputs**: a model returning a tuple is backtracked from its first element.
"""
from __future__ import annotations

import math
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .hooks import MODEL_GATE, restored
from .model import as_model

__all__ = [
    "Fixations", "FixationTracer", "UnsupportedOperationError", "backtrack", "fixations",
    "fixation_attribution", "gaussian_blur", "outlier_mask",
]


class UnsupportedOperationError(NotImplementedError):
    """The backtrack reached an operation that CNN Fixations has no rule for."""


# ----------------------------------------------------------------------------- result
@dataclass
class Fixations:
    """CNN Fixations of one image for one class.

    ``points`` are the fixations after outlier removal (when ``outlier_removal``), ``all_points``
    every input pixel the backtrack reached.
    """

    #: N×2 int64 (row, col) of every distinct input pixel reached by the backtrack
    all_points: np.ndarray
    #: N bool: whether each of ``all_points`` survives outlier removal
    keep: np.ndarray
    #: layer name → M×3 int64 (channel, row, col) at that layer's output, from output to input;
    #: 1-D layers (logits, linear, pooled vectors) have row = col = 0; the last entry is "input"
    trace: "OrderedDict[str, np.ndarray]"
    #: layer name → one sample's output shape (C, h, w) (vectors: (F, 1, 1))
    shapes: dict
    #: class index the backtrack started from, and its label
    target: int
    label: str
    #: (H, W) of the network input, = ``model.prepare(image)[1].shape[:2]``
    image_size: tuple
    #: the target's logit and softmax probability in the forward pass
    score: float = float("nan")
    probability: float = float("nan")
    #: whether ``points``, ``heatmap`` and ``box`` use outlier removal
    outlier_removal: bool = True

    @property
    def points(self) -> np.ndarray:
        """N×2 (row, col) input pixels: the kept fixations (all of them without outlier removal)."""
        return self.all_points[self.keep] if self.outlier_removal else self.all_points

    @property
    def outliers(self) -> np.ndarray:
        """The points outlier removal drops (empty when it is off)."""
        return self.all_points[~self.keep] if self.outlier_removal else self.all_points[:0]

    def with_outlier_removal(self, on: bool = True) -> "Fixations":
        """A copy with outlier removal switched on or off (nothing is recomputed)."""
        return replace(self, outlier_removal=bool(on))

    def mask(self) -> np.ndarray:
        """H×W float32 with 1 at every point."""
        m = np.zeros(self.image_size, np.float32)
        p = self.points
        m[p[:, 0], p[:, 1]] = 1.0
        return m

    def default_sigma(self) -> float:
        """20 px for a 224×224 input, scaled with the input's size (geometric mean of H, W)."""
        h, w = self.image_size
        return 20.0 * math.sqrt(h * w) / 224.0

    def heatmap(self, sigma: float | None = None) -> np.ndarray:
        """H×W float32 in [0, 1]: the point mask blurred by a Gaussian of ``sigma`` pixels
        (default :meth:`default_sigma`), scaled to a maximum of 1 (all zero without points)."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma >= 0:
            raise ValueError(f"sigma must be a number ≥ 0, not {sigma!r}")
        heat = gaussian_blur(self.mask(), sigma)
        top = float(heat.max())
        return (heat / top).astype(np.float32) if top > 0 else heat.astype(np.float32)

    def box(self):
        """``(x0, y0, x1, y1)`` pixel indices of the leftmost, topmost, rightmost and bottommost
        kept points (inclusive); ``None`` when there is no point."""
        p = self.points
        if len(p) == 0:
            return None
        return (int(p[:, 1].min()), int(p[:, 0].min()), int(p[:, 1].max()), int(p[:, 0].max()))

    def layers(self) -> list:
        """Trace layer names, from the class neuron to the input."""
        return list(self.trace)

    def __repr__(self) -> str:
        return (f"Fixations(target={self.target} {self.label!r}, points={len(self.points)} of "
                f"{len(self.all_points)}, layers={len(self.trace)}, image_size={self.image_size})")


# ----------------------------------------------------------------------------- helpers
def outlier_mask(points: np.ndarray, image_size, radius: float = 0.1, fraction: float = 0.05):
    """Authors' outlier removal: keep a point when more than ``fraction`` of all points (itself
    included) lie closer than ``radius`` × the image diagonal to it."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(points)
    if n == 0:
        return np.zeros(0, bool)
    r = radius * math.hypot(*image_size)
    counts = np.zeros(n, np.int64)
    step = max(1, 4_000_000 // n)
    for s in range(0, n, step):
        d2 = ((points[s:s + step, None, :] - points[None, :, :]) ** 2).sum(-1)
        counts[s:s + step] = (d2 < r * r).sum(1)
    return counts > fraction * n


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n×n matrix of a 1-D Gaussian blur with symmetric (scipy 'reflect') borders."""
    radius = int(math.ceil(4.0 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    src = np.arange(n)[:, None] + offsets[None, :]
    period = 2 * n
    src = np.mod(src, period)
    src = np.where(src >= n, period - 1 - src, src)
    mat = np.zeros((n, n))
    np.add.at(mat, (np.repeat(np.arange(n), len(offsets)), src.ravel()),
              np.tile(kernel, n))
    return mat


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H×W array (reflecting borders, truncated at 4σ)."""
    image = np.asarray(image, dtype=np.float64)
    if sigma <= 0:
        return image.copy()
    h, w = image.shape
    return _blur_matrix(h, sigma) @ image @ _blur_matrix(w, sigma).T


def _channels_last(node, bt) -> bool:
    """Whether ``node``'s 4-D value is a map with its channels last: made by
    ``permute(0, 2, 3, 1)``, then only same-shape layers and linear layers over the last
    dimension (ConvNeXt's blocks)."""
    for _ in range(64):
        v = bt.values.get(node)
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or not node.args:
            return False
        if (node.op == "call_method" and node.target in _PERMUTE_METHODS) or (
                node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS):
            return _permute_order(node, 4) == [0, 2, 3, 1]
        linear = (node.op == "call_module" and isinstance(bt.modules.get(node.target), nn.Linear)
                  or node.op == "call_function" and node.target is F.linear)
        if not (linear or _passes(node, bt.modules)):
            return False
        node = node.args[0]
    return False


def _passes(node, modules: dict) -> bool:
    """Whether ``node`` is a same-shape layer the backtrack passes points through."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _PASS_MODULES) or type(m).__name__ in _PASS_MODULE_NAMES
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _permute_order(node, nd: int) -> list:
    """The dimension order of a ``permute`` / ``transpose`` / ``swapaxes`` node: output
    dimension k is input dimension ``order[k]``."""
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if node.target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [int(d) % nd for d in dims]
    a, b = (int(d) % nd for d in rest[:2])  # two dimensions exchanged
    order = list(range(nd))
    order[a], order[b] = order[b], order[a]
    return order


def _ravel(coords, shape) -> torch.Tensor:
    """Flat indices of per-dimension coordinates in ``shape`` (one sample, no batch dim)."""
    flat = torch.zeros_like(coords[0])
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


def _is_split(node) -> bool:
    """Whether ``node`` is ``chunk`` / ``split`` of a tensor (its value: a tuple of pieces)."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in ("chunk", "split"))
        or (node.op == "call_function" and node.target in (torch.chunk, torch.split)))


def _shape3(t: torch.Tensor) -> tuple:
    """One sample's shape padded to 3 dims: N×F → (F, 1, 1), N×C×H×W → (C, H, W)."""
    s = tuple(t.shape[1:])
    if len(s) > 3:
        raise UnsupportedOperationError(f"tensors of {t.dim()} dimensions are not supported")
    return s + (1,) * (3 - len(s))


def _decode(idx: torch.Tensor, shape) -> tuple:
    c_, h_, w_ = shape
    return idx // (h_ * w_), (idx // w_) % h_, idx % w_


def _encode(c, h, w, shape) -> torch.Tensor:
    _, h_, w_ = shape
    return (c * h_ + h) * w_ + w


def _pair(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _pads4(pad) -> tuple:
    """(left, right, top, bottom) from an F.pad/ZeroPad2d padding spec over the last dims."""
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return pad + (0, 0)
    if len(pad) == 4:
        return pad
    raise UnsupportedOperationError(f"padding {pad} over more than the last two dimensions")


# ----------------------------------------------------------------------------- tracing
#: module types that are traced as one node (their rule is below)
_CONV = (nn.Conv2d,)
_POOL = (nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PAD = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
#: same-shape modules passed through (authors: ReLU, LRN, dropout; extension: norms, activations)
_PASS_MODULES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd, nn.LayerNorm,
)
_PASS_MODULE_NAMES = {"FrozenBatchNorm2d", "MemoryEfficientSwish", "Swish"}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)


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
        if isinstance(m, _CONV + _POOL + _ADAPTIVE + _PAD + (nn.Linear,) + _PASS_MODULES
                      + _RESHAPE_MODULES):
            return True
        if type(m).__name__ in _PASS_MODULE_NAMES:
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
    try:
        # exclusive: fx patches nn.Module.__call__ for every thread while it traces
        with MODEL_GATE.exclusive(), restored(module):
            graph = FixationTracer(leaf_modules).trace(module)
    except Exception as exc:  # noqa: BLE001 - explained to the user
        raise UnsupportedOperationError(
            f"CNN Fixations needs to trace {type(module).__name__} with torch.fx, which failed: "
            f"{type(exc).__name__}: {exc}. Pass leaf_modules=[...] (module types or qualified "
            "names) to keep the submodule that does not trace as one node"
        ) from exc
    _GRAPHS[module] = (signature, graph)
    return graph


# ----------------------------------------------------------------------------- forward
def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
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


def _run(graph: fx.Graph, root: nn.Module, x: torch.Tensor) -> tuple[dict, Any]:
    """Evaluate the graph on ``x``; returns (node → value, output value)."""
    values: dict = {}
    modules = dict(root.named_modules())
    load = lambda a: fx.node.map_arg(a, lambda n: values[n])  # noqa: E731
    out = None
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = x
            continue
        if node.op == "get_attr":
            obj = root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            values[node] = obj
            continue
        if node.op == "output":
            out = load(node.args[0])
            break
        args, kwargs = load(node.args), load(node.kwargs)
        module = modules[node.target] if node.op == "call_module" else None
        if _is_inplace(node, module) and args and isinstance(args[0], torch.Tensor):
            # keep the recorded input intact: run the out-of-place twin where there is one
            # (no copy), else work on a copy
            if node.op == "call_module" and type(module) is nn.ReLU:
                values[node] = torch.relu(args[0])
                continue
            if node.op == "call_module" and isinstance(module, nn.Hardtanh):  # incl. ReLU6
                values[node] = F.hardtanh(args[0], module.min_val, module.max_val)
                continue
            if node.op == "call_function" and node.target in _OUT_OF_PLACE:
                values[node] = _OUT_OF_PLACE[node.target](*args, **kwargs)
                continue
            if node.op == "call_function" and "inplace" in kwargs:
                values[node] = node.target(*args, **{**kwargs, "inplace": False})
                continue
            args = (args[0].clone(),) + tuple(args[1:])
        if node.op == "call_module":
            values[node] = module(*args, **kwargs)
        elif node.op == "call_function":
            values[node] = node.target(*args, **kwargs)
        else:  # call_method
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    return values, out


# ----------------------------------------------------------------------------- rules
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu,
    F.leaky_relu, F.mish, F.softplus, F.dropout, F.dropout2d, F.batch_norm, F.layer_norm,
    F.group_norm, F.local_response_norm, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
    torch.tanh, torch.relu_, torch.nn.functional.relu_, torch.clamp, torch.clip,
}
try:  # torchvision's EfficientNet / ConvNeXt blocks: stochastic depth, the identity in eval mode
    from torchvision.ops import stochastic_depth as _stochastic_depth
    _PASS_FUNCTIONS.add(_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
                 "clip", "clip_", "contiguous", "clone", "detach", "to", "float", "type_as",
                 "hardtanh_", "cpu", "cuda"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_CAT = {torch.cat, torch.concat}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}

_CHUNK = 1 << 21  # elements per gathered block (8 MB of float32)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod and mod != '_operator' else ''}{name}"
    return f"{node.op} {node.target}"


class _Backtrack:
    """Reverse walk over the graph; ``points[node]`` is a 1-D LongTensor of flat indices."""

    def __init__(self, graph: fx.Graph, root: nn.Module, values: dict, position: str = "auto"):
        self.position = position
        self.graph = graph
        self.root = root
        self.values = values
        self.modules = dict(root.named_modules())
        self.points: dict = {}

    # ---------------------------------------------------------------- plumbing
    def _is_flow(self, node) -> bool:
        """Whether points may be sent to ``node``: a batch-carrying tensor, not a parameter."""
        if not isinstance(node, fx.Node) or node.op == "get_attr":
            return False
        v = self.values.get(node)
        return isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1

    def send(self, node, idx: torch.Tensor) -> None:
        if not self._is_flow(node) or idx.numel() == 0:
            return
        prev = self.points.get(node)
        self.points[node] = idx if prev is None else torch.cat([prev, idx])

    def take(self, node) -> torch.Tensor | None:
        idx = self.points.pop(node, None)
        if idx is None:
            return None
        return torch.unique(idx)

    def unsupported(self, node, why: str = "") -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"CNN Fixations has no backtracking rule for {_describe(node)} (graph node "
            f"{node.name!r}){': ' + why if why else ''}. Supported: linear, Conv2d, max/average/"
            "adaptive pooling, mean over spatial dims, flatten/view/reshape, permute/transpose, add, "
            "multiply by a gate, cat, padding, batch/layer norm, dropout, LRN and elementwise "
            "activations"
        )

    # ---------------------------------------------------------------- dispatch
    def step(self, node: fx.Node, idx: torch.Tensor) -> None:
        v = self.values
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Linear):
                return self.linear(node, m.weight, idx)
            if isinstance(m, nn.modules.conv._ConvNd):
                if not isinstance(m, nn.Conv2d):
                    raise self.unsupported(node, "only 2-D convolutions are supported")
                return self.conv(node, m, idx)
            if isinstance(m, _POOL):
                return self.pool(node, m, idx)
            if isinstance(m, _ADAPTIVE):
                return self.adaptive(node, idx)
            if isinstance(m, _PAD):
                return self.pad(node, _pads4(m.padding), idx)
            if isinstance(m, _RESHAPE_MODULES):
                return self.send(first, idx)
            if isinstance(m, _PASS_MODULES) or type(m).__name__ in _PASS_MODULE_NAMES:
                return self.passthrough(node, idx)
            raise self.unsupported(node, f"{type(m).__name__} is not a known layer type")
        if node.op == "call_function":
            t = node.target
            if t in _PASS_FUNCTIONS:
                return self.passthrough(node, idx)
            if t in _RESHAPE_FUNCTIONS:
                return self.reshape(node, idx)
            if t in _PERMUTE_FUNCTIONS:
                return self.permute(node, idx)
            if t in _ADD:
                return self.add(node, idx, negate_second=t in (operator.sub, operator.isub, torch.sub))
            if t in _MUL:
                return self.mul(node, idx, divide=t in (operator.truediv, operator.itruediv, torch.div))
            if t in _CAT:
                return self.cat(node, idx)
            if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                return self.adaptive(node, idx)
            if t in (F.max_pool2d, F.avg_pool2d):
                return self.pool_functional(node, idx)
            if t is F.pad:
                pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
                return self.pad(node, _pads4(pad), idx)
            if t is F.linear:
                w = v[node.args[1] if len(node.args) > 1 else node.kwargs["weight"]]
                return self.linear(node, w, idx)
            if t in _REDUCE_FUNCTIONS:
                return self.reduce(node, idx)
            if t is operator.getitem and isinstance(v.get(first), torch.Tensor):
                return self.getitem(node, idx)
            if t is operator.getitem and _is_split(first):
                return self.piece(node, idx)
            raise self.unsupported(node)
        if node.op == "call_method":
            t = node.target
            if t in _PASS_METHODS:
                return self.passthrough(node, idx)
            if t in _RESHAPE_METHODS:
                return self.reshape(node, idx)
            if t in _PERMUTE_METHODS:
                return self.permute(node, idx)
            if t in ("add", "add_", "sub", "sub_"):
                return self.add(node, idx, negate_second=t.startswith("sub"))
            if t in ("mul", "mul_", "div", "div_"):
                return self.mul(node, idx, divide=t.startswith("div"))
            if t in _REDUCE_METHODS:
                return self.reduce(node, idx)
            raise self.unsupported(node)
        raise self.unsupported(node)

    # ---------------------------------------------------------------- the rules
    def passthrough(self, node, idx):
        """Same-shape layers (ReLU, LRN, dropout; extension: batch norm, any activation)."""
        src = node.args[0]
        if self._is_flow(src) and self.values[src].shape != self.values[node].shape:
            raise self.unsupported(node, "it changes the tensor's shape")
        self.send(src, idx)

    def reshape(self, node, idx):
        """Flatten/view/reshape/squeeze keep the memory order: flat indices are unchanged."""
        src = node.args[0]
        if self._is_flow(src):
            a, b = self.values[src], self.values[node]
            if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
                raise self.unsupported(node, "it mixes the batch dimension")
        self.send(src, idx)

    def permute(self, node, idx):
        """Permuted or transposed dimensions (extension; ConvNeXt's channels-last blocks): each
        element keeps its value, at permuted coordinates. The batch dimension must stay first."""
        src = node.args[0]
        x, out = self.values[src], self.values[node]
        nd = x.dim()
        order = _permute_order(node, nd)
        if len(order) != nd or order[0] != 0:
            raise self.unsupported(node, "it moves the batch dimension")
        coords = torch.unravel_index(idx, tuple(out.shape[1:]))  # output dim k = input dim order[k]
        ins = [None] * (nd - 1)
        for k in range(1, nd):
            ins[order[k] - 1] = coords[k - 1]
        self.send(src, _ravel(ins, x.shape[1:]))

    def linear(self, node, weight: torch.Tensor, idx):
        """Authors' linear rules; the mode is chosen by what the input was before flattening.

        *Vector input* (the previous layer is linear or a global pool): keep every input j with
        ``a_j W_ij > 0`` for some kept neuron i. *Flattened map* (VGG/AlexNet fc6): per neuron
        the single argmax of ``a_j W_ij``. Only the kept neurons' weight rows are read.
        *A map with channels last* (extension; ConvNeXt's pointwise layers ``Linear`` over the
        last dimension): a 1×1 convolution, so the convolution rule — at the same position, the
        input channel whose contribution ``a_j W_ij`` is largest.
        """
        src = node.args[0]
        a = self.values[src]
        if a.dim() > 2:
            a = a[0].reshape(-1, a.shape[-1])  # positions × channels
            cin, cout = a.shape[1], weight.shape[0]
            pos, c = idx // cout, idx % cout
            upos, inv = torch.unique(pos, return_inverse=True)
            win = a.index_select(0, upos).index_select(0, inv)  # M×cin
            score = win.mul_(weight.detach().index_select(0, c))
            return self.send(src, pos * cin + score.argmax(1))
        if a.dim() != 2:
            raise self.unsupported(node, f"linear layers on {a.dim()}-D input are not supported")
        a = a[0]
        w = weight.detach()
        if self._flattened_map(src):
            return self.send(src, self._argmax_rows(w, a, idx))
        hi = torch.full_like(a, -math.inf)
        lo = torch.full_like(a, math.inf)
        step = max(1, _CHUNK // a.numel())
        for s in range(0, idx.numel(), step):
            rows = w.index_select(0, idx[s:s + step])
            hi = torch.maximum(hi, rows.amax(0))
            lo = torch.minimum(lo, rows.amin(0))
        keep = ((a > 0) & (hi > 0)) | ((a < 0) & (lo < 0))
        self.send(src, keep.nonzero().flatten())

    @staticmethod
    def _argmax_rows(w: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``argmax_j a_j * w[i, j]`` for each row i in ``idx``, reading only those rows (in
        blocks of a few MB) and only the columns where ``a`` is non-zero (post-ReLU maps are
        sparse): a zero input contributes 0, so it can only win when every non-zero input
        contributes less than 0 — then the first zero input is the argmax, as over all j."""
        nz = a.nonzero().flatten()
        if nz.numel() == 0:
            return torch.zeros_like(idx)
        dense = nz.numel() * 4 > a.numel() * 3
        cols = None if dense else nz
        a_sub = a if dense else a[nz]
        best = torch.empty_like(idx)
        top = torch.empty(idx.numel(), dtype=a.dtype, device=a.device)
        step = max(1, _CHUNK // a_sub.numel())
        for s in range(0, idx.numel(), step):
            rows = w.index_select(0, idx[s:s + step])
            if cols is not None:
                rows = rows.index_select(1, cols)
            val, arg = rows.mul_(a_sub).max(1)
            top[s:s + step] = val
            best[s:s + step] = arg if cols is None else cols[arg]
        if not dense:
            zeros = (a == 0).nonzero().flatten()
            losing = top < 0
            if zeros.numel() and bool(losing.any()):
                best[losing] = zeros[0]
        return best

    def _flattened_map(self, node) -> bool:
        """Whether ``node`` is (through pass-through layers) a flattened map with h·w > 1."""
        for _ in range(64):
            if not isinstance(node, fx.Node) or not node.args:
                return False
            src = node.args[0]
            v = self.values.get(src)
            if not isinstance(v, torch.Tensor):
                return False
            is_reshape = (
                (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
                or (node.op == "call_method" and node.target in _RESHAPE_METHODS)
                or (node.op == "call_module" and isinstance(self.modules[node.target], _RESHAPE_MODULES))
            )
            if is_reshape:
                return v.dim() >= 3 and math.prod(v.shape[2:]) > 1
            same = v.shape == self.values[node].shape
            passes = _passes(node, self.modules)
            if not (same and passes):
                return False
            node = src
        return False

    def conv(self, node, m: nn.Conv2d, idx):
        """Authors' convolution rule, for any stride, padding, dilation and groups.

        Extensions: grouped/depthwise convolutions score only the input channels of the
        output channel's group; TensorFlow-style static padding (a ``static_padding`` submodule,
        EfficientNet) and ``padding="same"`` pad the input before the window is taken (padded
        positions contribute zero); the new position is the window centre
        ``S*h - P + D*((K-1)//2)`` clipped into the map.

        ``position="argmax"`` moves the point instead to the window position where the chosen
        input channel contributes most (``x[c', p] * W[c, c', p]``), as the authors' ResNet-101
        code does for its 3×3 convolutions (with the activation instead of the contribution).
        ``"auto"`` (default) uses the centre for stride-1 convolutions and the argmax for
        strided ones — there the centre would put every point of a stride-S layer on a grid of
        step S (five stride-2 convolutions in EfficientNet: a 32-px grid of at most 49 pixels).
        """
        src = node.args[0]
        x = self.values[src][0]
        out_shape = _shape3(self.values[node])
        cin, h_in, w_in = x.shape
        w = m.weight.detach()
        cout, cin_g, kh, kw = w.shape
        sh, sw = _pair(m.stride)
        dh, dw = _pair(m.dilation)
        if isinstance(m.padding, str):  # "same"/"valid": the pads nn.Conv2d computed
            left, right, top, bottom = (tuple(m._reversed_padding_repeated_twice)
                                        if m.padding == "same" else (0, 0, 0, 0))
        else:
            ph, pw = _pair(m.padding)
            left, right, top, bottom = pw, pw, ph, ph
        static = getattr(m, "static_padding", None)
        if isinstance(static, nn.Module) and hasattr(static, "padding"):
            sl, sr, st, sb = _pads4(static.padding)
            left, right, top, bottom = left + sl, right + sr, top + st, bottom + sb
        elif type(m).forward is not nn.Conv2d.forward and static is None:
            # dynamic "same" padding computed in forward (Conv2dDynamicSamePadding)
            oh, ow = out_shape[1:]
            pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - h_in, 0)
            pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - w_in, 0)
            left, right, top, bottom = pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2
        if (kh, kw, sh, sw, left, right, top, bottom, m.groups) == (1, 1, 1, 1, 0, 0, 0, 0, 1):
            return self._pointwise(src, w, idx, x)
        off_t = off_l = 0
        if m.padding_mode != "zeros" and (left or right or top or bottom):
            x = F.pad(x, (left, right, top, bottom), mode=m.padding_mode)
            off_t, off_l, left, right, top, bottom = top, left, 0, 0, 0, 0
        hx, wx = x.shape[-2:]
        c, i, j = _decode(idx, out_shape)
        group = c // (cout // m.groups)
        # window rows/cols in unpadded input coordinates; padded positions contribute zero
        rows = i[:, None] * sh - top + torch.arange(kh, device=x.device) * dh  # M×kh
        cols = j[:, None] * sw - left + torch.arange(kw, device=x.device) * dw  # M×kw
        valid = (((rows >= 0) & (rows < hx))[:, :, None]
                 & ((cols >= 0) & (cols < wx))[:, None, :])  # M×kh×kw
        rows_c, cols_c = rows.clamp(0, hx - 1), cols.clamp(0, wx - 1)
        chan_off = torch.arange(cin_g, device=x.device)
        xf = x.reshape(x.shape[0], -1)
        ones_k = torch.ones(kh * kw, dtype=x.dtype, device=x.device)
        best = torch.empty_like(c)
        ni = (i * sh - top + dh * ((kh - 1) // 2)).clamp(0, hx - 1)
        nj = (j * sw - left + dw * ((kw - 1) // 2)).clamp(0, wx - 1)
        use_argmax = self.position == "argmax" or (self.position == "auto" and (sh > 1 or sw > 1))
        if use_argmax:
            ni, nj = ni.clone(), nj.clone()
        step = max(1, _CHUNK // (cin_g * kh * kw))
        for s in range(0, idx.numel(), step):
            sl_ = slice(s, s + step)
            pos = (rows_c[sl_, :, None] * wx + cols_c[sl_, None, :]).reshape(-1, kh * kw)
            mm, kk = pos.shape
            ok = valid[sl_].reshape(mm, kk)
            wsel = w.reshape(cout, cin_g, kk).index_select(0, c[sl_])  # M×cin_g×K
            if cin_g == 1:  # depthwise: one candidate channel
                win = xf[group[sl_, None], pos][:, None, :]  # M×1×K
            elif m.groups == 1:  # read only the window columns, as M×K×cin (contiguous)
                upos, inv = torch.unique(pos, return_inverse=True)
                xsub = xf.index_select(1, upos).t().contiguous()  # (distinct positions)×cin
                win = xsub.index_select(0, inv.reshape(-1)).view(mm, kk, cin).transpose(1, 2)
            else:
                chans = group[sl_, None] * cin_g + chan_off  # M×cin_g
                win = xf[chans[:, :, None], pos[:, None, :]]  # M×cin_g×K
            # M×cin_g×K, contiguous: each input's contribution to the point
            contrib = torch.mul(wsel, win, out=torch.empty_like(wsel))
            if not bool(ok.all()):  # padded positions contribute zero
                contrib = contrib * ok[:, None, :]
            if cin_g == 1:
                local = torch.zeros_like(c[sl_])
            elif kk == 1:
                local = contrib[:, :, 0].argmax(1)
            else:  # sum over the window as a matrix-vector product (fast for small K)
                local = (contrib.reshape(-1, kk) @ ones_k).view(mm, cin_g).argmax(1)
            best[sl_] = group[sl_] * cin_g + local
            if use_argmax:  # the chosen channel's most contributing position in the window
                ar = torch.arange(mm, device=x.device)
                pick = contrib[ar, local].masked_fill(~ok, -math.inf).argmax(1)
                ni[sl_] = rows_c[sl_][ar, pick // kw]
                nj[sl_] = cols_c[sl_][ar, pick % kw]
        ni = (ni - off_t).clamp(0, h_in - 1)
        nj = (nj - off_l).clamp(0, w_in - 1)
        self.send(src, _encode(best, ni, nj, (cin, h_in, w_in)))

    def _pointwise(self, src, w, idx, x):
        """The convolution rule for a 1×1, stride-1, unpadded, ungrouped convolution (most
        layers of bottleneck networks), with a few tensor operations: the window is the point
        itself, so only the channel changes."""
        cin, h_in, w_in = x.shape
        hw = h_in * w_in
        c, pos = idx // hw, idx % hw
        upos, inv = torch.unique(pos, return_inverse=True)
        win = x.reshape(cin, hw).index_select(1, upos).t().contiguous().index_select(0, inv)
        score = win.mul_(w.reshape(w.shape[0], cin).index_select(0, c))  # M×cin
        self.send(src, score.argmax(1) * hw + pos)

    def _window_argmax(self, node, idx, src, pooled_indices, pads=(0, 0, 0, 0)):
        """Move points to the input positions that ``pooled_indices`` (C×oh×ow, flat h*W+w in
        the input, or in the input padded by ``pads`` = (left, right, top, bottom)) names."""
        cin, h_in, w_in = _shape3(self.values[src])
        c, _, _ = _decode(idx, _shape3(self.values[node]))
        flat = pooled_indices.reshape(-1)[idx]
        if any(pads):  # indices are in the padded map: shift back and clip
            wp = w_in + pads[0] + pads[1]
            r = (flat // wp - pads[2]).clamp(0, h_in - 1)
            q = (flat % wp - pads[0]).clamp(0, w_in - 1)
            flat = r * w_in + q
        self.send(src, c * (h_in * w_in) + flat)

    def pool(self, node, m, idx):
        """Max pooling (authors); average pooling treated like max pooling (extension)."""
        src = node.args[0]
        x = self.values[src]
        static = getattr(m, "static_padding", None)
        pads = (0, 0, 0, 0)
        if isinstance(static, nn.Module) and hasattr(static, "padding"):
            pads = _pads4(static.padding)
            x = F.pad(x, pads)
        dilation = getattr(m, "dilation", 1)
        _, ind = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, dilation, m.ceil_mode,
                              return_indices=True)
        self._window_argmax(node, idx, src, ind[0], pads)

    def pool_functional(self, node, idx):
        """``F.max_pool2d`` / ``F.avg_pool2d`` with their own arguments (as in :meth:`pool`)."""
        src = node.args[0]
        names = ["input", "kernel_size", "stride", "padding"]
        names += ["dilation", "ceil_mode"] if node.target is F.max_pool2d else ["ceil_mode"]
        bound = dict(zip(names, node.args))
        bound.update({k: val for k, val in node.kwargs.items() if k in names})
        k = bound["kernel_size"]
        stride = bound.get("stride") or k
        _, ind = F.max_pool2d(self.values[src], k, stride, bound.get("padding", 0),
                              bound.get("dilation", 1), bound.get("ceil_mode", False),
                              return_indices=True)
        self._window_argmax(node, idx, src, ind[0])

    def adaptive(self, node, idx):
        """Adaptive (incl. global) average/max pooling: argmax of each adaptive window
        (authors' GAP rule; average treated like max, an extension for non-global output)."""
        src = node.args[0]
        out = self.values[node]
        _, ind = F.adaptive_max_pool2d(self.values[src], tuple(out.shape[-2:]), return_indices=True)
        self._window_argmax(node, idx, src, ind[0])

    def reduce(self, node, idx):
        """``mean``/``sum``/``amax`` over trailing dims: a global pool — argmax over them."""
        src = node.args[0]
        x = self.values[src]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise self.unsupported(node, "a reduction over the whole tensor")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % x.dim() for d in dims)
        if 0 in dims or dims != list(range(x.dim() - len(dims), x.dim())):
            raise self.unsupported(node, "only reductions over the trailing (spatial) dims")
        lead = math.prod(x.shape[1:x.dim() - len(dims)])
        flat = x[0].reshape(lead, -1)
        arg = flat.argmax(1)
        self.send(src, idx * flat.shape[1] + arg[idx])

    def pad(self, node, pads, idx):
        """Explicit padding (extension): shift by the padding, clip into the unpadded map."""
        src = node.args[0]
        left, _, top, _ = pads
        shape_in = _shape3(self.values[src])
        c, i, j = _decode(idx, _shape3(self.values[node]))
        i = (i - top).clamp(0, shape_in[1] - 1)
        j = (j - left).clamp(0, shape_in[2] - 1)
        self.send(src, _encode(c, i, j, shape_in))

    def _operands(self, node):
        args = list(node.args[:2])
        if node.op == "call_function" and node.target in (torch.add, torch.sub, torch.mul, torch.div):
            args = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
        return args

    def add(self, node, idx, negate_second=False):
        """Residual addition: each point follows the larger summand there (authors).
        A scalar or broadcast operand (a bias) is not followed."""
        out = self.values[node]
        args = self._operands(node)
        full = [k for k, a in enumerate(args) if self._is_flow(a) and self.values[a].shape == out.shape]
        if len(full) == 0:
            if any(self._is_flow(a) for a in args):
                raise self.unsupported(node, "a broadcast addition of feature maps")
            return
        if len(full) == 1:
            return self.send(args[full[0]], idx)
        a = self.values[args[0]][0].reshape(-1)[idx]
        b = self.values[args[1]][0].reshape(-1)[idx]
        if negate_second:
            b = -b
        first = a >= b
        self.send(args[0], idx[first])
        self.send(args[1], idx[~first])

    def mul(self, node, idx, divide=False):
        """Multiplication (extension): a broadcast gate (squeeze-excitation, N×C×1×1) passes
        the point through to the gated map; full-size factors all receive it."""
        out = self.values[node]
        args = self._operands(node)[:1] if divide else self._operands(node)
        full = [a for a in args if self._is_flow(a) and self.values[a].shape == out.shape]
        if not full and any(self._is_flow(a) for a in args):
            raise self.unsupported(node, "a broadcast product with no full-size factor")
        for a in full:
            self.send(a, idx)

    def getitem(self, node, idx):
        """Basic indexing ``x[:, 1]``, ``x[:, 0:3:2, ...]`` (extension; e.g. GoogLeNet's and
        Inception's ``transform_input``): each output coordinate maps to its input coordinate."""
        src, key = node.args[0], node.args[1]
        x = self.values[src]
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            k = key.index(Ellipsis)
            key = key[:k] + (slice(None),) * (x.dim() - len(key) + 1) + key[k + 1:]
        key = key + (slice(None),) * (x.dim() - len(key))
        if len(key) != x.dim() or key[0] != slice(None) or not all(
                isinstance(k, (int, slice)) for k in key):
            raise self.unsupported(node, f"indexing with {node.args[1]!r}")
        out_shape = tuple(self.values[node].shape[1:])
        coords = list(torch.unravel_index(idx, out_shape)) if out_shape else []
        flat = torch.zeros_like(idx)
        o = 0
        for k, n in zip(key[1:], x.shape[1:]):
            if isinstance(k, int):
                cc = torch.full_like(idx, k % n)
            else:
                start, _, step = k.indices(n)
                cc = start + coords[o] * step
                o += 1
            flat = flat * n + cc
        self.send(src, flat)

    def piece(self, node, idx):
        """One piece of ``chunk`` / ``split`` (extension; ShuffleNet's two branches): the point
        moves by the sizes of the pieces before it along the split dimension."""
        split, k = node.args[0], node.args[1]
        src = split.args[0]
        x = self.values[src]
        pieces = self.values[split]
        dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
        dim = int(dim) % x.dim()
        if dim == 0:
            raise self.unsupported(node, "a split of the batch dimension")
        if not isinstance(k, int):
            raise self.unsupported(node, f"a piece chosen by {k!r}")
        k = k % len(pieces)
        offset = sum(p.shape[dim] for p in pieces[:k])
        coords = list(torch.unravel_index(idx, tuple(pieces[k].shape[1:])))
        coords[dim - 1] = coords[dim - 1] + offset
        self.send(src, _ravel(coords, x.shape[1:]))

    def cat(self, node, idx):
        """Concatenation (Inception, DenseNet): the index along the concatenated dim selects
        the branch."""
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = self.values[node]
        dim = dim % out.dim()
        if dim == 0:
            raise self.unsupported(node, "concatenation along the batch dimension")
        shape = tuple(out.shape[1:])
        coords = list(torch.unravel_index(idx, shape))
        along = coords[dim - 1]
        sizes = [self.values[t].shape[dim] if isinstance(t, fx.Node) else 0 for t in tensors]
        ends = torch.tensor(np.cumsum(sizes), device=idx.device)
        branch = torch.searchsorted(ends, along.contiguous(), right=True)
        starts = ends - torch.tensor(sizes, device=idx.device)
        for k, t in enumerate(tensors):
            sel = branch == k
            if not sel.any():
                continue
            sub = [cc[sel] for cc in coords]
            sub[dim - 1] = sub[dim - 1] - starts[k]
            tshape = tuple(self.values[t].shape[1:])
            flat = torch.zeros_like(sub[0])
            for cc, n in zip(sub, tshape):
                flat = flat * n + cc
            self.send(t, flat)


# ----------------------------------------------------------------------------- API
def _trace_name(node: fx.Node, modules: dict) -> str | None:
    """Name under which a node's points appear in ``Fixations.trace`` (None: not shown)."""
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.Linear, nn.Conv2d) + _POOL + _ADAPTIVE):
            return str(node.target)
        return None
    if node.op == "call_function" and node.target in (
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d, F.linear,
    ):
        return node.name
    if node.op in ("call_function", "call_method") and node.target in (
        _REDUCE_FUNCTIONS | _REDUCE_METHODS
    ):
        return node.name
    return None


def fixations(
    model,
    image,
    target=None,
    *,
    outlier_removal: bool = True,
    leaf_modules: Sequence = (),
    position: str = "auto",
    progress: bool = False,
) -> Fixations:
    """CNN Fixations of ``image`` for class ``target`` (None: the top-1 prediction).

    ``model`` is a ``cw.Model`` (or a bare ``nn.Module``, wrapped with ImageNet defaults).
    Returns a :class:`Fixations` with the input points, the per-layer trace (output → input),
    ``heatmap(sigma)`` and ``box()``. ``outlier_removal`` sets the default of the result (it can
    be switched later with ``with_outlier_removal``). ``leaf_modules`` (types or qualified
    names) keeps submodules that ``torch.fx`` cannot trace as single nodes; they then need a
    rule (a known layer type) if points reach them. ``position`` picks where a convolution
    moves a point: ``"centre"`` of the window (the authors' rule), ``"argmax"`` of the chosen
    channel's contribution in the window, or ``"auto"`` (centre for stride 1, argmax for
    strided convolutions; see ``_Backtrack.conv``). ``progress`` shows a progress bar.
    Raises :class:`UnsupportedOperationError` naming the operation when the backtrack reaches
    one without a rule. A model that returns a tuple is backtracked from its first element.
    """
    model = as_model(model, "cw.fixations")
    x, _ = model.prepare(image)
    tgt = None if target is None else model.target_index(target)
    result = backtrack(model.module, x, tgt, position=position, leaf_modules=leaf_modules,
                       progress=progress, outlier_removal=outlier_removal)
    result.label = model.label(result.target)
    return result


def backtrack(
    module: nn.Module,
    x: torch.Tensor,
    target: int | None = None,
    *,
    position: str = "auto",
    leaf_modules: Sequence = (),
    progress: bool = False,
    outlier_removal: bool = True,
) -> Fixations:
    """CNN Fixations of a prepared input ``x`` (1×C×H×W, or 1×F for a vector network) for the
    class index ``target`` (None: the top-1 score); the engine behind :func:`fixations`.

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
        values, out = _run(graph, module, x)
    out_node = next(n for n in graph.nodes if n.op == "output")
    logits_node = out_node.args[0]
    while isinstance(logits_node, (tuple, list)) and logits_node:
        logits_node = logits_node[0]
    if not isinstance(logits_node, fx.Node) or not isinstance(values.get(logits_node), torch.Tensor):
        raise UnsupportedOperationError(
            "CNN Fixations backtracks from a tensor of class scores; the model's output is "
            f"{type(out).__name__}"
        )
    logits = values[logits_node]
    if logits.dim() != 2:
        raise ValueError(f"the model returned scores of shape {tuple(logits.shape)}, not N×K")
    tgt = int(logits[0].argmax()) if target is None else int(target)
    if not 0 <= tgt < logits.shape[1]:
        raise ValueError(f"target {tgt} is out of range for {logits.shape[1]} classes")

    bt = _Backtrack(graph, module, values, position)
    bt.points[logits_node] = torch.tensor([tgt], device=logits.device)
    trace: "OrderedDict[str, np.ndarray]" = OrderedDict()
    shapes: dict = {}
    trace_nodes = list(reversed(graph.nodes))
    iterator = trace_nodes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(trace_nodes, desc="CNN Fixations", leave=False)
    input_idx = None
    with torch.no_grad():
        for node in iterator:
            if node.op in ("output", "get_attr"):
                continue
            idx = bt.take(node)
            if idx is None:
                continue
            name = _trace_name(node, bt.modules) if node is not logits_node else (
                _trace_name(node, bt.modules) or node.name)
            if name is not None:
                shape = _shape3(values[node])
                if name in trace:  # a module called twice: keep both
                    k = 2
                    while f"{name}#{k}" in trace:
                        k += 1
                    name = f"{name}#{k}"
                if _channels_last(node, bt):  # N×H×W×C (ConvNeXt's block): record (c, h, w)
                    i, j, c = _decode(idx, shape)
                    shape = (shape[2], shape[0], shape[1])
                else:
                    c, i, j = _decode(idx, shape)
                trace[name] = torch.stack([c, i, j], 1).cpu().numpy()
                shapes[name] = shape
            if node.op == "placeholder":
                input_idx = idx
                continue
            bt.step(node, idx)
    h, w = x.shape[-2:] if x.dim() == 4 else (1, 1)
    if input_idx is None:
        pts = np.zeros((0, 2), np.int64)
    else:
        _, i, j = _decode(input_idx, _shape3(x))
        pts = torch.unique(torch.stack([i, j], 1), dim=0).cpu().numpy().astype(np.int64)
    probs = logits[0].float().softmax(-1)
    return Fixations(
        all_points=pts,
        keep=outlier_mask(pts, (h, w)),
        trace=trace,
        shapes=shapes,
        target=tgt,
        label=f"class {tgt}",
        image_size=(int(h), int(w)),
        score=float(logits[0, tgt]),
        probability=float(probs[tgt]),
        outlier_removal=bool(outlier_removal),
    )


def fixation_attribution(model, image, target=None, layer=None, sigma=None,
                         outlier_removal: bool = True):
    """CNN Fixations as an attribution method: ``(map H×W float32, raw)``.

    ``map`` is the fixation heatmap (Gaussian blur of the kept points, max 1); ``raw`` is the
    H×W float32 point mask before blurring. ``layer`` is accepted for a uniform signature and
    ignored (the backtrack always runs from the class neuron to the pixels).
    """
    fx_ = fixations(model, image, target, outlier_removal=outlier_removal)
    return fx_.heatmap(sigma).astype(np.float32), fx_.mask()
