"""Convolution and linear layers: each point goes to the input whose contribution
``input × weight`` to it is largest (authors), reading only the windows and weight rows of the
points, a few MB at a time."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..points import chw_to_flat, flat_to_chw, height_width, pads_lrtb, shape3
from ..registry import rule, rule_for
from .passthrough import passes_through
from .shape import is_reshape

_CHUNK = 1 << 21  # elements per gathered block (8 MB of float32)


@rule(nn.modules.conv._ConvNd)
def other_convolution(walk, node, idx):
    """Convolutions other than ``nn.Conv2d`` (1-D, 3-D, transposed) have no rule."""
    raise walk.unsupported(node, "only 2-D convolutions are supported")


@rule(nn.Conv2d, shown=True)
def conv2d(walk, node, idx):
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
    m = walk.modules[node.target]
    src = node.args[0]
    x = walk.values[src][0]
    out_shape = shape3(walk.values[node])
    cin, h_in, w_in = x.shape
    w = m.weight.detach()
    kh, kw = w.shape[2:]
    stride, dilation = height_width(m.stride), height_width(m.dilation)
    left, right, top, bottom = _conv_padding(m, (h_in, w_in), out_shape[1:], (kh, kw),
                                             stride, dilation)
    if (kh, kw) + stride + (left, right, top, bottom, m.groups) == (1, 1, 1, 1, 0, 0, 0, 0, 1):
        return walk.send(src, _pointwise(w, idx, x))
    off_t = off_l = 0
    if m.padding_mode != "zeros" and (left or right or top or bottom):
        x = F.pad(x, (left, right, top, bottom), mode=m.padding_mode)
        off_t, off_l, left, right, top, bottom = top, left, 0, 0, 0, 0
    use_argmax = walk.position == "argmax" or (walk.position == "auto" and max(stride) > 1)
    best, ni, nj = _best_in_windows(x, w, m.groups, flat_to_chw(idx, out_shape), stride,
                                    dilation, (top, left), use_argmax)
    ni = (ni - off_t).clamp(0, h_in - 1)
    nj = (nj - off_l).clamp(0, w_in - 1)
    walk.send(src, chw_to_flat(best, ni, nj, (cin, h_in, w_in)))


def _conv_padding(m: nn.Conv2d, in_hw, out_hw, kernel, stride, dilation) -> tuple:
    """(left, right, top, bottom) zero padding of the input before the windows are taken: the
    layer's own, a ``static_padding`` submodule's added to it, or — for a subclass with its own
    ``forward`` and no such submodule (``Conv2dDynamicSamePadding``) — TensorFlow "same"
    padding computed from the output size."""
    if isinstance(m.padding, str):  # "same"/"valid": the pads nn.Conv2d computed
        left, right, top, bottom = (tuple(m._reversed_padding_repeated_twice)
                                    if m.padding == "same" else (0, 0, 0, 0))
    else:
        ph, pw = height_width(m.padding)
        left, right, top, bottom = pw, pw, ph, ph
    static = getattr(m, "static_padding", None)
    if isinstance(static, nn.Module) and hasattr(static, "padding"):
        sl, sr, st, sb = pads_lrtb(static.padding)
        left, right, top, bottom = left + sl, right + sr, top + st, bottom + sb
    elif type(m).forward is not nn.Conv2d.forward and static is None:
        (h_in, w_in), (oh, ow), (kh, kw) = in_hw, out_hw, kernel
        (sh, sw), (dh, dw) = stride, dilation
        pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - h_in, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - w_in, 0)
        left, right, top, bottom = pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2
    return left, right, top, bottom


def _best_in_windows(x, w, groups, chw, stride, dilation, top_left, use_argmax):
    """For points (c, i, j) of the output: the input channel whose contributions summed over
    the point's window are largest, and the new position — the window centre, or with
    ``use_argmax`` the window position where that channel contributes most. ``x`` is one
    sample C×H×W; ``top_left`` the zero padding above and left of it, whose positions
    contribute zero. Returns (channel, row, col), rows and cols clipped into ``x``."""
    c, i, j = chw
    cout, cin_g, kh, kw = w.shape
    (sh, sw), (dh, dw), (top, left) = stride, dilation, top_left
    hx, wx = x.shape[-2:]
    group = c // (cout // groups)
    # window rows/cols in unpadded input coordinates; padded positions contribute zero
    rows = i[:, None] * sh - top + torch.arange(kh, device=x.device) * dh  # M×kh
    cols = j[:, None] * sw - left + torch.arange(kw, device=x.device) * dw  # M×kw
    valid = (((rows >= 0) & (rows < hx))[:, :, None]
             & ((cols >= 0) & (cols < wx))[:, None, :])  # M×kh×kw
    rows_c, cols_c = rows.clamp(0, hx - 1), cols.clamp(0, wx - 1)
    xf = x.reshape(x.shape[0], -1)
    ones_k = torch.ones(kh * kw, dtype=x.dtype, device=x.device)
    best = torch.empty_like(c)
    ni = (i * sh - top + dh * ((kh - 1) // 2)).clamp(0, hx - 1)
    nj = (j * sw - left + dw * ((kw - 1) // 2)).clamp(0, wx - 1)
    if use_argmax:
        ni, nj = ni.clone(), nj.clone()
    step = max(1, _CHUNK // (cin_g * kh * kw))
    for s in range(0, c.numel(), step):
        sl_ = slice(s, s + step)
        pos = (rows_c[sl_, :, None] * wx + cols_c[sl_, None, :]).reshape(-1, kh * kw)
        mm, kk = pos.shape
        ok = valid[sl_].reshape(mm, kk)
        contrib = _contributions(xf, w, groups, c[sl_], group[sl_], pos)
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
    return best, ni, nj


def _contributions(xf, w, groups, c, group, pos):
    """M×cin_g×K, contiguous: the contribution ``x[c', p] * W[c, c', p]`` of each candidate
    input channel c' (those of c's group) at each window position p (flat in ``xf``, C×H·W)
    to each point's output channel c."""
    cout, cin_g = w.shape[:2]
    mm, kk = pos.shape
    wsel = w.reshape(cout, cin_g, kk).index_select(0, c)  # M×cin_g×K
    if cin_g == 1:  # depthwise: one candidate channel
        win = xf[group[:, None], pos][:, None, :]  # M×1×K
    elif groups == 1:  # read only the window columns, as M×K×cin (contiguous)
        upos, inv = torch.unique(pos, return_inverse=True)
        xsub = xf.index_select(1, upos).t().contiguous()  # (distinct positions)×cin
        win = xsub.index_select(0, inv.reshape(-1)).view(mm, kk, xf.shape[0]).transpose(1, 2)
    else:
        chans = group[:, None] * cin_g + torch.arange(cin_g, device=xf.device)  # M×cin_g
        win = xf[chans[:, :, None], pos[:, None, :]]  # M×cin_g×K
    return torch.mul(wsel, win, out=torch.empty_like(wsel))


def _pointwise(w, idx, x) -> torch.Tensor:
    """The convolution rule for a 1×1, stride-1, unpadded, ungrouped convolution (most
    layers of bottleneck networks), with a few tensor operations: the window is the point
    itself, so only the channel changes. Returns the points in ``x`` (C×H×W)."""
    cin, h_in, w_in = x.shape
    hw = h_in * w_in
    c, pos = idx // hw, idx % hw
    upos, inv = torch.unique(pos, return_inverse=True)
    win = x.reshape(cin, hw).index_select(1, upos).t().contiguous().index_select(0, inv)
    score = win.mul_(w.reshape(w.shape[0], cin).index_select(0, c))  # M×cin
    return score.argmax(1) * hw + pos


@rule(nn.Linear, shown=True)
def linear_module(walk, node, idx):
    """``nn.Linear``: the linear rules of :func:`_linear`."""
    _linear(walk, node, walk.modules[node.target].weight, idx)


@rule(F.linear, shown=True)
def linear_function(walk, node, idx):
    """``F.linear(x, weight)``: the linear rules of :func:`_linear`."""
    weight = walk.values[node.args[1] if len(node.args) > 1 else node.kwargs["weight"]]
    _linear(walk, node, weight, idx)


def is_linear(node, modules: dict) -> bool:
    """Whether ``node`` is a linear layer (module or function)."""
    found = rule_for(node, modules)
    return found is not None and found.fn in (linear_module, linear_function)


def _linear(walk, node, weight: torch.Tensor, idx):
    """Authors' linear rules; the mode is chosen by what the input was before flattening.

    *Vector input* (the previous layer is linear or a global pool): keep every input j with
    ``a_j W_ij > 0`` for some kept neuron i. *Flattened map* (VGG/AlexNet fc6): per neuron
    the single argmax of ``a_j W_ij``. Only the kept neurons' weight rows are read.
    *A map with channels last* (extension; ConvNeXt's pointwise layers ``Linear`` over the
    last dimension): a 1×1 convolution, so the convolution rule — at the same position, the
    input channel whose contribution ``a_j W_ij`` is largest.
    """
    src = node.args[0]
    a = walk.values[src]
    if a.dim() > 2:
        a = a[0].reshape(-1, a.shape[-1])  # positions × channels
        cin, cout = a.shape[1], weight.shape[0]
        pos, c = idx // cout, idx % cout
        upos, inv = torch.unique(pos, return_inverse=True)
        win = a.index_select(0, upos).index_select(0, inv)  # M×cin
        score = win.mul_(weight.detach().index_select(0, c))
        return walk.send(src, pos * cin + score.argmax(1))
    if a.dim() != 2:
        raise walk.unsupported(node, f"linear layers on {a.dim()}-D input are not supported")
    a = a[0]
    w = weight.detach()
    if _flattened_map(walk, src):
        return walk.send(src, _argmax_rows(w, a, idx))
    hi = torch.full_like(a, -math.inf)
    lo = torch.full_like(a, math.inf)
    step = max(1, _CHUNK // a.numel())
    for s in range(0, idx.numel(), step):
        rows = w.index_select(0, idx[s:s + step])
        hi = torch.maximum(hi, rows.amax(0))
        lo = torch.minimum(lo, rows.amin(0))
    keep = ((a > 0) & (hi > 0)) | ((a < 0) & (lo < 0))
    walk.send(src, keep.nonzero().flatten())


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


def _flattened_map(walk, node) -> bool:
    """Whether ``node`` is (through pass-through layers) a flattened map with h·w > 1."""
    for _ in range(64):
        if not isinstance(node, fx.Node) or not node.args:
            return False
        src = node.args[0]
        v = walk.values.get(src)
        if not isinstance(v, torch.Tensor):
            return False
        if is_reshape(node, walk.modules):
            return v.dim() >= 3 and math.prod(v.shape[2:]) > 1
        same = v.shape == walk.values[node].shape
        if not (same and passes_through(node, walk.modules)):
            return False
        node = src
    return False
