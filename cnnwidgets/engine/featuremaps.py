"""Feature maps of one layer, with the per-channel statistics the explorer sorts by."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model import Model

SORT_KEYS = ("mean", "max", "index")


@dataclass
class FeatureMaps:
    """One layer's output for one image, as numpy arrays."""

    layer: str  #: the layer's qualified name
    maps: np.ndarray  #: C×h×w float32 activations
    mean: np.ndarray = field(init=False)  #: C, spatial mean of each map
    max: np.ndarray = field(init=False)  #: C, spatial maximum of each map

    def __post_init__(self):
        self.maps = np.ascontiguousarray(self.maps, dtype=np.float32)
        flat = self.maps.reshape(self.maps.shape[0], -1)
        self.mean = flat.mean(axis=1)
        self.max = flat.max(axis=1)

    @property
    def channels(self) -> int:
        return int(self.maps.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of each map."""
        return int(self.maps.shape[1]), int(self.maps.shape[2])

    def order(self, by: str = "mean") -> np.ndarray:
        """Channel indices sorted by ``by`` ('mean' or 'max': strongest first; 'index')."""
        if by == "index":
            return np.arange(self.channels)
        if by not in SORT_KEYS:
            raise ValueError(f"sort by one of {SORT_KEYS}, not {by!r}")
        values = self.mean if by == "mean" else self.max
        return np.argsort(-values, kind="stable")

    def peak(self, channel: int) -> tuple[int, int]:
        """(row, col) of the channel's strongest activation."""
        idx = int(np.argmax(self.maps[channel]))
        return divmod(idx, self.maps.shape[2])

    def top_channels(self, row: int, col: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` channels that fire most at (row, col): (channel indices, values)."""
        h, w = self.grid
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"position ({row}, {col}) is outside the {h}×{w} map")
        values = self.maps[:, row, col]
        k = min(int(k), values.size)
        idx = np.argpartition(-values, k - 1)[:k]
        idx = idx[np.argsort(-values[idx], kind="stable")]
        return idx, values[idx]

    def value_range(self, percentile: float = 99.5) -> tuple[float, float]:
        """A robust (low, high) range over the whole layer, for a shared colour scale."""
        flat = self.maps.ravel()
        if flat.size > 100_000:  # a strided sample is plenty for a colour scale, and fast
            flat = flat[:: flat.size // 100_000]
        lo, hi = (float(v) for v in np.percentile(flat, [100 - percentile, percentile]))
        lo = min(lo, 0.0)
        if hi <= lo:
            hi = lo + 1e-6
        return lo, hi


def feature_maps(model: Model, image, layer: str) -> FeatureMaps:
    """The feature maps of ``layer`` for ``image`` (through the model's activation cache)."""
    act = model.activations(image, layer)
    if act.ndim != 3:
        raise ValueError(
            f"layer {layer!r} outputs a tensor of shape {tuple(act.shape)}, not C×h×w feature maps; "
            "pick a convolution-like layer from model.layers()"
        )
    return FeatureMaps(layer, act.numpy())
