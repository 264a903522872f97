"""Boxes from maps, and how well they fit the true ones: the weakly supervised localisation
measures of the CAM paper, of CNN Fixations and of Choe et al.

Coordinates are pixel edges, ``(x0, y0, x1, y1)`` with ``x1`` and ``y1`` excluded: the box of
one pixel at column ``x``, row ``y`` is ``(x, y, x + 1, y + 1)`` (as
:func:`cnnwidgets.metrics.pointing_game` reads boxes).

* :func:`box_from_map` — the CAM paper's rule (Zhou et al., CVPR 2016, §3.1): scale the map to
  [0, 1] (min–max, as Choe et al.'s code does), keep the pixels at or above ``threshold``
  (20% of the maximum by default), take the largest connected component (8-connected, by
  pixel count; ties: the one met first in reading order) and return its bounding box.
  ``component="all"`` returns the box of every component instead (Choe et al.'s
  multi-contour boxes).
* :func:`box_around_points` — CNN Fixations' box (Mopuri et al.): the smallest box holding
  every kept fixation point.
* :func:`box_iou` / :func:`iou_matrix` — intersection over union of boxes.
* :func:`box_hits` / :func:`max_box_acc` — MaxBoxAcc (Choe et al., "Evaluating weakly
  supervised object localization methods right", CVPR 2020): at each threshold τ of a grid the
  box from the map is correct when its IoU with some true box reaches δ; BoxAcc(τ, δ) is the
  share of images where it is; MaxBoxAcc(δ) = max over τ — so methods are compared whatever
  threshold suits each. MaxBoxAccV2 averages δ ∈ {0.3, 0.5, 0.7} and takes the best of all
  components' boxes. :func:`box_hits` gives one image's hits (a bool τ × δ table); summing them
  over images gives the counts, which add up exactly across shards and processes.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DELTAS", "box_around_points", "box_from_map", "box_hits", "box_iou",
           "boxes_mask", "default_thresholds", "iou_matrix", "max_box_acc", "scaled_map"]

#: the IoU levels of MaxBoxAccV2 (Choe et al. 2020); MaxBoxAcc is δ = 0.5
DELTAS = (0.3, 0.5, 0.7)


def default_thresholds(n: int = 100) -> np.ndarray:
    """The threshold grid τ = 0, 1/n, …, (n − 1)/n (Choe et al.: steps of 0.01)."""
    return np.arange(int(n), dtype=np.float64) / int(n)


def scaled_map(heat) -> np.ndarray:
    """The map min–max scaled to [0, 1] (float64); a flat map becomes all zeros."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    if heat.ndim != 2:
        raise ValueError(f"expected an H×W map, not an array of shape {heat.shape}")
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage  # a dependency of scikit-image

    return ndimage.label(mask, structure=np.ones((3, 3), bool))


def _component_boxes(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count×4 boxes, count areas) of the labelled components 1 … count."""
    from scipy import ndimage

    slices = ndimage.find_objects(labels, count)
    boxes = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices],
                     dtype=np.float64).reshape(-1, 4)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return boxes, areas


def box_from_map(heat, threshold: float = 0.2, *, component: str = "largest"):
    """The box the CAM paper draws from a map (see the module docstring): ``(x0, y0, x1, y1)``
    as floats, or ``None`` when no pixel reaches ``threshold``; with ``component="all"`` an
    array K×4 of every component's box (K may be 0)."""
    if component not in ("largest", "all"):
        raise ValueError(f"component must be 'largest' or 'all', not {component!r}")
    labels, count = _components(scaled_map(heat) >= float(threshold))
    boxes, areas = _component_boxes(labels, count)
    if component == "all":
        return boxes
    if count == 0:
        return None
    return tuple(float(v) for v in boxes[int(np.argmax(areas))])


def box_around_points(points):
    """The smallest box holding every point (N×2 of (row, col) pixel indices), as
    ``(x0, y0, x1, y1)`` pixel edges; ``None`` without points."""
    p = np.asarray(points).reshape(-1, 2)
    if len(p) == 0:
        return None
    return (float(p[:, 1].min()), float(p[:, 0].min()), float(p[:, 1].max() + 1),
            float(p[:, 0].max() + 1))


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every box of ``a`` (N×4) with every box of ``b`` (M×4): N×M float64."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    w = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    h = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = w * h
    area = lambda z: (z[..., 2] - z[..., 0]).clip(0) * (z[..., 3] - z[..., 1]).clip(0)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_iou(a, b) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)``; 0 when either is ``None``."""
    if a is None or b is None:
        return 0.0
    return float(iou_matrix(a, b)[0, 0])


def best_iou(box, truth) -> float:
    """The largest IoU of ``box`` with any of the true boxes (K×4); 0 without either."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    if box is None or len(truth) == 0:
        return 0.0
    return float(iou_matrix(box, truth).max())


def boxes_mask(boxes, shape) -> np.ndarray:
    """Boolean H×W mask of the pixels whose centres lie in any of the boxes."""
    h, w = shape
    rows = np.arange(h)[:, None] + 0.5
    cols = np.arange(w)[None, :] + 0.5
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask |= (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return mask


def box_hits(heat, truth, thresholds=None, deltas=DELTAS) -> tuple[np.ndarray, np.ndarray]:
    """One image's MaxBoxAcc hits: ``(largest, best)``, two bool arrays τ × δ. ``largest``:
    the largest component's box (the CAM rule) reaches IoU ≥ δ with a true box at threshold
    τ; ``best``: some component's box does (MaxBoxAccV2's multi-contour boxes)."""
    thresholds = default_thresholds() if thresholds is None else np.asarray(thresholds, float)
    deltas = np.asarray(deltas, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    scaled = scaled_map(heat)
    largest = np.zeros((len(thresholds), len(deltas)), bool)
    best = np.zeros_like(largest)
    if len(truth) == 0:
        return largest, best
    previous = None
    for i, t in enumerate(thresholds):
        mask = scaled >= t
        if previous is not None and np.array_equal(mask, previous):
            largest[i], best[i] = largest[i - 1], best[i - 1]  # the same boxes
            continue
        previous = mask
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            continue  # nothing on: no box, no hit (and none at higher thresholds)
        # label only the mask's bounding region (it shrinks as τ rises), then shift back
        r0, c0 = rows[0], cols[0]
        labels, count = _components(mask[r0:rows[-1] + 1, c0:cols[-1] + 1])
        if count:
            boxes, areas = _component_boxes(labels, count)
            boxes += (c0, r0, c0, r0)
            ious = iou_matrix(boxes, truth).max(1)  # per component, its best true box
            largest[i] = ious[int(np.argmax(areas))] >= deltas
            best[i] = ious.max() >= deltas
    return largest, best


def max_box_acc(hits: np.ndarray, n: int, thresholds=None) -> tuple[np.ndarray, np.ndarray]:
    """From summed hits (τ × δ counts over ``n`` images): per δ, ``(MaxBoxAcc, the best τ)``
    — the largest share over the thresholds, and the first threshold that reaches it."""
    hits = np.asarray(hits, dtype=np.float64)
    thresholds = default_thresholds(hits.shape[0]) if thresholds is None else \
        np.asarray(thresholds, float)
    if n <= 0:
        return np.full(hits.shape[1], np.nan), np.full(hits.shape[1], np.nan)
    acc = hits / n
    return acc.max(0), thresholds[acc.argmax(0)]
