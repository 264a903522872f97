"""Drawing for the training monitor: loss and accuracy curves, first-layer filters, feature
maps and Grad-CAMs of the fixed images, dead units per layer (matplotlib and numpy only).

``draw_*`` functions create artists on axes they are given and return them; ``update_*``
functions change those artists in place.
"""
from __future__ import annotations

import numpy as np

from .feature_maps import grid_layout, mosaic as map_mosaic
from .optvis import mosaic


# ------------------------------------------------------------------ curves
def draw_curves(ax_loss, ax_acc) -> dict:
    """Empty loss and accuracy curves, and a marker for the snapshot shown."""
    artists = {}
    for ax, key, title, colour in ((ax_loss, "loss", "loss", "C0"),
                                   (ax_acc, "accuracy", "accuracy (training batch)", "C2")):
        (line,) = ax.plot([], [], lw=1.0, color=colour)
        (smooth,) = ax.plot([], [], lw=1.8, color="black", alpha=0.6)
        marker = ax.axvline(0, color="#d9432f", lw=1.2, ls="--")
        marker.set_visible(False)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(title, fontsize=9, loc="left", y=1.0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        artists[key] = (line, smooth, marker)
    ax_acc.set_ylim(-0.02, 1.02)
    return artists


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    """A running mean over ``width`` steps (the curve a noisy batch loss hides)."""
    if len(y) < 3 or width < 2:
        return y
    width = min(width, len(y))
    kernel = np.ones(width) / width
    head = np.cumsum(y[:width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def update_curves(artists: dict, steps, losses, accuracies, total: int | None = None) -> None:
    """Show every step's loss and accuracy (NaN accuracies are left out), with running means."""
    steps = np.asarray(steps, dtype=np.float64)
    right = max(float(total or 0), float(steps[-1]) if len(steps) else 1.0, 1.0)
    width = max(2, len(steps) // 25)
    for key, values in (("loss", losses), ("accuracy", accuracies)):
        line, smooth, _ = artists[key]
        y = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(y)
        line.set_data(steps[ok], y[ok])
        smooth.set_data(steps[ok], _smooth(y[ok], width))
        ax = line.axes
        ax.set_xlim(0, right)
        if key == "loss" and ok.any():
            lo, hi = float(y[ok].min()), float(y[ok].max())
            span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
            ax.set_ylim(min(0.0, lo - 0.05 * span), hi + 0.05 * span)


def update_marker(artists: dict, step: int | None) -> None:
    """Move the dashed line marking the snapshot shown (hidden when ``None``)."""
    for key in ("loss", "accuracy"):
        marker = artists[key][2]
        marker.set_visible(step is not None)
        if step is not None:
            marker.set_xdata([step, step])


# ------------------------------------------------------------------ filters
def filter_images(filters: np.ndarray) -> np.ndarray:
    """C_out×C_in×k×k weights → C_out×k×k×3 images: each filter scaled by its own largest
    absolute weight so that 0 is mid-grey (RGB filters in colour, others as grey)."""
    f = np.asarray(filters, dtype=np.float32)
    if f.shape[1] != 3:
        f = np.repeat(f.mean(axis=1, keepdims=True), 3, axis=1)
    scale = np.abs(f).reshape(len(f), -1).max(axis=1)
    scale[scale == 0] = 1.0
    return (0.5 + 0.5 * f / scale[:, None, None, None]).transpose(0, 2, 3, 1)


def draw_filters(ax, filters: np.ndarray, title: str = "first-layer filters"):
    """The first layer's filters as one mosaic of small colour images; returns the artist."""
    ax.set_axis_off()
    artist = ax.imshow(mosaic(filter_images(filters), pad=1), interpolation="nearest")
    ax.set_title(title, fontsize=9, loc="left", y=1.0)
    return artist


def update_filters(artist, filters: np.ndarray, title: str | None = None) -> None:
    image = mosaic(filter_images(filters), pad=1)
    artist.set_data(image)
    h, w = image.shape[:2]
    artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
    if title is not None:
        artist.axes.set_title(title, fontsize=9, loc="left", y=1.0)


# ------------------------------------------------------------------ dead units
def draw_dead(ax, layers) -> dict:
    """One horizontal bar per layer on a grey 0–100 % track: the share of its units that never
    fire, written at the track's end; returns ``{"bars", "labels"}``."""
    layers = list(layers)
    rows = np.arange(len(layers))
    ax.barh(rows, np.ones(len(layers)), color="#ececec", height=0.7)  # the track: 0 to 100 %
    bars = ax.barh(rows, np.zeros(len(layers)), color="#7a7a7a", height=0.7)
    labels = [ax.text(0.98, row, "", ha="right", va="center", fontsize=7, color="#333333")
              for row in rows]
    ax.set_yticks(np.arange(len(layers)), [_short(n) for n in layers], fontsize=7)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=7)
    ax.set_title("dead units (never > 0)", fontsize=9, loc="left", y=1.0)
    return {"bars": list(bars), "labels": labels}


def update_dead(artists: dict, fractions) -> None:
    for bar, label, v in zip(artists["bars"], artists["labels"], fractions):
        v = float(v)
        bar.set_width(v)
        bar.set_color("#d9432f" if v >= 0.25 else "#7a7a7a")
        label.set_text(f"{100 * v:.0f} %")


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


# ------------------------------------------------------------------ images, CAMs and maps
def draw_cam(ax, image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> dict:
    """An image with its Grad-CAM (any resolution) stretched over it."""
    H, W = image.shape[:2]
    ax.set_axis_off()
    base = ax.imshow(np.clip(image, 0, 1), extent=(0, W, H, 0), interpolation="nearest")
    heat = ax.imshow(cam, extent=(0, W, H, 0), cmap="jet", alpha=alpha, interpolation="bilinear",
                     vmin=0, vmax=1)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return {"image": base, "heat": heat}


def update_cam(artists: dict, cam: np.ndarray, title: str = "") -> None:
    """Show ``cam`` scaled to its own maximum (a zero map stays blank)."""
    cam = np.asarray(cam, dtype=np.float32)
    hi = float(cam.max()) if cam.size else 0.0
    artists["heat"].set_data(cam)
    artists["heat"].set_clim(0, hi if hi > 0 else 1.0)
    artists["heat"].axes.set_title(title, fontsize=8, loc="left", y=1.0)


def maps_tiles(maps: np.ndarray, count: int = 16) -> tuple[np.ndarray, float, float]:
    """The first ``count`` maps (C×h×w) tiled, and a colour range shared by them."""
    maps = np.asarray(maps, dtype=np.float32)[:count]
    layout = grid_layout(len(maps), maps.shape[1], maps.shape[2])
    tiles = map_mosaic(maps, layout)
    finite = tiles[np.isfinite(tiles)]
    lo, hi = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99.5))) \
        if finite.size else (0.0, 1.0)
    return tiles, lo, hi if hi > lo else lo + 1e-6


def draw_maps(ax, maps: np.ndarray, count: int = 16):
    ax.set_axis_off()
    tiles, lo, hi = maps_tiles(maps, count)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(1, 1, 1, 0))
    return ax.imshow(tiles, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")


def update_maps(artist, maps: np.ndarray, count: int = 16, title: str | None = None) -> None:
    tiles, lo, hi = maps_tiles(maps, count)
    artist.set_data(tiles)
    artist.set_clim(lo, hi)
    h, w = tiles.shape
    artist.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
    artist.axes.set_xlim(-0.5, w - 0.5)
    artist.axes.set_ylim(h - 0.5, -0.5)
    if title is not None:
        artist.axes.set_title(title, fontsize=8, loc="left", y=1.0)
