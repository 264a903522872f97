"""The speed behind the attribution primitives.

Attribution methods ask their context (:class:`.attribution.core.Context`) for a few things:
the class scores of a batch, the sum of input gradients over many inputs, the scores of the
input under Score-CAM's masks. The context asks this module, which runs them on a *twin* of
the network where one may run and on the network itself everywhere else. Nothing outside this
module sees the twin.

The twin (:func:`twin`) is a ``torch.fx`` graph module that shares the network's modules and
computes the same function (to float rounding) faster, with these tricks — each listed in
:data:`TRICKS`, and each can be switched off (:data:`ENABLED`) to measure what it saves
(``benchmarks/attribution.py --ab TRICK``; the README's table has the numbers):

``fold``
    An eval-mode ``BatchNorm`` right after a convolution is an affine map per channel, so
    ``bn(conv(x)) = conv'(x)`` with ``w' = w · s`` and ``b' = (b − μ) · s + β`` where
    ``s = γ / √(σ² + ε)``: one pass over each activation fewer, forward and backward.
``same_pad``
    A convolution subclass that zero-pads its input symmetrically before a plain convolution
    (EfficientNet's static "same" padding) becomes a plain convolution that pads as it goes,
    instead of copying each input into a padded tensor first.
``pack``
    Plain convolutions, with the ReLU / ReLU6 right after them, run as oneDNN's fused
    convolution with the weight reordered into oneDNN's layout once (:class:`Packed`) instead
    of at every call.
``channels_last``
    Batches of several images, and folded weights, are laid out channels-last, the layout
    oneDNN's CPU convolutions run fastest on.
``head``
    When the network's input goes into one convolution and nowhere else, that layer is affine
    in the input, and a sum of input gradients over many inputs (SmoothGrad, Integrated
    Gradients) is the layer's transpose applied once to the sum of the gradients at its output
    (:class:`Head`): its backward pass runs once per call instead of once per input.
``suffix``
    Many copies of one input that differ only from one layer on (Ablation-CAM's copies, each
    with one channel zeroed) share everything before that layer: it runs once, and only the
    rest of the network runs on the copies (:func:`scores_from_layer`). The network's own
    modules run, unfolded.
``incremental``
    Occluded copies of an image are scored from the image's stored activations, each layer
    computed only where the copy differs from the image (:mod:`.incremental`, Krypton); with
    ``fold`` on, the batch norms there are folded into their convolutions too.

The user's hooks are part of the network: the twin never runs while a hook that fires on this
thread is registered on any module of the network, at any depth, or for every module
(:func:`..hooks.hooked`; hooks that :func:`..hooks.this_thread` binds to another thread do not
count), and such a network is never traced. Nor does it run in training mode, for a network
``torch.fx`` cannot trace, or where no trick applies.

The twin is cached per network and set of enabled tricks, and refolded when a folded weight or
statistic changes: an in-place update (optimiser step, ``load_state_dict``, ``nn.init``) bumps
the tensor's version and assigning ``.data`` replaces its storage, both seen at the next call;
an in-place change made *through* ``.data`` (``p.data.mul_(2)``) is invisible to both — call
:func:`forget` after one. It is rebuilt when modules are replaced.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .cache import weights_state
from .guard import guard
from .hooks import hooked
from .relu_rules import backward_rule, watching

#: the speed tricks of the twin (see the module docstring)
TRICKS = ("fold", "same_pad", "pack", "channels_last", "head", "suffix", "incremental")
#: the tricks in use: all but those listed in the environment variable
#: ``CNNWIDGETS_TRICKS_OFF`` (comma-separated) at import; benchmarks switch them here
ENABLED = set(TRICKS) - set(os.environ.get("CNNWIDGETS_TRICKS_OFF", "").split(","))

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ------------------------------------------------------------------ the primitives
def logits(model, batch: torch.Tensor):
    """The output (class scores N×K, a dense map…) of a prepared batch for ``model`` (a
    ``cw.Model``), graph kept when gradients are enabled: on the twin where it may run."""
    return _forward(model, twin(model.module), batch)


def input_grad_sum(model, target, parts, like: torch.Tensor,
                   check: Callable[[], None] | None = None) -> torch.Tensor:
    """``Σᵢ wᵢ ∂score/∂xᵢ`` (C×H×W) of the ``target``'s score (a :class:`.targets.Resolved`)
    over the inputs ``xᵢ`` of
    ``parts``, an iterable of ``(batch N×C×H×W, weights N or None)`` (``None``: every weight
    1). ``like``: an input (1×C×H×W), for the shape of an empty sum. ``check()`` runs between
    each forward and its backward pass (a cancellation check)."""
    check = check or (lambda: None)
    net = twin(model.module)
    head = _head_of(net) if "head" in ENABLED else None
    total = None
    for batch, weights in parts:
        if head is None:
            xb = batch.detach().requires_grad_(True)
            with torch.enable_grad():
                s = target.score(_forward(model, net, xb))
                check()
                (g,) = torch.autograd.grad(s.sum(), xb)
            part = batch_sum(g, weights)
            total = part if total is None else total + part
            continue
        with torch.enable_grad(), head.capture() as box:
            s = target.score(_forward(model, net, batch.detach()))
            if len(box) != 1:  # pragma: no cover - a traced graph runs each node once
                raise RuntimeError(f"the network's first layer ran {len(box)} times in one "
                                   "forward pass; expected once")
            check()
            (g,) = torch.autograd.grad(s.sum(), box[0].value)
        total = head.add(total, box[0], g, weights)
    if total is None:
        return torch.zeros_like(like[0])
    return (total if head is None else head.transpose(total, like.shape))[0]


def masked_scores(model, target, x: torch.Tensor, maps: torch.Tensor, chunks) -> torch.Tensor:
    """Score-CAM's scores (n,): for each map ``m`` of ``maps`` (n×h×w), the ``target``'s score
    for ``x ⊙ s(up(m))``, where ``up`` upsamples to ``x``'s size (bilinear, corners aligned)
    and ``s`` scales to [0, 1] by ``(v − min) / (max − min + 1e-8)``. ``chunks``: the
    ``(start, stop)`` ranges of maps scored together, in order."""
    net = twin(model.module)
    scores = x.new_empty(maps.shape[0])
    with torch.no_grad():
        for lo, hi in chunks:
            up = upsample_masks(maps[lo:hi], x.shape[-2:])
            low = up.amin(dim=(1, 2), keepdim=True)
            high = up.amax(dim=(1, 2), keepdim=True)
            masks = (up - low) / (high - low + 1e-8)
            scores[lo:hi] = target.score(_forward(model, net, x * masks[:, None]))
    return scores


def scores_from_layer(model, layer: str, x: torch.Tensor,
                      values: torch.Tensor) -> "torch.Tensor | None":
    """Class scores n×K of the input ``x`` (1×C×H×W) with the ``layer``'s value replaced by
    each of ``values`` (n×…, one per copy; ``"name:input"`` replaces the module's input), or
    ``None`` where the network cannot be split at the layer (the caller then runs it whole).

    Every copy shares the input, so what comes before the layer is the same for all of them:
    it runs once, on ``x``, and only the rest of the network runs on the n copies
    (:func:`_split`, the ``suffix`` trick). No split where the network cannot be traced, the
    layer runs more than once, a hook that fires on this thread is registered, or a value
    other than a batch-of-one tensor crosses the layer.
    """
    split = _split(model.module, layer) if "suffix" in ENABLED else None
    if split is None:
        return None
    out = split(x, values)
    if out is None:
        return None
    out = model.output(out) if model.output is not None else out
    return out if out.shape[0] == values.shape[0] else None


def occluded_scores(model, target, x: torch.Tensor, boxes, size, base: torch.Tensor,
                    threshold: float = 1.0, memo: "dict | None" = None) -> torch.Tensor:
    """The ``target``'s score (n,) (a resolved target, :mod:`.targets`) for each copy of ``x``
    (1×C×H×W) whose box ``(top, left)``
    of ``boxes`` (n of them, each ``size`` = (h, w), clipped at the map's edge) shows ``base``
    (1×C×H×W) instead of ``x``. With the ``incremental`` trick, computed from ``x``'s stored
    activations (:mod:`.incremental`), and ``threshold`` τ < 1 is Krypton's projective-field
    approximation there; without it, or where it may not run (a hook on the network…), the
    network runs on the copies and the result is exact. ``memo``: a dict kept across the calls
    for one ``x`` (the stored activations are kept there)."""
    run = None
    with torch.no_grad():
        if "incremental" in ENABLED:
            from . import incremental

            memo = {} if memo is None else memo
            key = ("incremental", "fold" in ENABLED)
            if key not in memo:
                memo[key] = incremental.session(model.module, x, fold="fold" in ENABLED)
            run = memo[key]
        if run is None:
            kh, kw = size
            batch = x.repeat(len(boxes), 1, 1, 1)
            for i, (r, c) in enumerate(boxes):
                batch[i, :, r:r + kh, c:c + kw] = base[0, :, r:r + kh, c:c + kw]
            return target.score(_forward(model, twin(model.module), batch))
        out = run.run(incremental.occluded_input(x, base, boxes, size), threshold)
        return target.score(model.output(out) if model.output is not None else out)


def upsample_masks(maps: torch.Tensor, size) -> torch.Tensor:
    """Maps n×h×w upsampled bilinearly to n×H×W (corners aligned, as Score-CAM's masks)."""
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=True)[0]


def batch_sum(t: torch.Tensor, weights: "torch.Tensor | None" = None) -> torch.Tensor:
    """``Σᵢ wᵢ t[i]`` (every ``wᵢ = 1`` when ``weights`` is None), with a batch dimension of 1.
    Computed on the tensor's memory read as N rows, whatever its layout (PyTorch's own
    ``sum(0)`` over the batch of a channels-last tensor is many times slower)."""
    n = t.shape[0]
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        rows = t.permute(0, 2, 3, 1).reshape(n, -1)
        r = rows.sum(0) if weights is None else weights.to(rows).reshape(1, n) @ rows
        return r.view(1, t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2)
    rows = t.reshape(n, -1)
    r = rows.sum(0) if weights is None else weights.to(rows).reshape(1, n) @ rows
    return r.view(1, *t.shape[1:])


def _layout(batch: torch.Tensor) -> torch.Tensor:
    """The batch channels-last when it holds several images on the CPU (``channels_last``)."""
    if ("channels_last" in ENABLED and batch.ndim == 4 and batch.shape[0] > 1
            and batch.device.type == "cpu"):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _forward(model, net: "nn.Module | None", batch: torch.Tensor) -> torch.Tensor:
    """The output of ``batch`` on the twin ``net``, or on the model when ``None``."""
    batch = _layout(batch)
    if net is None:
        return model.run(batch)
    out = net(batch)
    return model.output(out) if model.output is not None else out


# ------------------------------------------------------------------ the twin
class _Twin:
    def __init__(self, structure, module, pairs):
        self.structure = structure  # the network's modules it was built from
        self.module = module  # the graph module, or None: run the network itself
        self.pairs = pairs  # [(conv, bn, folded module, state it was folded from)]

    def refold(self) -> None:
        """Fold again the pairs whose weights or statistics changed since."""
        for i, (conv, bn, fused, state) in enumerate(self.pairs):
            now = weights_state(conv, bn)
            if now != state:
                _fold_into(fused, conv, bn)
                self.pairs[i] = (conv, bn, fused, now)


class _Busy(Exception):
    pass


def twin(module: nn.Module) -> "nn.Module | None":
    """The twin of ``module`` with the :data:`ENABLED` tricks, or ``None`` where the module
    must run itself (see the module docstring). Only valid in eval mode: call it inside
    :func:`~cnnwidgets.engine.hooks.restored`."""
    if module.training or hooked(module):
        return None
    structure = tuple(id(m) for m in module.modules())
    tricks = frozenset(ENABLED)
    owner = guard(module)
    with owner.twin_lock:
        twins = owner.twin = owner.twin or {}  # one per set of enabled tricks
        found = twins.get(tricks)
        if found is None or found.structure != structure:
            try:
                found = _build(module, structure)
            except _Busy:
                return None
            twins[tricks] = found
        if found.module is not None:
            found.refold()
        return found.module


def forget(module: nn.Module) -> None:
    """Drop ``module``'s twins; the next call builds them again. Needed only after changing a
    weight in place through ``.data``, which leaves no trace PyTorch exposes."""
    owner = guard(module)
    with owner.twin_lock:
        owner.twin = None


class _Tracer(fx.Tracer):
    """The default tracer, with every convolution and batch norm kept as one call — also
    subclasses outside ``torch.nn`` (EfficientNet's static-"same"-padding convolution)."""

    def __init__(self, leaf: str | None = None):
        super().__init__()
        self.leaf = leaf  # one more module kept as one call (the layer a split cuts at)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname == self.leaf or isinstance(m, _CONVS + _NORMS)
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module, leaf: str | None = None) -> "fx.Graph | None":
    """The network's graph (``None`` where fx cannot trace it), with ``leaf`` (a module's
    name) kept as one call; :class:`_Busy` where other threads' passes go on."""
    try:
        # fx patches nn.Module.__call__ for every thread while it traces: wait briefly for
        # other threads' forward passes; if they go on, run the network itself this time
        with guard(module).tracing(timeout=0.5):
            try:
                return _Tracer(leaf).trace(module)
            except Exception:  # noqa: BLE001 - any model fx cannot trace runs itself
                return None
    except RuntimeError as exc:  # the gate's timeout
        raise _Busy() from exc


def _build(module: nn.Module, structure) -> _Twin:
    graph = _trace(module)
    if graph is None:
        return _Twin(structure, None, [])
    named = dict(module.named_modules())
    pairs = _fold(graph, named) if "fold" in ENABLED else []
    if not pairs and "fold" in ENABLED:  # nothing to fold: the network runs itself
        return _Twin(structure, None, [])
    changed = bool(pairs)
    if "same_pad" in ENABLED:
        changed |= _plain_convs(graph, named)
    if "head" in ENABLED:
        changed |= _add_head(graph, named)
    if "pack" in ENABLED:
        changed |= _add_packed(graph, named)
    if not changed:
        return _Twin(structure, None, [])
    root = {}
    for t in {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}:
        obj = named.get(t)
        if obj is None:  # a parameter or buffer read with get_attr
            obj = module
            for part in str(t).split("."):
                obj = getattr(obj, part)
        root[t] = obj
    try:
        gm = fx.GraphModule(root, graph, class_name=f"Twin{type(module).__name__}").eval()
    except Exception:  # noqa: BLE001
        return _Twin(structure, None, [])
    return _Twin(structure, gm, pairs)


# ------------------------------------------------------------------ the split at a layer
class _Split:
    """A network cut at one layer: ``before`` computes from the input the values that the
    rest of the network reads besides the layer's (a residual branch crossing it, say);
    ``after`` computes the output from the input, the layer's value and those values."""

    def __init__(self, before: "fx.GraphModule | None", after: fx.GraphModule):
        self.before, self.after = before, after

    def __call__(self, x: torch.Tensor, values: torch.Tensor) -> "torch.Tensor | None":
        n = values.shape[0]
        crossing = self.before(x) if self.before is not None else ()
        fed = []
        for v in crossing:  # one image's value, the same for every copy
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != 1:
                return None
            fed.append(v.expand(n, *v.shape[1:]))
        return self.after(x.expand(n, *x.shape[1:]), values, *fed)


def _split(module: nn.Module, layer: str) -> "_Split | None":
    """The network split at ``layer`` (cached per network), or ``None`` (see
    :func:`scores_from_layer`)."""
    if module.training or hooked(module):
        return None
    structure = tuple(id(m) for m in module.modules())
    owner = guard(module)
    with owner.twin_lock:
        twins = owner.twin = owner.twin or {}
        found = twins.get(("split", layer))
        if found is None or found[0] != structure:
            try:
                graph = _trace(module, leaf=layer.partition(":")[0])
            except _Busy:
                return None
            found = twins[("split", layer)] = (structure, graph and _cut(graph, module, layer))
        return found[1]


def _cut(graph: fx.Graph, module: nn.Module, layer: str) -> "_Split | None":
    name, _, part = layer.partition(":")
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(calls) != 1 or len(inputs) != 1:
        return None
    cut = calls[0] if part != "input" else calls[0].args[0] if calls[0].args else None
    if not isinstance(cut, fx.Node) or cut.op == "placeholder":
        return None
    # the nodes computed from the input (parameters and constants are not)
    varies = set(inputs)
    for n in graph.nodes:
        if any(a in varies for a in n.all_input_nodes):
            varies.add(n)
    before = {cut}  # what the layer's value is computed from, the layer included
    stack = [cut]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in varies and a not in before:
                before.add(a)
                stack.append(a)
    # what the output needs from the layer on, and what it reads from before the layer
    after, crossing = set(), []
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n in after:
            continue
        if n in before:
            if n is not cut and n.op != "placeholder" and n not in crossing:
                crossing.append(n)
            continue
        after.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    crossing.sort(key=order.get)

    g = fx.Graph()
    env = {inputs[0]: g.placeholder("x"), cut: g.placeholder("layer_value")}
    env.update({c: g.placeholder(f"crossing_{i}") for i, c in enumerate(crossing)})
    for n in graph.nodes:
        if n in after:
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], env.__getitem__))
            else:
                env[n] = g.node_copy(n, env.__getitem__)
    head = None
    if crossing:
        gb = fx.Graph()
        needed = set(crossing)
        stack = list(crossing)
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in needed:
                    needed.add(a)
                    stack.append(a)
        envb = {}
        for n in graph.nodes:
            if n in needed:
                envb[n] = (gb.placeholder("x") if n.op == "placeholder"
                           else gb.node_copy(n, envb.__getitem__))
        gb.output(tuple(envb[c] for c in crossing))
        head = fx.GraphModule(module, gb, class_name="Before").eval()
    try:
        return _Split(head, fx.GraphModule(module, g, class_name="After").eval())
    except Exception:  # noqa: BLE001 - a graph fx cannot compile: run the network whole
        return None


def _name(named: dict, prefix: str, module: nn.Module) -> str:
    """Add ``module`` to the twin's modules under a new name starting with ``prefix``."""
    name = f"{prefix}{sum(1 for k in named if str(k).startswith(prefix))}"
    named[name] = module
    return name


# ------------------------------------------------------------------ fold, same_pad
def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and isinstance(bn, _NORMS)
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels
            and conv.weight.dtype in (torch.float32, torch.float64))


def _fold(graph: fx.Graph, named: dict) -> list:
    """Merge every eval-mode batch norm into the convolution that is its only input; returns
    the pairs folded."""
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
        fused = _plain(fused) if "same_pad" in ENABLED else fused
        _fold_into(fused, conv, bn)
        src.target = _name(named, "cw_folded_", fused)
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        pairs.append((conv, bn, fused, weights_state(conv, bn)))
    return pairs


def folded_weights(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of ``conv`` followed by ``bn`` (eval mode) as one convolution, in
    the convolution's dtype (computed in float64)."""
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
        weight = (w * scale.view(-1, *[1] * (w.ndim - 1))).to(dtype)
        return weight, (b * scale + shift).to(dtype)


def _fold_into(target: nn.Module, conv: nn.Module, bn: nn.Module) -> None:
    """Set ``target``'s weight and bias to ``conv`` followed by ``bn`` (eval mode)."""
    weight, bias = folded_weights(conv, bn)
    if weight.ndim == 4 and "channels_last" in ENABLED:
        # oneDNN then answers in channels-last, as the packed convolutions do: a batch of
        # one stays in one layout from layer to layer (no copies between layers)
        weight = weight.contiguous(memory_format=torch.channels_last)
    target.weight = nn.Parameter(weight, requires_grad=False)
    target.bias = nn.Parameter(bias, requires_grad=False)


def _plain(conv: nn.Module) -> nn.Module:
    """``conv`` as a plain ``nn.Conv2d`` sharing its parameters when it is a subclass that
    zero-pads its input symmetrically before a plain convolution (EfficientNet's static
    "same" padding: a ``ZeroPad2d`` child), else ``conv`` itself. Kept only when it gives the
    same output on random inputs of an odd and an even size (padding that depends on the
    input size fails)."""
    if type(conv) is nn.Conv2d or not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        return conv
    candidates = [tuple(conv.padding)]
    for child in conv.children():
        if isinstance(child, nn.ZeroPad2d):
            left, right, top, bottom = child.padding
            if left == right and top == bottom:
                candidates.append((conv.padding[0] + top, conv.padding[1] + left))
    p = conv.weight
    g = torch.Generator(device="cpu").manual_seed(0)
    k = conv.kernel_size
    inputs = [torch.randn((1, conv.in_channels, k[0] * 2 + 5 + e, k[1] * 2 + 5 + e),
                          generator=g).to(p) for e in (0, 1)]
    for padding in dict.fromkeys(candidates):
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, k, conv.stride, padding,
                          conv.dilation, conv.groups, conv.bias is not None, device=p.device,
                          dtype=p.dtype)
        plain.weight, plain.bias = conv.weight, conv.bias
        try:
            with torch.no_grad():
                same = all(torch.allclose(plain(x), conv(x), rtol=1e-5, atol=1e-6) for x in inputs)
        except Exception:  # noqa: BLE001 - shapes differ, or the subclass needs other input
            same = False
        if same:
            return plain.train(conv.training)
    return conv


def _plain_convs(graph: fx.Graph, named: dict) -> bool:
    """Route every convolution subclass with static "same" padding that is still in the graph
    (not folded) through a plain convolution sharing its parameters (:func:`_plain`)."""
    changed = False
    for node in graph.nodes:
        conv = named.get(node.target) if node.op == "call_module" else None
        if isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d:
            plain = _plain(conv)
            if plain is not conv:
                node.target = _name(named, "cw_plain_", plain)
                changed = True
    return changed


# ------------------------------------------------------------------ head
class Head(nn.Module):
    """The twin's first layer: a convolution applied to the network's input and to nothing
    else, hence affine in the input, with the ReLU / ReLU6 and max-pooling that directly follow
    it, when they do (ResNet's stem: conv → ReLU → max-pool).

    Outside :meth:`capture` it runs those modules as the network would.
    Inside :meth:`capture`, on the calling thread, a forward pass runs them without building a
    graph and records its output as a leaf tensor (a :class:`HeadOutput`) the caller
    differentiates with respect to; :meth:`add` takes a batch of gradients at that output back
    through the pooling and the activation and adds them up at the convolution's output, and
    :meth:`transpose` takes the sum back to the input, once. Only for the plain gradient: ReLU
    rules (:mod:`.relu_rules`) are not applied here."""

    def __init__(self, conv: nn.Module, act: "nn.Module | None", pool: "nn.Module | None",
                 fresh: bool):
        super().__init__()
        self.conv = conv
        self.act = act  #: the ReLU / ReLU6 after the convolution, or None
        self.pool = pool  #: the max-pooling after that, or None
        #: whether a layer after the head may change the head's output in place
        #: (``ReLU(inplace=True)``): it then gets a copy, the recorded leaf must stay as it is
        self.fresh = fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box = getattr(_CAPTURE, "boxes", {}).get(id(self))
        if box is None:
            y = self.conv(x)
            y = self.act(y) if self.act is not None else y
            return self.pool(y) if self.pool is not None else y
        with torch.no_grad():
            z = self.conv(x)
            shape, indices = z.shape, None
            if self.act is not None:
                z = z.clamp_(0.0, _high(self.act))
            if self.pool is not None:
                p = self.pool
                z, indices = torch.ops.aten.max_pool2d_with_indices(
                    z, _pair(p.kernel_size), _pair(p.stride or p.kernel_size), _pair(p.padding),
                    _pair(p.dilation), p.ceil_mode)
        z.requires_grad_(True)
        box.append(HeadOutput(z, shape, indices))
        return z + 0 if self.fresh else z

    @contextlib.contextmanager
    def capture(self):
        """Record the head's outputs (a list of :class:`HeadOutput`, one per forward pass) on this
        thread."""
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

    def add(self, total: "torch.Tensor | None", record: "HeadOutput", grad: torch.Tensor,
            weights: "torch.Tensor | None" = None) -> torch.Tensor:
        """``total`` (1×C×H×W at the convolution's output, or None) plus ``Σᵢ wᵢ grad[i]``
        taken back to the convolution's output through the activation and pooling."""
        if self.act is not None:  # 1[0 < f < t]: the output f is inside (0, t) exactly when
            f = record.value  # the input is
            high = _high(self.act)
            grad = grad * ((f > 0) & (f < high) if high is not None else f > 0)
        if record.indices is None:
            part = batch_sum(grad, weights)
            return part if total is None else total + part
        if weights is not None:
            grad = grad * weights.to(grad).view(-1, *[1] * (grad.ndim - 1))
        if total is None:
            total = grad.new_zeros((1, *record.shape[1:]))
        flat = total.view(record.shape[1], -1)
        n, c = grad.shape[:2]
        for i in range(n):  # each pooled value goes back to where its maximum came from
            flat.scatter_add_(1, record.indices[i].reshape(c, -1), grad[i].reshape(c, -1))
        return total

    def transpose(self, grad: torch.Tensor, input_shape) -> torch.Tensor:
        """The gradient at the input (``input_shape``, one image) of ``<grad, conv(x)>``."""
        x0 = torch.zeros((1, *input_shape[1:]), dtype=grad.dtype, device=grad.device,
                         requires_grad=True)
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(self.conv(x0), x0, grad)
        return gx


class HeadOutput:
    """One forward pass of a :class:`Head` inside :meth:`Head.capture`."""

    def __init__(self, value, shape, indices):
        self.value = value  #: the leaf the rest of the network ran on
        self.shape = shape  #: the convolution's output shape
        self.indices = indices  #: the max-pooling's indices (None: no pooling)


_CAPTURE = threading.local()  # per thread: {id(head): list of records}


def _head_of(net: "nn.Module | None") -> "Head | None":
    """The :class:`Head` of a twin, or ``None``."""
    head = getattr(net, "cw_head", None)
    return head if isinstance(head, Head) else None


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _high(act: nn.Module):
    return 6.0 if isinstance(act, nn.ReLU6) else None


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


def _only_user(node: fx.Node, named: dict, kinds: tuple) -> "fx.Node | None":
    """``node``'s one user when that is a call of a module of exactly one of ``kinds``."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    ok = (user.op == "call_module" and len(user.args) == 1 and not user.kwargs
          and type(named.get(user.target)) in kinds)
    return user if ok else None


def _add_head(graph: fx.Graph, named: dict) -> bool:
    """Route the input's one convolution — with the ReLU and max-pooling right after it, if
    any — through a :class:`Head`."""
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
    if not _is_affine(conv, (1, conv.in_channels, k[0] * 2 + 5, k[1] * 2 + 5)):
        return False
    absorbed = []  # the activation and pooling nodes taken into the head
    a = _only_user(node, named, (nn.ReLU, nn.ReLU6))
    if a is not None:
        absorbed.append(a)
        p = _only_user(a, named, (nn.MaxPool2d,))
        if p is not None and not named[p.target].return_indices:
            absorbed.append(p)
    modules = [named[n.target] for n in absorbed] + [None, None]
    last = absorbed[-1] if absorbed else node
    fresh = any(_in_place(u, named) for u in last.users)
    named["cw_head"] = Head(conv, modules[0], modules[1], fresh)
    node.target = "cw_head"
    if absorbed:
        last.replace_all_uses_with(node)
        for n in reversed(absorbed):
            graph.erase_node(n)
    return True


# ------------------------------------------------------------------ pack
def _pack_ops():
    """The oneDNN operators behind PyTorch's own CPU inference fusions, or None where this
    build of torch lacks them (they are internal: every use is checked and has a fallback)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        if ops is None or not torch.backends.mkldnn.is_available():
            return None
        return ops._convolution_pointwise, ops._reorder_convolution_weight
    except (AttributeError, RuntimeError):
        return None


class Packed(nn.Module):
    """A twin's convolution — and the ReLU / ReLU6 right after it, when there is one — run by
    oneDNN with the weight reordered once into oneDNN's own blocked layout and the activation
    applied as the convolution writes its output (what PyTorch's own CPU inference compiler
    does). A plain ``conv2d`` call reorders the weight on every call, a sizeable share of the
    call on layers with many channels and small maps.

    Used where it computes the same values — on CPU float32, with parameters that need no
    gradient; gradients to the input go through autograd's own rules
    (or the active ReLU rule of :mod:`.relu_rules`) in :class:`_PackedGrad`. Anything else runs
    the modules as the network would. Checked against the modules when the twin is built."""

    def __init__(self, conv: nn.Conv2d, act: "nn.Module | None"):
        super().__init__()
        self.conv = conv
        self.act = act  #: the ReLU / ReLU6 fused into the convolution, or None
        self._packed = None  # (key, weight in oneDNN's layout)
        self._broken = False  # the operator failed once: run the modules

    def _attr(self):
        if self.act is None:
            return "none", []
        if isinstance(self.act, nn.ReLU6):
            return "hardtanh", [0.0, 6.0]
        return "relu", []

    def _weight(self, x: torch.Tensor, reorder):
        w = self.conv.weight
        key = weights_state(self.conv)
        cached = self._packed
        if cached is not None and cached[0] == key:
            return cached[1]
        c = self.conv
        packed = reorder(w.detach(), list(c.padding), list(c.stride), list(c.dilation), c.groups,
                         list(x.shape))
        self._packed = (key, packed)
        return packed

    def fast(self, x: torch.Tensor) -> bool:
        """Whether this call can take the packed path: CPU float32, parameters that need no
        gradient."""
        c = self.conv
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 \
            and c.weight.dtype == torch.float32 and not (
                torch.is_grad_enabled() and (c.weight.requires_grad
                                             or (c.bias is not None and c.bias.requires_grad)))

    def packed_call(self, x: torch.Tensor) -> torch.Tensor:
        pointwise, reorder = _PACK_OPS
        c = self.conv
        attr, scalars = self._attr()
        b = None if c.bias is None else c.bias.detach()
        return pointwise(x, self._weight(x, reorder), b, list(c.padding), list(c.stride),
                         list(c.dilation), c.groups, attr, scalars, "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _PACK_OPS is not None and not self._broken:
            clear, mode = watching()  # no TorchFunctionMode, or only a ReLU rule
            if clear and self.fast(x):
                try:
                    if torch.is_grad_enabled() and x.requires_grad:
                        if mode is not None and self.act is not None:
                            mode.calls += 1
                        return _PackedGrad.apply(x, self, mode)
                    return self.packed_call(x)
                except RuntimeError:  # an input this build's operator refuses: modules from
                    self._broken = True  # now on
        y = self.conv(x)
        return self.act(y) if self.act is not None else y


class _PackedGrad(torch.autograd.Function):
    """The packed forward, and the gradient with respect to the input as autograd computes it:
    the activation's backward (autograd's mask, or the ReLU rule active in the forward pass,
    read when the backward pass runs as :mod:`.relu_rules` does), then the convolution's
    backward-data pass."""

    @staticmethod
    def forward(ctx, x, packed: "Packed", mode):
        y = packed.packed_call(x)
        # the output is needed only for the activation's backward: a later in-place operation
        # on an output without one (torchvision's EfficientNet: SiLU(inplace=True)) is fine
        ctx.save_for_backward(x, y if packed.act is not None else None)
        ctx.packed, ctx.mode = packed, mode
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        packed = ctx.packed
        c, act = packed.conv, packed.act
        if act is not None:
            rule = ctx.mode.rule if ctx.mode is not None else "plain"
            high = 6.0 if isinstance(act, nn.ReLU6) else None
            grad = backward_rule(grad, y, high, rule)
        gx = torch.ops.aten.convolution_backward(
            grad, x, c.weight.detach(), None, list(c.stride), list(c.padding), list(c.dilation),
            False, [0, 0], c.groups, [True, False, False])[0]
        return gx, None, None


_PACK_OPS = _pack_ops()


def _packable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu")


def _same_as_modules(packed: Packed) -> bool:
    """Whether ``packed`` gives the modules' output on a random input."""
    c = packed.conv
    g = torch.Generator(device="cpu").manual_seed(0)
    k = c.kernel_size
    try:
        with torch.no_grad():
            for n in (2,):
                x = torch.randn((n, c.in_channels, k[0] * 2 + 5, k[1] * 2 + 6), generator=g)
                y = c(x)
                ref = packed.act(y) if packed.act is not None else y
                out = packed(x)
                if out.shape != ref.shape or not torch.allclose(
                        out, ref, rtol=1e-4, atol=1e-5 * (1.0 + float(ref.abs().max()))):
                    return False
        packed._packed = None  # packed again for the real input's shape
        return True
    except Exception:  # noqa: BLE001 - an operator this build cannot run: keep the modules
        return False


def _add_packed(graph: fx.Graph, named: dict) -> bool:
    """Route every plain ``Conv2d`` of the twin (and the ReLU / ReLU6 that is its only user)
    through a :class:`Packed` module."""
    changed = False
    if _PACK_OPS is None:
        return changed
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = named.get(node.target)
        if conv is None or not _packable(conv):
            continue
        act_node = _only_user(node, named, (nn.ReLU, nn.ReLU6))
        act = named[act_node.target] if act_node is not None else None
        packed = Packed(conv, act)
        if not _same_as_modules(packed):
            continue
        node.target = _name(named, "cw_packed_", packed)
        if act_node is not None:
            act_node.replace_all_uses_with(node)
            graph.erase_node(act_node)
        changed = True
    return changed
