"""The result of CNN Fixations: the points, their per-layer trace, the heat map and the
authors' outlier removal."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from ..checks import check_float


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
    #: class index the backtrack started from (or the target as it can be passed again: a
    #: list of classes, a ``cw.targets.Region`` with its mask, a ``Box``), and its label
    target: object
    label: str
    #: (H, W) of the network input, = ``model.prepare(image)[1].shape[:2]``
    image_size: tuple
    #: the target's score (a logit) and probability in the forward pass (:mod:`..targets`)
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
        sigma = self.default_sigma() if sigma is None else check_float(
            sigma, "sigma", 0, None, who="Fixations.heatmap")
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
