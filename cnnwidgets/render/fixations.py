"""Drawing CNN Fixations: points over the image, the backtrack on one layer's grid, heatmaps.

Pure matplotlib + numpy: each ``draw_*`` function draws on the ``Axes`` it is given and returns
a dict of artists; the matching ``update_*`` function changes those artists in place.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

POINT_COLOR = "#00e5ff"
OUTLIER_COLOR = "#ff3b30"
BOX_COLOR = "#ffd60a"


def _offsets(points) -> np.ndarray:
    """(row, col) points → matplotlib (x, y) offsets."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    return p[:, ::-1] if len(p) else np.zeros((0, 2))


def _clean(ax: Axes, title: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, y=1.0)


def draw_fixations(ax: Axes, image: np.ndarray, points, outliers=None, box=None,
                   title: str = "") -> dict:
    """The image with the fixation points (cyan), the outliers (red ×) and the box (yellow)."""
    artists = {"image": ax.imshow(image, interpolation="bilinear")}
    artists["points"] = ax.scatter([], [], s=9, c=POINT_COLOR, edgecolors="black",
                                   linewidths=0.3, label="fixations")
    artists["outliers"] = ax.scatter([], [], s=14, c=OUTLIER_COLOR, marker="x",
                                     linewidths=0.8, label="outliers")
    artists["box"] = ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, ec=BOX_COLOR, lw=1.5,
                                            visible=False))
    h, w = image.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    _clean(ax, title)
    update_fixations(artists, points, outliers, box, title=title)
    return artists


def update_fixations(artists: dict, points, outliers=None, box=None, title: str | None = None,
                     image: np.ndarray | None = None) -> None:
    if image is not None:
        artists["image"].set_data(image)
    artists["points"].set_offsets(_offsets(points))
    artists["outliers"].set_offsets(_offsets(outliers if outliers is not None else []))
    rect = artists["box"]
    if box is None:
        rect.set_visible(False)
    else:
        x0, y0, x1, y1 = box  # inclusive pixel indices → edges at ±0.5
        rect.set_bounds(x0 - 0.5, y0 - 0.5, x1 - x0 + 1, y1 - y0 + 1)
        rect.set_visible(True)
    if title is not None:
        artists["image"].axes.set_title(title, fontsize=9, y=1.0)


def layer_grid(points, shape) -> np.ndarray:
    """How many kept points (distinct channels) sit at each position of a layer.

    ``points`` is M×3 (channel, row, col) and ``shape`` (C, h, w). Spatial layers give an h×w
    count map; vectors (h = w = 1) give the kept channels laid out row by row on a near-square
    grid (1 = kept) so that a 1,000-class or 4,096-unit layer stays readable.
    """
    c, h, w = (int(v) for v in shape)
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    if h * w > 1:
        grid = np.zeros((h, w), np.float32)
        np.add.at(grid, (pts[:, 1], pts[:, 2]), 1.0)
        return grid
    side = max(1, math.ceil(math.sqrt(c)))
    grid = np.full(side * side, np.nan, np.float32)
    grid[:c] = 0.0
    grid[pts[:, 0]] = 1.0
    return grid.reshape(side, side)


def draw_layer(ax: Axes, image: np.ndarray, points, shape, title: str = "") -> dict:
    """One layer of the backtrack: where its kept points lie on its grid.

    For a feature map the image is shown under the h×w grid (aligned, one cell per position)
    and each cell's colour counts the kept channels there; for a vector layer the kept units
    are lit on a square grid of all units.
    """
    artists = {
        "background": ax.imshow(image, alpha=0.45, interpolation="bilinear"),
        "grid": ax.imshow(np.zeros((1, 1)), cmap="magma", interpolation="nearest", alpha=0.8,
                          vmin=0, vmax=1),
    }
    _clean(ax, title)
    update_layer(artists, points, shape, title=title)
    return artists


def update_layer(artists: dict, points, shape, title: str | None = None) -> None:
    grid = layer_grid(points, shape)
    gh, gw = grid.shape
    extent = (-0.5, gw - 0.5, gh - 0.5, -0.5)
    spatial = int(shape[1]) * int(shape[2]) > 1
    masked = np.ma.masked_where(~(grid > 0), grid)  # empty cells show the image
    art = artists["grid"]
    art.set_data(masked)
    art.set_extent(extent)
    art.set_clim(0, max(2.0, float(np.nanmax(grid)) if grid.size else 2.0))  # 1 point: mid colour
    background = artists["background"]
    background.set_extent(extent)
    background.set_visible(spatial)
    ax = art.axes
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_facecolor("white" if spatial else "#e8e8e8")
    if title is not None:
        ax.set_title(title, fontsize=9, y=1.0)


def draw_heatmap(ax: Axes, image: np.ndarray, heat: np.ndarray, title: str = "",
                 alpha: float = 0.5, cmap: str = "jet") -> dict:
    """The image with a [0, 1] heatmap over it."""
    artists = {
        "image": ax.imshow(image, interpolation="bilinear"),
        "heat": ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0,
                          interpolation="bilinear"),
    }
    _clean(ax, title)
    return artists


def update_heatmap(artists: dict, heat: np.ndarray, title: str | None = None) -> None:
    artists["heat"].set_data(heat)
    if title is not None:
        artists["heat"].axes.set_title(title, fontsize=9, y=1.0)
