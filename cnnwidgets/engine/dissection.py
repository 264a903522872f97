"""Network dissection (Bau et al., CVPR 2017; NetDissect-Lite): which units detect which concepts.

For each unit k of a layer:

1. **Threshold.** ``T_k`` = the top-``quantile`` value of the unit's activations over the whole
   data set at the layer's native resolution: with ``n`` values in all, the ``r``-th largest,
   ``r = max(1, ceil(quantile · n))``. It is exact and streamed: each rank keeps only the
   ``r`` largest values seen so far per unit (merged with ``torch.topk``); when ``r`` per unit
   would pass ``max_values`` in all, every image contributes a fixed, index-seeded subsample of
   its positions instead (``T_k`` is then the exact quantile of that subsample, an estimate),
   so memory is bounded whatever the data set's size.
2. **Binarise.** Per image, the unit's map is upsampled bilinearly to the mask size and
   ``M_k = map ≥ T_k`` (ties at the threshold are in, unless ``T_k`` equals the unit's minimum
   over the data set — a unit that is flat on more than the top quantile detects nothing; then
   ``M_k = map > T_k``).
3. **IoU.** ``IoU(k, c) = Σ|M_k ∩ L_c| / Σ|M_k ∪ L_c|``, sums over the images where c's category
   is annotated; image-level labels (scene, texture) cover the whole image. Counts are int64.
   Bilinear values are convex combinations of four native values, so only the upsampled cells
   whose largest corner reaches ``T_k`` can be "on": those few cells are upsampled (bit for bit
   as a dense upsampling would) and their "on" pixels summed against the masks; everything is
   done a batch at a time with a fixed number of tensor operations, no loop over concepts.
4. The unit's label is its best-IoU concept; it is a *detector* when ``IoU ≥ iou_threshold``.

:func:`dissect` runs these steps as four functions. Pass 1 (:func:`_threshold_pass`, step 1)
runs the model once and streams the activations to a scratch file (:class:`_Scratch`; never an
images × units × h × w array in memory); pass 2 (:func:`_tally_pass`, steps 2–3) reads the file
back batch by batch, and it is deleted (``features="recompute"`` runs the model twice instead and
writes nothing); :func:`_assemble` turns the tallies into the result's arrays (step 4 reads
them); with ``cache_dir`` the result is saved under a key of the weights, the data set and the
settings (:func:`_cache_file`), and loaded instead of recomputed when asked for again.

Under ``torch.distributed`` (e.g. ``torchrun``) every rank dissects the shard
``indices[rank::world_size]``; top-value buffers are merged with ``all_gather`` and tallies with
``all_reduce``, so the result equals the one-process result exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import hash_weights
from .checks import check_float, check_int
from .datasets import concept_number, item_image
from .distributed import all_gather_cat, all_reduce, rank_and_world
from .hooks import cancel_points, capture, restored
from .images import to_uint8
from .model import Model, as_model
from .progress import Progress, check_cancel, check_progress

# ----------------------------------------------------------------------------- the protocol


def concept_table(dataset):
    """``(concepts, categories of each concept, category names)`` of a concept data set."""
    for attr in ("concepts", "categories", "__len__", "__getitem__"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"{type(dataset).__name__} is not a concept data set: it has no {attr!r}. "
                "Use cw.datasets.SyntheticConcepts(...) or cw.datasets.Broden(root), or see "
                "cnnwidgets.engine.datasets for the protocol"
            )
    concepts = [str(c) for c in dataset.concepts]
    cats = dataset.categories
    missing = [c for c in concepts if c not in cats]
    if missing:
        raise ValueError(f"dataset.categories has no category for {missing[:5]}")
    names = list(dict.fromkeys(cats[c] for c in concepts))
    return concepts, [cats[c] for c in concepts], names


def prepare_item(item, concept_index: dict, concept_cat: np.ndarray, category_index: dict):
    """One protocol item → tensors the tally needs (runs in DataLoader workers).

    Returns a dict: ``image`` uint8 3×H×W, ``ids`` int64 (k,) concept indices present at pixel
    level, ``masks`` bool k×(h·w), ``hw`` the mask size, ``labels`` int64 image-level concept
    indices, ``annotated`` bool per category.
    """
    if not isinstance(item, dict) or "image" not in item:
        raise TypeError("a concept data set item must be a dict with 'image' and 'masks'")
    image = item_image(item)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"item images must be H×W×3, not {image.shape}")
    image = to_uint8(image, "a data set image")  # floats in [0, 1], as cw.load_image
    raw = item.get("masks", [])
    if isinstance(raw, dict):
        ids, masks, hw = _masks_from_dict(raw, concept_index, image.shape[:2])
    else:
        ids, masks, hw = _masks_from_label_maps(raw, len(concept_cat), image.shape[:2])
    labels = np.unique(np.asarray(item.get("labels", []) or [], np.int64))
    annotated = np.zeros(len(category_index), bool)
    for name in item.get("annotated") or []:
        if name in category_index:
            annotated[category_index[name]] = True
    all_ids = np.concatenate([np.asarray(ids, np.int64), labels])
    if len(all_ids):
        annotated[concept_cat[all_ids]] = True
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "ids": torch.as_tensor(np.asarray(ids, np.int64)),
        "masks": torch.from_numpy(masks),
        "hw": tuple(int(v) for v in hw),
        "labels": torch.from_numpy(labels),
        "annotated": torch.from_numpy(annotated),
    }


def _masks_from_dict(raw: dict, concept_index: dict, image_hw):
    """Masks given as {concept name or index: boolean mask} → (sorted concept indices,
    bool k×(h·w) masks, (h, w)); masks of one concept are or-ed."""
    concepts = list(concept_index)
    pairs = [(concept_number(key, concepts, concept_index), np.asarray(mask, bool))
             for key, mask in raw.items()]
    hw = pairs[0][1].shape if pairs else image_hw
    ids = sorted({i for i, _ in pairs})
    masks = np.zeros((len(ids), hw[0] * hw[1]), bool)
    where = {i: j for j, i in enumerate(ids)}
    for i, m in pairs:
        if m.shape != hw:
            raise ValueError(f"all masks of an item must share one size; got {m.shape} and {hw}")
        masks[where[i]] |= m.reshape(-1)
    return ids, masks, hw


def _masks_from_label_maps(raw, n_concepts: int, image_hw):
    """Masks given as a list of label maps (concept index per pixel, −1 for none) → (sorted
    concept indices, bool k×(h·w) masks, (h, w))."""
    maps = [np.asarray(m) for m in raw]
    hw = maps[0].shape if maps else image_hw
    for m in maps:
        if m.shape != hw:
            raise ValueError(f"all label maps of an item must share one size; got {m.shape} "
                             f"and {hw}")
    if not maps:
        return [], np.zeros((0, hw[0] * hw[1]), bool), hw
    stack = np.stack(maps).reshape(len(maps), -1).astype(np.int64)
    ids = np.unique(stack[stack >= 0])
    if len(ids) and ids[-1] >= n_concepts:
        raise ValueError(f"a label map holds concept index {ids[-1]}, out of range: the data "
                         f"set has {n_concepts} concepts (indices 0–{n_concepts - 1}, "
                         "dataset.concepts; −1 marks a pixel with none)")
    masks = np.zeros((len(ids), stack.shape[1]), bool)
    for m in stack:  # one vectorised comparison per label map, not per concept
        hit = m >= 0
        pos = np.searchsorted(ids, m[hit])
        masks[pos, np.flatnonzero(hit)] = True
    return list(ids), masks, hw


class _Items(torch.utils.data.Dataset):
    """A shard of a concept data set, items turned into tensors (picklable for workers)."""

    def __init__(self, dataset, indices, concepts, cats, cat_names, with_masks=True,
                 with_images=True):
        self.dataset = dataset
        self.indices = list(indices)
        self.concept_index = {c: i for i, c in enumerate(concepts)}
        self.cat_names = {c: i for i, c in enumerate(cat_names)}
        self.concept_cat = np.array([self.cat_names[c] for c in cats], np.int64)
        self.with_masks = with_masks
        self.with_images = with_images

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        item = self.dataset[index]
        out = prepare_item(item, self.concept_index, self.concept_cat, self.cat_names)
        out["index"] = index
        if not self.with_images:
            out["image"] = None
        if not self.with_masks:
            for key in ("ids", "masks", "labels", "annotated"):
                out[key] = None
        return out


def _collate(items):
    batch = {key: [it[key] for it in items] for key in items[0]}
    if batch["image"][0] is not None:
        shapes = {tuple(im.shape) for im in batch["image"]}
        if len(shapes) > 1:
            raise ValueError(f"the data set's images differ in size ({sorted(shapes)[:3]}…); "
                             "dissection feeds them as a batch, so give them one size")
        batch["image"] = torch.stack(batch["image"])
    batch["index"] = torch.as_tensor(batch["index"], dtype=torch.int64)
    return batch


# ----------------------------------------------------------------------------- distributed


# rank, world size and the collectives live in .distributed (shared with cw.evaluate)
_dist, _all_reduce, _all_gather_cat = rank_and_world, all_reduce, all_gather_cat


# ----------------------------------------------------------------------------- pass 1 state


def merge_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each row, in decreasing order (exact)."""
    k = min(int(k), values.shape[1])
    return values.topk(k, dim=1, largest=True, sorted=True).values


def top_order(scores: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` best entries of each row, ranked by score (descending), then by
    image index (ascending): deterministic whatever order the candidates come in, so ranks
    can merge in any order."""
    order = torch.argsort(index, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True)
    return order.gather(1, by_score[:, :k])


def merge_top_images(scores, index, maps, new_scores, new_index, new_maps, k):
    """Merge the kept top images (C×m scores and indices, C×m×hw maps) with a batch's
    (C×N scores and indices, N×C×hw maps); returns the best ``k`` of both."""
    C, m = scores.shape
    pos = top_order(torch.cat([scores, new_scores], 1), torch.cat([index, new_index], 1), k)
    old = pos < m
    units = torch.arange(C)[:, None]
    kept_maps = maps[units, pos.clamp(max=max(m - 1, 0))] if m else None
    batch_maps = new_maps[(pos - m).clamp(min=0), units]
    out_maps = batch_maps if kept_maps is None else torch.where(old[..., None], kept_maps,
                                                                batch_maps)
    all_scores = torch.cat([scores, new_scores], 1).gather(1, pos)
    all_index = torch.cat([index, new_index], 1).gather(1, pos)
    return all_scores, all_index, out_maps


class _Thresholds:
    """Streaming exact top-``r`` values per unit (pass 1), plus the top images per unit."""

    def __init__(self, n_images: int, shape, quantile: float, max_values: int, top_n: int):
        C, h, w = shape
        self.C, self.hw, self.shape = C, h * w, shape
        total = n_images * h * w
        rank = max(1, math.ceil(quantile * total))
        if rank * C <= max_values:
            self.sample = None
            self.rank = rank
        else:  # bounded memory: a fixed subsample of positions per image
            per_image = max(1, int(max_values / (C * quantile * n_images)))
            per_image = min(per_image, h * w)
            self.sample = per_image
            self.rank = max(1, math.ceil(quantile * n_images * per_image))
        self.buffer = torch.empty(C, 0)
        self.pending = []
        self.pending_size = 0
        self.minimum = torch.full((C,), math.inf)
        self.top_n = top_n
        self.top_scores = torch.empty(C, 0)
        self.top_index = torch.empty(C, 0, dtype=torch.int64)
        self.top_maps = torch.empty(C, 0, h * w)

    def update(self, act: torch.Tensor, index: torch.Tensor):
        N, C = act.shape[:2]
        flat = act.reshape(N, C, -1).float()
        self.minimum = torch.minimum(self.minimum, flat.amin(dim=(0, 2)))
        if self.sample is None:
            values = flat.permute(1, 0, 2).reshape(C, -1)
        else:
            picks = [torch.randperm(self.hw, generator=torch.Generator().manual_seed(int(i)))
                     [: self.sample] for i in index]
            values = torch.stack([flat[n][:, p] for n, p in enumerate(picks)], 1).reshape(C, -1)
        self.pending.append(values)
        self.pending_size += values.shape[1]
        if self.pending_size >= max(self.rank, 4096):
            self._merge()
        # top images by the unit's maximum over the image
        scores = flat.amax(dim=2).T  # C×N
        idx = index[None].expand(C, -1)
        self.top_scores, self.top_index, self.top_maps = merge_top_images(
            self.top_scores, self.top_index, self.top_maps, scores, idx, flat, self.top_n)

    def _merge(self):
        if self.pending:
            self.buffer = merge_top(torch.cat([self.buffer, *self.pending], 1), self.rank)
            self.pending, self.pending_size = [], 0

    def finish(self):
        """Merge across ranks; returns (thresholds, minimum)."""
        self._merge()
        buffer = merge_top(_all_gather_cat(self.buffer, 1, -math.inf), self.rank)
        self.minimum = _all_reduce(self.minimum, "min")
        if _dist()[1] > 1:
            s, i, m = (_all_gather_cat(self.top_scores, 1, -math.inf),
                       _all_gather_cat(self.top_index, 1, -1),
                       _all_gather_cat(self.top_maps, 1, 0.0))
            empty = torch.empty(self.C, 0)
            self.top_scores, self.top_index, self.top_maps = merge_top_images(
                empty, empty.long(), torch.empty(self.C, 0, self.hw), s, i,
                m.permute(1, 0, 2), self.top_n)
        return buffer[:, -1].clone() if buffer.shape[1] else self.minimum.clone(), self.minimum


def effective_threshold(threshold: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Per unit, the value ``t`` with ``M_k = map ≥ t``: ``T_k`` less a rounding tolerance
    (ties are in; bilinear weights may round a plateau at ``T_k`` a hair below it), or the next
    float above ``T_k`` when ``T_k`` is the unit's minimum (then ``M_k = map > T_k``)."""
    threshold = threshold.float()
    tol = 1e-6 * threshold.abs().clamp_min(1.0)
    above = torch.nextafter(threshold, torch.full_like(threshold, math.inf))
    return torch.where(threshold > minimum.float(), threshold - tol, above)


def binarize(upsampled: torch.Tensor, threshold: torch.Tensor, minimum: torch.Tensor):
    """``M_k`` of step 2: units on dim −2 (… × C × P)."""
    return upsampled >= effective_threshold(threshold, minimum)[:, None]


def _axis(n_out: int, n_in: int):
    """Bilinear sampling along one axis (align_corners=False, as ``F.interpolate``): for each
    output index its two source indices and weights (float32)."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().to(torch.int64).clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    l1 = src - i0.to(torch.float32)
    return i0, i1, 1.0 - l1, l1


def upsample(act: torch.Tensor, hw) -> torch.Tensor:
    """N×C×h×w → N×C×(H·W), bilinear with align_corners=False (NetDissect's upsampling):
    out[Y, X] = wy0·(wx0·a[y0, x0] + wx1·a[y0, x1]) + wy1·(wx0·a[y1, x0] + wx1·a[y1, x1])."""
    N, C, h, w = act.shape
    H, W = (int(v) for v in hw)
    y0, y1, wy0, wy1 = _axis(H, h)
    x0, x1, wx0, wx1 = _axis(W, w)
    a = act.float()
    top = wx0 * a[:, :, y0][..., x0] + wx1 * a[:, :, y0][..., x1]
    bottom = wx0 * a[:, :, y1][..., x0] + wx1 * a[:, :, y1][..., x1]
    out = wy0[:, None] * top + wy1[:, None] * bottom
    return out.reshape(N, C, H * W)


class _Sampler:
    """Sparse bilinear upsampling for one (h, w) → (H, W).

    Output rows sharing the same source rows (y0, y1) form a row group, likewise columns; a
    row group × a column group is a *cell*, whose pixels are convex combinations of its four
    corner values. A pixel can reach a unit's threshold only where the cell's largest corner
    does, so only those cells are computed — with the same expression as :func:`upsample`, so
    the values are bit for bit the same. By the definition of the quantile few cells reach the
    threshold, and the tally costs a small fraction of a dense one.
    """

    def __init__(self, native, hw):
        h, w = native
        self.H, self.W = (int(v) for v in hw)
        self.rows = self._groups(*_axis(self.H, h))
        self.cols = self._groups(*_axis(self.W, w))

    @staticmethod
    def _groups(i0, i1, w0, w1):
        """(source pairs G×2, members G×L with −1 padding, their weights G×L ×2)."""
        pairs, inverse = torch.unique(torch.stack([i0, i1], 1), dim=0, return_inverse=True)
        G = len(pairs)
        size = int(torch.bincount(inverse, minlength=G).max())
        members = torch.full((G, size), -1, dtype=torch.int64)
        weights0 = torch.zeros(G, size)
        weights1 = torch.zeros(G, size)
        for g in range(G):
            m = torch.nonzero(inverse == g).flatten()
            members[g, : len(m)] = m
            weights0[g, : len(m)] = w0[m]
            weights1[g, : len(m)] = w1[m]
        return pairs, members, weights0, weights1

    def active_pixels(self, a: torch.Tensor, t: torch.Tensor):
        """For maps ``a`` (M×C×h×w) and thresholds ``t`` (C): the (image, unit, pixel) triples
        of the upsampled maps at or above the threshold, as three int64 vectors."""
        rpairs, rmembers, wy0, wy1 = self.rows
        cpairs, cmembers, wx0, wx1 = self.cols
        top = a[:, :, rpairs[:, 0]]  # M×C×Gy×w
        bottom = a[:, :, rpairs[:, 1]]
        corners = (top[..., cpairs[:, 0]], top[..., cpairs[:, 1]],
                   bottom[..., cpairs[:, 0]], bottom[..., cpairs[:, 1]])  # M×C×Gy×Gx each
        cell = torch.maximum(torch.maximum(corners[0], corners[1]),
                             torch.maximum(corners[2], corners[3]))
        n, c, gi, gj = torch.nonzero(cell >= t[None, :, None, None], as_tuple=True)
        if not len(c):
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty, empty
        v00, v01, v10, v11 = (k[n, c, gi, gj][:, None, None] for k in corners)  # m×1×1
        x0w, x1w = wx0[gj][:, None, :], wx1[gj][:, None, :]  # m×1×Lx
        y0w, y1w = wy0[gi][:, :, None], wy1[gi][:, :, None]  # m×Ly×1
        value = y0w * (x0w * v00 + x1w * v01) + y1w * (x0w * v10 + x1w * v11)
        Y = rmembers[gi][:, :, None]
        X = cmembers[gj][:, None, :]
        on = (value >= t[c][:, None, None]) & (Y >= 0) & (X >= 0)
        cell_idx, r, q = torch.nonzero(on, as_tuple=True)
        pixels = rmembers[gi[cell_idx], r] * self.W + cmembers[gj[cell_idx], q]
        return n[cell_idx], c[cell_idx], pixels


class _Tally:
    """Pass 2: intersections and unit areas per annotated category (int64), a batch at a time
    with a fixed number of tensor operations (no loop over images or concepts)."""

    def __init__(self, C, n_concepts, n_categories):
        self.K = n_concepts
        self._inter = torch.zeros(C, n_concepts + 1, dtype=torch.int64)  # last: padding
        self.unit_area = torch.zeros(C, n_categories, dtype=torch.int64)
        self.samplers = {}

    @property
    def inter(self) -> torch.Tensor:
        return self._inter[:, : self.K]

    def update(self, act, threshold, minimum, batch):
        N, C = act.shape[:2]
        t = effective_threshold(threshold, minimum)
        native = tuple(act.shape[2:])
        groups: dict = {}
        for n, hw in enumerate(batch["hw"]):
            groups.setdefault(tuple(hw), []).append(n)
        for hw, members in groups.items():
            key = (native, hw)
            if key not in self.samplers:
                self.samplers[key] = _Sampler(native, hw)
            M, P = len(members), hw[0] * hw[1]
            a = act if M == N else act[torch.as_tensor(members)]
            n, units, pixels = self.samplers[key].active_pixels(a.float(), t)
            table, ids, labels, annotated = batch_tables(batch, members, self.K)
            # per (image, unit), the sum of the mask columns over its "on" pixels: the
            # intersections with the image's concepts, and (last column of ones) its area
            counts = torch.zeros(M * C, table.shape[1])
            counts.index_add_(0, n * C + units, table[n * P + pixels])
            counts = counts.round_().to(torch.int64).view(M, C, -1)  # exact below 2**24
            area = counts[:, :, -1]  # M×C
            k = ids.shape[1]
            if k:
                rows = torch.arange(C)[None, :, None].expand(M, C, k)
                self._inter.index_put_((rows.reshape(-1), ids[:, None, :].expand(M, C, k).reshape(-1)),
                                       counts[:, :, :-1].reshape(-1), accumulate=True)
            self._inter[:, : self.K] += area.T @ labels  # image-level labels: whole image
            self.unit_area += area.T @ annotated


def batch_tables(batch, members, K):
    """For the images ``members`` of a batch: their masks as one float table (M·P)×(k+1)
    (mask columns, padded, then a column of ones), the concept index of each column M×k
    (padding → K), image-level labels M×K and annotated categories M×n_categories (int64)."""
    cache = batch.setdefault("_tables", {})
    key = tuple(members)
    if key not in cache:
        k = max([len(batch["ids"][n]) for n in members] + [0])
        P = batch["masks"][members[0]].shape[1]
        table = torch.zeros(len(members), P, k + 1)
        table[..., -1] = 1.0
        ids = torch.full((len(members), k), K, dtype=torch.int64)
        labels = torch.zeros(len(members), K, dtype=torch.int64)
        for row, n in enumerate(members):
            m = batch["masks"][n]
            table[row, :, : m.shape[0]] = m.T
            ids[row, : m.shape[0]] = batch["ids"][n]
            labels[row, batch["labels"][n]] = 1
        annotated = torch.stack([batch["annotated"][n] for n in members]).to(torch.int64)
        cache[key] = (table.view(len(members) * P, k + 1), ids, labels, annotated)
    return cache[key]


def label_areas(batch, n_concepts):
    """Per concept, the number of annotated pixels in the batch (image-level: whole image)."""
    out = torch.zeros(n_concepts, dtype=torch.int64)
    for j in range(len(batch["ids"])):
        ids = batch["ids"][j]
        if len(ids):
            out.index_add_(0, ids, batch["masks"][j].sum(1).to(torch.int64))
        labels = batch["labels"][j]
        if len(labels):
            P = batch["hw"][j][0] * batch["hw"][j][1]
            out.index_add_(0, labels, torch.full((len(labels),), P, dtype=torch.int64))
    return out


def iou_matrix(inter, unit_area, label_area, concept_cat):
    """IoU = I / (|M_k| over images where c's category is annotated + |L_c| − I)."""
    union = unit_area[:, concept_cat] + label_area[None, :] - inter
    iou = torch.where(union > 0, inter.double() / union.clamp_min(1).double(),
                      torch.zeros((), dtype=torch.float64))
    return iou.float()


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class UnitRecord:
    """One unit's dissection label."""

    unit: int  #: channel index in the layer
    concept: str  #: best-IoU concept
    category: str  #: that concept's category
    iou: float  #: its IoU
    threshold: float  #: the unit's activation threshold T_k


class DissectionResult:
    """What :func:`dissect` found: per layer, per unit, the best concept and its IoU.

    ``units(layer)`` lists every unit, ``detectors(layer)`` the units whose IoU passes
    ``iou_threshold``; ``summary()`` counts detectors by category; ``iou(layer)`` is the full
    units × concepts IoU matrix; ``top_images(layer, unit)`` the indices of the images where the
    unit fires most, and ``unit_mask(layer, unit, rank, size)`` its binarised map on one of them.
    ``save(path)`` / ``DissectionResult.load(path)`` round-trip it losslessly (npz + json).
    """

    def __init__(self, layers, concepts, categories, data, *, quantile, iou_threshold,
                 n_images, dataset=None, model_name=""):
        self.layers = list(layers)
        self.concepts = list(concepts)
        self.categories = dict(categories)
        self.data = data  # layer → dict of numpy arrays
        self.quantile = float(quantile)
        self.iou_threshold = float(iou_threshold)
        self.n_images = int(n_images)
        self.dataset = dataset or {}
        self.model_name = model_name

    def __repr__(self) -> str:
        counts = ", ".join(f"{l}: {len(self.detectors(l))}/{len(self.data[l]['threshold'])}"
                           for l in self.layers)
        return (f"DissectionResult({self.n_images} images, {len(self.concepts)} concepts; "
                f"detectors {counts})")

    def _check(self, layer):
        if layer not in self.data:
            raise ValueError(f"no layer {layer!r} in this result; it has {self.layers}")
        return self.data[layer]

    @property
    def category_names(self) -> list[str]:
        return list(dict.fromkeys(self.categories[c] for c in self.concepts))

    def iou(self, layer) -> np.ndarray:
        """Units × concepts IoU matrix (float32)."""
        return self._check(layer)["iou"]

    def thresholds(self, layer) -> np.ndarray:
        return self._check(layer)["threshold"]

    def units(self, layer, sort: str = "unit") -> list[UnitRecord]:
        """One record per unit (``sort="iou"``: best IoU first)."""
        d = self._check(layer)
        iou = d["iou"]
        best = iou.argmax(1) if iou.shape[1] else np.zeros(len(iou), int)
        records = []
        for k in range(iou.shape[0]):
            # a unit that overlaps no concept at all has no label
            c = self.concepts[best[k]] if iou.shape[1] and iou[k, best[k]] > 0 else ""
            records.append(UnitRecord(k, c, self.categories.get(c, ""),
                                      float(iou[k, best[k]]) if iou.shape[1] else 0.0,
                                      float(d["threshold"][k])))
        if sort == "iou":
            records.sort(key=lambda r: (-r.iou, r.unit))
        elif sort != "unit":
            raise ValueError(f"sort must be 'unit' or 'iou', not {sort!r}")
        return records

    def detectors(self, layer, sort: str = "iou") -> list[UnitRecord]:
        """Units whose best IoU is at least ``iou_threshold``, best first."""
        return [r for r in self.units(layer, sort) if r.iou >= self.iou_threshold]

    def summary(self) -> dict:
        """layer → {category: number of detectors, ..., "concepts": distinct detected concepts}."""
        out = {}
        for layer in self.layers:
            dets = self.detectors(layer)
            counts = {cat: 0 for cat in self.category_names}
            for r in dets:
                counts[r.category] += 1
            counts["concepts"] = len({r.concept for r in dets})
            out[layer] = counts
        return out

    def top_images(self, layer, unit) -> list[int]:
        """Indices (into the data set) of the images where the unit's maximum is highest."""
        idx = self._check(layer)["top_index"][int(unit)]
        return [int(i) for i in idx if i >= 0]

    def unit_map(self, layer, unit, rank: int = 0) -> np.ndarray:
        """The unit's native-resolution map on its ``rank``-th top image (h×w)."""
        d = self._check(layer)
        h, w = d["map_shape"]
        return d["top_maps"][int(unit), int(rank)].reshape(h, w)

    def unit_mask(self, layer, unit, rank: int = 0, size=None) -> np.ndarray:
        """The unit's binarised map ``M_k`` on its ``rank``-th top image, upsampled bilinearly
        to ``size`` (h, w) exactly as in the tally."""
        d = self._check(layer)
        m = torch.from_numpy(self.unit_map(layer, unit, rank).astype(np.float32))[None, None]
        size = tuple(size) if size is not None else tuple(d["map_shape"])
        up = upsample(m, size)[0]  # 1×P
        t = torch.tensor([float(d["threshold"][unit])])
        lo = torch.tensor([float(d["minimum"][unit])])
        return binarize(up, t, lo)[0].reshape(size).numpy()

    # ------------------------------------------------------------------ persistence
    _ARRAYS = ("iou", "threshold", "minimum", "top_index", "top_scores", "top_maps",
               "inter", "unit_area", "label_area", "map_shape")

    def save(self, path) -> Path:
        """Write the result to ``path`` (``.npz``; the metadata travels inside as json) and
        return where it went: ``.npz`` is added to a name without it, and a path that is an
        existing folder gets a ``dissection.npz`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / DEFAULT_FILE
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        meta = {"format": 1, "layers": self.layers, "concepts": self.concepts,
                "categories": self.categories, "quantile": self.quantile,
                "iou_threshold": self.iou_threshold, "n_images": self.n_images,
                "dataset": self.dataset, "model_name": self.model_name}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for i, layer in enumerate(self.layers):
            for key in self._ARRAYS:
                arrays[f"{i}/{key}"] = np.asarray(self.data[layer][key])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "DissectionResult":
        """Read a result written by :meth:`save` (``path`` may omit ``.npz``, or be the folder it
        was saved into). Everything is checked at load — the archive, the metadata, every
        array's presence, type and shape — and a file that fails any check (corrupt, truncated,
        written by something else) raises one :class:`DissectionFileError` naming the file and
        what is wrong. Pickled objects are never loaded."""
        path = Path(path)
        if path.is_dir() and (path / DEFAULT_FILE).is_file():
            path = path / DEFAULT_FILE
        elif not path.exists() and path.with_suffix(path.suffix + ".npz").is_file():
            path = path.with_suffix(path.suffix + ".npz")
        meta, arrays = _read_result_file(path)
        return cls(meta["layers"], meta["concepts"], meta["categories"], arrays,
                   quantile=meta["quantile"], iou_threshold=meta["iou_threshold"],
                   n_images=meta["n_images"], dataset=meta.get("dataset") or {},
                   model_name=meta.get("model_name", ""))

    def equals(self, other: "DissectionResult") -> bool:
        """Same layers, concepts and arrays, bit for bit."""
        if (self.layers, self.concepts, self.categories) != (other.layers, other.concepts,
                                                             other.categories):
            return False
        return all(np.array_equal(self.data[l][k], other.data[l][k])
                   for l in self.layers for k in self._ARRAYS)


#: the file name :meth:`DissectionResult.save` uses inside a folder
DEFAULT_FILE = "dissection.npz"
#: the result file format :meth:`DissectionResult.save` writes (``meta["format"]``)
FORMAT = 1


class DissectionFileError(ValueError):
    """A file that is not a readable dissection result: corrupt, truncated, or not written by
    :meth:`DissectionResult.save`. The message names the file and what is wrong with it."""


def _file_error(path: Path, what: str) -> DissectionFileError:
    return DissectionFileError(
        f"{str(path)!r} is not a readable dissection result: {what}. A result file is written "
        "by result.save(path) after cw.dissect(...); run the dissection again to remake it")


def _read_result_file(path: Path) -> tuple[dict, dict]:
    """``(meta, layer → dict of arrays)`` of a saved result, every part checked
    (:func:`_check_meta`, :func:`_check_arrays`)."""
    if not path.exists():
        raise FileNotFoundError(f"no dissection result at {str(path)!r} (nor with .npz added)")
    if path.is_dir():
        raise _file_error(path, f"it is a folder without a {DEFAULT_FILE} inside")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise _file_error(path, "the file is empty")
    if head[:2] != b"PK":
        raise _file_error(path, f"it is not an .npz archive (it starts with {head!r}, not 'PK')")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if "meta" not in names:
                raise _file_error(path, "it has no 'meta' entry, so it was not written by "
                                  f"DissectionResult.save (it holds {sorted(names)[:6]})")
            meta = _check_meta(path, z["meta"])
            wanted = [f"{i}/{key}" for i in range(len(meta["layers"]))
                      for key in DissectionResult._ARRAYS]
            missing = [k for k in wanted if k not in names]
            if missing:
                raise _file_error(path, f"arrays {missing[:4]} are missing")
            raw = {k: z[k] for k in wanted}
    except DissectionFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # numpy's "Object arrays cannot be loaded…": never loaded here
            raise _file_error(path, "it holds pickled Python objects, which are never loaded "
                              "(a result holds plain numeric arrays only)") from None
        raise _file_error(path, f"the archive is damaged ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise _file_error(path, f"the archive is damaged or truncated "
                          f"({type(exc).__name__}: {exc})") from None
    return meta, _check_arrays(path, meta, raw)


def _check_meta(path: Path, raw: np.ndarray) -> dict:
    """The metadata json of a result file, its keys and types checked."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _file_error(path, f"its 'meta' entry is a {raw.dtype} array of shape {raw.shape}, "
                          "not the json text (uint8 bytes) save() writes")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _file_error(path, f"its metadata is not valid json ({exc})") from None
    if not isinstance(meta, dict):
        raise _file_error(path, f"its metadata is a json {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        newer = isinstance(meta.get("format"), int) and meta["format"] > FORMAT
        raise _file_error(path, f"its format is {meta.get('format')!r}, this cnnwidgets reads "
                          f"format {FORMAT}" + (" (the file is from a newer cnnwidgets: "
                                                "upgrade it to read the file)" if newer else ""))
    number = (int, float)
    expected = {"layers": list, "concepts": list, "categories": dict, "quantile": number,
                "iou_threshold": number, "n_images": int}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise _file_error(path, f"its metadata's {key!r} is {meta.get(key)!r}, not a "
                              f"{kind.__name__ if isinstance(kind, type) else 'number'}")
    if not all(isinstance(v, str) for v in meta["layers"] + meta["concepts"]):
        raise _file_error(path, "its layers and concepts must be names (strings)")
    if len(set(meta["layers"])) != len(meta["layers"]):
        raise _file_error(path, f"its layers repeat: {meta['layers']}")
    unknown = [c for c in meta["concepts"] if not isinstance(meta["categories"].get(c), str)]
    if unknown:
        raise _file_error(path, f"concepts {unknown[:5]} have no category")
    return meta


def _check_arrays(path: Path, meta: dict, raw: dict) -> dict:
    """layer → dict of arrays, each array's type and shape checked against the metadata and
    the layer's number of units (the length of its thresholds)."""
    K = len(meta["concepts"])
    n_cats = len(dict.fromkeys(meta["categories"][c] for c in meta["concepts"]))
    data = {}
    for i, layer in enumerate(meta["layers"]):
        d = {key: raw[f"{i}/{key}"] for key in DissectionResult._ARRAYS}
        # the sizes the other arrays are checked against
        for key, ndim, what in (("threshold", 1, "one value per unit"),
                                ("top_index", 2, "units × top images"),
                                ("map_shape", 1, "(h, w)")):
            if d[key].ndim != ndim:
                raise _file_error(path, f"layer {layer!r}: {key!r} has shape "
                                  f"{tuple(d[key].shape)}, not {ndim}-D ({what})")
        C, n = d["threshold"].shape[0], d["top_index"].shape[1]
        shape = d["map_shape"]
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape <= 0).any():
            raise _file_error(path, f"layer {layer!r}: map_shape {shape.tolist()} is not a "
                              "positive (h, w)")
        hw = int(shape[0]) * int(shape[1])
        expected = {  # key: (shape, kinds of dtype, what the dimensions are)
            "threshold": ((C,), "f", "units"), "minimum": ((C,), "f", "units"),
            "iou": ((C, K), "f", "units × concepts"),
            "top_index": ((C, n), "iu", "units × top images"),
            "top_scores": ((C, n), "f", "units × top images"),
            "top_maps": ((C, n, hw), "f", "units × top images × map pixels"),
            "inter": ((C, K), "iu", "units × concepts"),
            "unit_area": ((C, n_cats), "iu", "units × categories"),
            "label_area": ((K,), "iu", "concepts"), "map_shape": ((2,), "iu", "(h, w)"),
        }
        for key, (want, kinds, what) in expected.items():
            a = d[key]
            if a.dtype.kind not in kinds:
                raise _file_error(path, f"layer {layer!r}: {key!r} holds {a.dtype} values, not "
                                  + ("integers" if kinds == "iu" else "floats"))
            if tuple(a.shape) != want:
                raise _file_error(path, f"layer {layer!r}: {key!r} has shape {tuple(a.shape)}, "
                                  f"expected {want} ({what}: {C} units from its thresholds, "
                                  f"{K} concepts and {n_cats} categories from the metadata)")
        data[layer] = d
    return data


# ----------------------------------------------------------------------------- dissect: its parts


class _Shard:
    """This rank's shard of the data set, ``indices[rank::world_size]``, read in batches, and the
    model's forward pass to the dissected layers' feature maps (both passes use them)."""

    def __init__(self, model: Model, dataset, layers, table, *, batch_size, num_workers, device):
        self.model, self.dataset, self.layers, self.table = model, dataset, layers, table
        self.rank, world = _dist()
        self.indices = range(self.rank, len(dataset), world)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device = torch.device(device) if device is not None else model.device
        self.bar: Progress | None = None  # set by dissect: both passes' cancel and progress

    def batches(self, desc: str, with_images: bool, with_masks: bool):
        """The shard's batches in index order (see :func:`_collate`); cancellation is checked
        before each batch and progress counted in images after it (``self.bar``)."""
        items = _Items(self.dataset, self.indices, *self.table, with_masks=with_masks,
                       with_images=with_images)
        loader = torch.utils.data.DataLoader(items, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, collate_fn=_collate)
        if self.bar is None:
            yield from loader
            return
        self.bar.describe(desc)
        for batch in self.bar.each(loader):
            yield batch
            self.bar.advance(len(batch["index"]))

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 N×3×H×W images → layer → its N×C×h×w feature maps (float32, on the CPU)."""
        x = images.to(device=self.device, dtype=torch.float32) / 255.0
        x = self.model.normalize(x)
        with capture(self.model.module, self.layers) as rec:
            self.model.scores(x)
        missing = [l for l in self.layers if l not in rec.outputs or rec.outputs[l].ndim != 4]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not output a feature map N×C×h×w")
        return {l: rec.outputs[l].to("cpu", torch.float32) for l in self.layers}

    def first_image_features(self) -> dict[str, torch.Tensor]:
        """The feature maps of the data set's first image (a rank without images learns the
        layers' shapes from them)."""
        item = _collate([_Items(self.dataset, [0], *self.table, with_masks=False)[0]])
        return self.features(item["image"])


class _Scratch:
    """The activations of pass 1 kept for pass 2: one raw float32 file per layer in a temporary
    folder (``parent``, or the system's), appended to a batch at a time in pass 1, read back
    in the same order in pass 2, and deleted with its folder when the ``with`` block ends."""

    def __init__(self, layers, parent=None):
        self.layers = list(layers)
        self.folder = Path(tempfile.mkdtemp(prefix="cw-dissect-",
                                            dir=str(parent) if parent else None))
        self.files: dict = {}  # layer → open file, written in pass 1, read in pass 2
        self.shapes: dict = {}  # layer → C×h×w

    def _path(self, layer) -> Path:
        return self.folder / f"{self.layers.index(layer)}.f32"

    def write(self, acts: dict[str, torch.Tensor]):
        """Append a batch's feature maps (layer → N×C×h×w float32)."""
        for layer, act in acts.items():
            if layer not in self.files:
                self.files[layer] = open(self._path(layer), "wb")
                self.shapes[layer] = tuple(act.shape[1:])
            self.files[layer].write(act.contiguous().numpy().tobytes())

    def rewind(self):
        """End the writing; :meth:`read` then starts from the first batch."""
        self._close()
        self.files = {layer: open(self._path(layer), "rb") for layer in self.shapes}

    def read(self, n: int) -> dict[str, torch.Tensor]:
        """The next batch of ``n`` images: layer → N×C×h×w."""
        acts = {}
        for layer, f in self.files.items():
            shape = (n, *self.shapes[layer])
            data = np.fromfile(f, np.float32, count=int(np.prod(shape)))
            acts[layer] = torch.from_numpy(data).reshape(shape)
        return acts

    def _close(self):
        for f in self.files.values():
            f.close()
        self.files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _layer_list(model: Model, layers) -> list[str]:
    """``layers`` (a name or a list of them) as a list without repeats, each checked."""
    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("give at least one layer to dissect (model.layers() lists them)")
    for layer in layers:
        model.check_layer(layer)
    return layers


def _fingerprint(model: Model, dataset, layers, quantile, iou_threshold, extra) -> str:
    h = hashlib.blake2b(digest_size=12)
    hash_weights(h, model.module)
    spec = dataset.spec() if hasattr(dataset, "spec") else {"class": type(dataset).__name__}
    h.update(json.dumps([spec, len(dataset), list(dataset.concepts), list(layers),
                         float(quantile), float(iou_threshold), model.mean, model.std,
                         extra]).encode())
    return h.hexdigest()


def _cache_file(cache_dir, model: Model, dataset, layers, quantile, iou_threshold,
                extra) -> Path | None:
    """Where the result of these arguments is cached (the folder is made), or None."""
    if cache_dir is None:
        return None
    key = _fingerprint(model, dataset, layers, quantile, iou_threshold, extra)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return Path(cache_dir) / f"dissection-{key}.npz"


# ----------------------------------------------------------------------------- dissect: its steps


def _threshold_pass(shard: _Shard, scratch: _Scratch | None, quantile, max_values,
                    top_n) -> tuple[dict, dict]:
    """Pass 1: every layer's :class:`_Thresholds` fed the shard's activations (also written to
    ``scratch`` unless it is None), merged across ranks. Returns (layer → _Thresholds,
    layer → (thresholds, minima))."""
    n_images = len(shard.dataset)
    state: dict[str, _Thresholds] = {}

    def add(layer, act):
        state[layer] = _Thresholds(n_images, tuple(act.shape[1:]), quantile, max_values, top_n)

    for batch in shard.batches("dissect: pass 1/2", with_images=True, with_masks=False):
        acts = shard.features(batch["image"])
        for layer, act in acts.items():
            if layer not in state:
                add(layer, act)
            state[layer].update(act, batch["index"])
        if scratch is not None:
            scratch.write(acts)
    if not state:  # this rank had no images
        for layer, act in shard.first_image_features().items():
            add(layer, act)
    return state, {l: state[l].finish() for l in shard.layers}


def _tally_pass(shard: _Shard, scratch: _Scratch | None, state, thresholds, n_concepts,
                n_categories) -> tuple[dict, torch.Tensor]:
    """Pass 2: every layer's :class:`_Tally` over the shard, the activations read back from
    ``scratch`` (or, when it is None, computed again). Returns (layer → _Tally, the concepts'
    label areas), this rank's part."""
    tallies = {l: _Tally(state[l].C, n_concepts, n_categories) for l in shard.layers}
    label_area = torch.zeros(n_concepts, dtype=torch.int64)
    if scratch is not None:
        scratch.rewind()
    for batch in shard.batches("dissect: pass 2/2", with_images=scratch is None,
                               with_masks=True):
        if scratch is None:
            acts = shard.features(batch["image"])
        else:
            acts = scratch.read(len(batch["index"]))
        label_area += label_areas(batch, n_concepts)
        for l in shard.layers:
            tallies[l].update(acts[l], *thresholds[l], batch)
    return tallies, label_area


def _assemble(layers, state, thresholds, tallies, label_area, concept_cat) -> dict:
    """The result's arrays per layer (see ``DissectionResult._ARRAYS``), tallies summed across
    ranks."""
    label_area = _all_reduce(label_area)
    data = {}
    for l in layers:
        inter = _all_reduce(tallies[l].inter)
        unit_area = _all_reduce(tallies[l].unit_area)
        s = state[l]
        t, lo = thresholds[l]
        data[l] = {
            "iou": iou_matrix(inter, unit_area, label_area, concept_cat).numpy(),
            "threshold": t.numpy().astype(np.float32),
            "minimum": lo.numpy().astype(np.float32),
            "top_index": s.top_index.numpy(),
            "top_scores": s.top_scores.numpy().astype(np.float32),
            "top_maps": s.top_maps.numpy().astype(np.float32),
            "inter": inter.numpy(),
            "unit_area": unit_area.numpy(),
            "label_area": label_area.numpy(),
            "map_shape": np.array(s.shape[1:], np.int64),
        }
    return data


def dissect(
    model,
    dataset,
    layers,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir=None,
    cancel=None,
    progress=None,
    top_n: int = 8,
    max_values: int = 2**22,
    features: str = "disk",
    device=None,
) -> DissectionResult:
    """Dissect ``layers`` of ``model`` on a concept data set (see the module docstring).

    ``layers``: a layer name or a list of them (``model.layers()`` lists the names).
    ``quantile``: top fraction of each unit's activations that counts as "on" (0.005).
    ``iou_threshold``: a unit is a detector of its best concept when IoU ≥ this (0.04).
    ``batch_size``, ``num_workers``: the ``DataLoader`` that reads the data set.
    ``cache_dir``: a folder where the finished result is saved under a key made from the model's
    weights, the data set and the settings; calling again with the same arguments loads it
    instead of recomputing (so a notebook or the explorer can reopen it).
    ``top_n``: images kept per unit for the explorer. ``max_values``: bound on the number of
    top values kept per layer in pass 1. ``features``: ``"disk"`` (run the model once and stream
    the activations through a scratch file) or ``"recompute"`` (run it twice, write nothing).
    ``cancel``: a ``threading.Event`` (or a callable returning True) that stops the run before
    its next batch with :class:`cnnwidgets.Cancelled`; the model is left as it was and the
    scratch file deleted. ``progress``: ``None`` shows a bar once the run has lasted a second,
    ``True`` / ``False`` force it, a callable ``f(done, total)`` is called after each batch
    instead, counting images over both passes (``total`` = 2 × the images of this rank's
    shard). Under ``torch.distributed`` each rank takes a shard and the result (identical on
    all ranks) is merged across them; only rank 0 shows a bar, and a ``cancel`` must be set on
    every rank.
    """
    model = as_model(model, "cw.dissect")
    check_cancel(cancel)
    layers = _layer_list(model, layers)
    who = "cw.dissect"
    quantile = check_float(quantile, "quantile", 0, 1, low_open=True, high_open=True, who=who)
    iou_threshold = check_float(iou_threshold, "iou_threshold", 0, 1, who=who)
    batch_size = check_int(batch_size, "batch_size", 1, None, who=who)
    num_workers = check_int(num_workers, "num_workers", 0, None, who=who)
    top_n = check_int(top_n, "top_n", 1, None, who=who)
    max_values = check_int(max_values, "max_values", 1, None, who=who)
    progress = check_progress(progress, who=who)
    if features not in ("disk", "recompute"):
        raise ValueError(f"features must be 'disk' or 'recompute', not {features!r}")
    concepts, cats, cat_names = concept_table(dataset)
    if len(dataset) == 0:
        raise ValueError("the data set is empty")
    cache_file = _cache_file(cache_dir, model, dataset, layers, quantile, iou_threshold,
                             [top_n, max_values])
    if cache_file is not None and cache_file.exists():
        return DissectionResult.load(cache_file)

    shard = _Shard(model, dataset, layers, (concepts, cats, cat_names), batch_size=batch_size,
                   num_workers=num_workers, device=device)
    scratch = _Scratch(layers, cache_dir) if features == "disk" else None
    shard.bar = Progress(2 * len(shard.indices), "dissect", cancel=cancel, progress=progress,
                         what="dissect", show=shard.rank == 0)
    with shard.bar, scratch or contextlib.nullcontext(), restored(model.module), \
            cancel_points(cancel, "dissect"), torch.no_grad():
        state, thresholds = _threshold_pass(shard, scratch, quantile, max_values, top_n)
        tallies, label_area = _tally_pass(shard, scratch, state, thresholds, len(concepts),
                                          len(cat_names))
    concept_cat = torch.as_tensor([cat_names.index(c) for c in cats], dtype=torch.int64)
    data = _assemble(layers, state, thresholds, tallies, label_area, concept_cat)
    spec = dataset.spec() if hasattr(dataset, "spec") else {"class": type(dataset).__name__}
    result = DissectionResult(layers, concepts, dict(zip(concepts, cats)), data,
                              quantile=quantile, iou_threshold=iou_threshold,
                              n_images=len(dataset), dataset=spec, model_name=model.name)
    if cache_file is not None and shard.rank == 0:
        result.save(cache_file)
    return result
