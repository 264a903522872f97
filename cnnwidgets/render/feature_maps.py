"""Drawing feature maps: a tiled grid, an enlarged map over the image, a channel bar chart.

matplotlib and numpy only. ``draw_*`` functions create artists on an Axes they are given and
return them; ``update_*`` functions change those artists in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle


@dataclass
class GridLayout:
    """Where each tile of a feature-map mosaic lies."""

    rows: int  #: number of tile rows
    cols: int  #: number of tile columns
    h: int  #: tile height (pixels of the map)
    w: int  #: tile width
    pad: int  #: gap between tiles
    count: int  #: number of tiles actually filled

    def tile_at(self, x: float, y: float) -> int | None:
        """Index of the tile under data coordinates (x, y), or None in a gap or outside."""
        if x < 0 or y < 0:
            return None
        col, dx = divmod(int(x), self.w + self.pad)
        row, dy = divmod(int(y), self.h + self.pad)
        if dx >= self.w or dy >= self.h or col >= self.cols or row >= self.rows:
            return None
        index = row * self.cols + col
        return index if index < self.count else None

    def origin(self, index: int) -> tuple[int, int]:
        """(x, y) of the top-left corner of tile ``index``."""
        row, col = divmod(index, self.cols)
        return col * (self.w + self.pad), row * (self.h + self.pad)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows * (self.h + self.pad) - self.pad, self.cols * (self.w + self.pad) - self.pad)


def grid_layout(count: int, h: int, w: int, aspect: float = 1.0) -> GridLayout:
    """A near-square (times ``aspect`` wide) arrangement of ``count`` h×w tiles."""
    pad = 1 if max(h, w) <= 16 else 2
    cols = max(1, int(np.ceil(np.sqrt(count * aspect * h / w))))
    rows = max(1, int(np.ceil(count / cols)))
    return GridLayout(rows, cols, h, w, pad, count)


def mosaic(maps: np.ndarray, layout: GridLayout) -> np.ndarray:
    """Tile ``maps`` (N×h×w) into one 2-D array; gaps are NaN (drawn transparent)."""
    out = np.full(layout.shape, np.nan, dtype=np.float32)
    n = min(len(maps), layout.count)
    if n == 0:
        return out
    # place whole rows of tiles with one reshape each instead of a loop per tile
    full = np.full((layout.rows * layout.cols, layout.h, layout.w), np.nan, dtype=np.float32)
    full[:n] = maps[:n]
    tiles = full.reshape(layout.rows, layout.cols, layout.h, layout.w)
    padded = np.full((layout.rows, layout.h + layout.pad, layout.cols, layout.w + layout.pad),
                     np.nan, dtype=np.float32)
    padded[:, : layout.h, :, : layout.w] = tiles.transpose(0, 2, 1, 3)
    flat = padded.reshape(layout.rows * (layout.h + layout.pad), layout.cols * (layout.w + layout.pad))
    out[:] = flat[: layout.shape[0], : layout.shape[1]]
    return out


def draw_grid(ax: Axes, tiles: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis"):
    """Draw a mosaic; returns (image artist, selection rectangle)."""
    ax.set_axis_off()
    import matplotlib

    colours = matplotlib.colormaps[cmap].with_extremes(bad=(1, 1, 1, 0))  # gaps transparent
    image = ax.imshow(tiles, cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest")
    box = Rectangle((0, 0), 1, 1, fill=False, edgecolor="#ff3030", linewidth=2)
    ax.add_patch(box)
    return image, box


def update_grid(ax: Axes, image, tiles: np.ndarray, vmin: float, vmax: float, title: str) -> None:
    """Replace the mosaic's data and colour range in place."""
    image.set_data(tiles)
    image.set_clim(vmin, vmax)
    h, w = tiles.shape
    image.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_title(title, fontsize=10, loc="left", y=1.0)  # y given: no costly auto-placement


def select_tile(box: Rectangle, layout: GridLayout, index: int | None) -> None:
    """Outline tile ``index`` (hide the outline when None)."""
    if index is None or index >= layout.count:
        box.set_visible(False)
        return
    x, y = layout.origin(index)
    box.set_xy((x - 0.5, y - 0.5))
    box.set_width(layout.w)
    box.set_height(layout.h)
    box.set_visible(True)


def draw_overlay(ax: Axes, image: np.ndarray, amap: np.ndarray, alpha: float = 0.6,
                 cmap: str = "inferno"):
    """The image with a (lower-resolution) map stretched over it; returns (map artist, marker)."""
    H, W = image.shape[:2]
    ax.set_axis_off()
    ax.imshow(image, extent=(0, W, H, 0), interpolation="bilinear")
    overlay = ax.imshow(amap, extent=(0, W, H, 0), cmap=cmap, alpha=alpha,
                        interpolation="bilinear")
    (marker,) = ax.plot([], [], marker="+", color="#00e5ff", markersize=16, markeredgewidth=2.5,
                        linestyle="none")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return overlay, marker


def update_overlay(ax: Axes, overlay, marker, amap: np.ndarray, title: str,
                   point: tuple[float, float] | None = None) -> None:
    """Show ``amap`` (scaled to its own range) and a marker at ``point`` = (x, y) image pixels."""
    lo, hi = float(np.min(amap)), float(np.max(amap))
    overlay.set_data(amap)
    overlay.set_clim(lo, hi if hi > lo else lo + 1e-6)
    marker.set_data([point[0]] if point else [], [point[1]] if point else [])
    ax.set_title(title, fontsize=10, loc="left", y=1.0)  # y given: no costly auto-placement


def draw_bars(ax: Axes, k: int = 10):
    """A horizontal bar chart with ``k`` bars labelled inside; returns (bars, labels).

    Labels are text artists rather than tick labels: updating them in place is several times
    cheaper to redraw than re-making an axis's ticks.
    """
    from matplotlib.ticker import MaxNLocator

    bars = ax.barh(np.arange(k), np.zeros(k), color="#4a7dbf", height=0.8)
    labels = [ax.text(0, i, "", va="center", ha="left", fontsize=8, color="white", fontweight="bold",
                      clip_on=False) for i in range(k)]
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("activation", fontsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return bars, labels


def update_bars(ax: Axes, bars, labels, names, values: np.ndarray, title: str,
                highlight: int | None = None) -> None:
    """Set bar lengths and labels in place; ``highlight`` marks one bar in red."""
    k = len(bars)
    n = min(k, len(values))
    vals = np.zeros(k)
    vals[:n] = values[:n]
    lo, hi = min(0.0, float(vals.min())), max(0.0, float(vals.max()))
    span = (hi - lo) or 1.0
    for i, (bar, text, v) in enumerate(zip(bars, labels, vals)):
        bar.set_width(float(v))
        bar.set_color("#d9432f" if i == highlight else "#4a7dbf")
        bar.set_visible(i < n)
        text.set_text(names[i] if i < n else "")
        text.set_x(lo + 0.01 * span)
    ax.set_xlim(lo - 0.02 * span, hi + 0.05 * span)
    ax.set_title(title, fontsize=10, loc="left", y=1.0)  # y given: no costly auto-placement
