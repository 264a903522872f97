"""Drawing for feature visualisation, inversion and DeconvNet projections (matplotlib only).

``draw_*`` functions create artists on an ``Axes`` they are given and return them;
``update_*`` functions change those artists in place (no new figures, no new axes).
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.patches import Rectangle


def mosaic(images, cols: int | None = None, pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """Tile N×H×W×3 images into one image, ``cols`` per row (about square by default)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        return images
    n, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), fill,
                  dtype=np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = img
    return out


def draw_image(ax, image, title: str = ""):
    """An RGB image with no ticks; returns the ``AxesImage``."""
    ax.set_axis_off()
    artist = ax.imshow(np.clip(np.asarray(image, dtype=np.float32), 0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=9, y=1.0)
    return artist


def update_image(artist, image, title: str | None = None) -> None:
    """Replace the image data (and the extent when the size changed)."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    old = artist.get_array()
    artist.set_data(image)
    if old is None or old.shape[:2] != image.shape[:2]:
        h, w = image.shape[:2]
        artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
        artist.axes.set_xlim(-0.5, w - 0.5)
        artist.axes.set_ylim(h - 0.5, -0.5)
    if title is not None:
        artist.axes.set_title(title, fontsize=9, y=1.0)


def draw_loss(ax, title: str = "loss"):
    """An empty loss curve; returns the ``Line2D``."""
    (line,) = ax.plot([], [], lw=1.2, color="C0")
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=9, y=1.0)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return line


def update_loss(line, history, steps: int | None = None) -> None:
    """Show ``history`` (one loss per step) on the curve and rescale the axes."""
    y = np.asarray(history, dtype=np.float64)
    line.set_data(np.arange(1, len(y) + 1), y)
    ax = line.axes
    ax.set_xlim(0, max(steps or 0, len(y), 1))
    if len(y):
        lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
        span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
        ax.set_ylim(lo - 0.05 * span, hi + 0.05 * span)


def draw_positions(ax, rows=(), cols=(), color="yellow"):
    """Markers on the top-k positions (input pixels; the strongest is the larger one)."""
    return ax.scatter(list(cols), list(rows), s=_sizes(len(cols)), facecolors="none",
                      edgecolors=color, linewidths=1.5)


def _sizes(n):
    return [80.0] + [30.0] * max(0, n - 1) if n else []


def update_positions(artist, rows, cols) -> None:
    artist.set_offsets(np.column_stack([cols, rows]) if len(rows) else np.empty((0, 2)))
    artist.set_sizes(_sizes(len(rows)))


def draw_box(ax, box=None, color="yellow"):
    """A rectangle ``(x0, y0, x1, y1)`` in pixel coordinates (hidden when ``None``)."""
    rect = Rectangle((0, 0), 0, 0, fill=False, edgecolor=color, linewidth=1.2, linestyle="--")
    ax.add_patch(rect)
    update_box(rect, box)
    return rect


def update_box(rect, box) -> None:
    if box is None:
        rect.set_visible(False)
        return
    x0, y0, x1, y1 = box
    rect.set_bounds(x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
    rect.set_visible(True)


def zoom_to(ax, box, shape, min_size: int = 48, margin: float = 0.25) -> None:
    """Set ``ax``'s limits to ``box`` (x0, y0, x1, y1) grown by ``margin`` and to at least
    ``min_size`` pixels, inside an image of ``shape`` (H, W); the whole image when ``None``."""
    H, W = shape[:2]
    if box is None:
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        return
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = min(max(side, min_size), max(H, W))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0), W - side)
    top = min(max(cy - side / 2, 0), H - side)
    ax.set_xlim(left - 0.5, left + side - 0.5)
    ax.set_ylim(top + side - 0.5, top - 0.5)
