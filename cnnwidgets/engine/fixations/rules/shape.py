"""Operations that move elements without computing: reshapes, permutations, indexing, pieces of
a split, concatenation (authors: concatenation) and padding (extension)."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..points import chw_to_flat, flat_to_chw, pads_lrtb, ravel_coords, shape3
from ..registry import rule, rule_for


@rule(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
      "flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as")
def reshape(walk, node, idx):
    """Flatten/view/reshape/squeeze keep the memory order: flat indices are unchanged."""
    src = node.args[0]
    if walk.is_flow(src):
        a, b = walk.values[src], walk.values[node]
        if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
            raise walk.unsupported(node, "it mixes the batch dimension")
    walk.send(src, idx)


@rule(nn.Flatten, nn.Unflatten)
def reshape_module(walk, node, idx):
    """``nn.Flatten`` / ``nn.Unflatten`` keep the memory order: flat indices are unchanged."""
    walk.send(node.args[0] if node.args else None, idx)


def is_reshape(node, modules: dict) -> bool:
    """Whether ``node`` is a reshape (its flat indices are those of its input)."""
    found = rule_for(node, modules)
    return found is not None and found.fn in (reshape, reshape_module)


def permute_order(node, nd: int) -> list:
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


@rule(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
      "permute", "transpose", "swapaxes", "swapdims")
def permute(walk, node, idx):
    """Permuted or transposed dimensions (extension; ConvNeXt's channels-last blocks): each
    element keeps its value, at permuted coordinates. The batch dimension must stay first."""
    src = node.args[0]
    x, out = walk.values[src], walk.values[node]
    nd = x.dim()
    order = permute_order(node, nd)
    if len(order) != nd or order[0] != 0:
        raise walk.unsupported(node, "it moves the batch dimension")
    coords = torch.unravel_index(idx, tuple(out.shape[1:]))  # output dim k = input dim order[k]
    ins = [None] * (nd - 1)
    for k in range(1, nd):
        ins[order[k] - 1] = coords[k - 1]
    walk.send(src, ravel_coords(ins, x.shape[1:]))


def _is_split(node) -> bool:
    """Whether ``node`` is ``chunk`` / ``split`` of a tensor (its value: a tuple of pieces)."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in ("chunk", "split"))
        or (node.op == "call_function" and node.target in (torch.chunk, torch.split)))


@rule(operator.getitem)
def getitem(walk, node, idx):
    """``x[key]``: basic indexing of a tensor, or one piece of a ``chunk`` / ``split``."""
    first = node.args[0] if node.args else None
    if isinstance(walk.values.get(first), torch.Tensor):
        return _index(walk, node, idx)
    if _is_split(first):
        return _piece(walk, node, idx)
    raise walk.unsupported(node)


def _index(walk, node, idx):
    """Basic indexing ``x[:, 1]``, ``x[:, 0:3:2, ...]`` (extension; e.g. GoogLeNet's and
    Inception's ``transform_input``): each output coordinate maps to its input coordinate."""
    src, key = node.args[0], node.args[1]
    x = walk.values[src]
    key = key if isinstance(key, tuple) else (key,)
    if Ellipsis in key:
        k = key.index(Ellipsis)
        key = key[:k] + (slice(None),) * (x.dim() - len(key) + 1) + key[k + 1:]
    key = key + (slice(None),) * (x.dim() - len(key))
    if len(key) != x.dim() or key[0] != slice(None) or not all(
            isinstance(k, (int, slice)) for k in key):
        raise walk.unsupported(node, f"indexing with {node.args[1]!r}")
    out_shape = tuple(walk.values[node].shape[1:])
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
    walk.send(src, flat)


def _piece(walk, node, idx):
    """One piece of ``chunk`` / ``split`` (extension; ShuffleNet's two branches): the point
    moves by the sizes of the pieces before it along the split dimension."""
    split, k = node.args[0], node.args[1]
    src = split.args[0]
    x = walk.values[src]
    pieces = walk.values[split]
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    dim = int(dim) % x.dim()
    if dim == 0:
        raise walk.unsupported(node, "a split of the batch dimension")
    if not isinstance(k, int):
        raise walk.unsupported(node, f"a piece chosen by {k!r}")
    k = k % len(pieces)
    offset = sum(p.shape[dim] for p in pieces[:k])
    coords = list(torch.unravel_index(idx, tuple(pieces[k].shape[1:])))
    coords[dim - 1] = coords[dim - 1] + offset
    walk.send(src, ravel_coords(coords, x.shape[1:]))


@rule(torch.cat, torch.concat)
def cat(walk, node, idx):
    """Concatenation (Inception, DenseNet): the index along the concatenated dim selects
    the branch."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = walk.values[node]
    dim = dim % out.dim()
    if dim == 0:
        raise walk.unsupported(node, "concatenation along the batch dimension")
    coords = list(torch.unravel_index(idx, tuple(out.shape[1:])))
    along = coords[dim - 1]
    sizes = [walk.values[t].shape[dim] if isinstance(t, fx.Node) else 0 for t in tensors]
    ends = torch.tensor(np.cumsum(sizes), device=idx.device)
    branch = torch.searchsorted(ends, along.contiguous(), right=True)
    starts = ends - torch.tensor(sizes, device=idx.device)
    for k, t in enumerate(tensors):
        sel = branch == k
        if not sel.any():
            continue
        sub = [cc[sel] for cc in coords]
        sub[dim - 1] = sub[dim - 1] - starts[k]
        walk.send(t, ravel_coords(sub, tuple(walk.values[t].shape[1:])))


@rule(nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, F.pad)
def padding(walk, node, idx):
    """Explicit padding (extension): shift by the padding, clip into the unpadded map."""
    if node.op == "call_module":
        pads = pads_lrtb(walk.modules[node.target].padding)
    else:
        pads = pads_lrtb(node.args[1] if len(node.args) > 1 else node.kwargs.get("pad"))
    src = node.args[0]
    left, _, top, _ = pads
    shape_in = shape3(walk.values[src])
    c, i, j = flat_to_chw(idx, shape3(walk.values[node]))
    i = (i - top).clamp(0, shape_in[1] - 1)
    j = (j - left).clamp(0, shape_in[2] - 1)
    walk.send(src, chw_to_flat(c, i, j, shape_in))
