"""Drawing the application labs (matplotlib and numpy only): an adversarial perturbation made
visible, top-k lists, the per-layer drift curve, channel maps clean vs adversarial, and
prune curves. ``draw_*`` make artists on the Axes given; ``update_*`` change them in place."""
from __future__ import annotations

import numpy as np

CLEAN_COLOR = "#1f77b4"
ADVERSARIAL_COLOR = "#d62728"
#: a colour per prune criterion (cycled for concepts)
CRITERION_COLORS = ("#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c", "#9467bd", "#8c564b")


def _clean(ax, title: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, y=1.0)


def amplified(perturbation, epsilon: float) -> np.ndarray:
    """A perturbation (H×W×3, within ±epsilon) as an image: grey 0.5 is no change, and ±epsilon
    reach 0 and 1 (the whole budget made visible, whatever its size)."""
    p = np.asarray(perturbation, dtype=np.float32)
    if epsilon <= 0:
        return np.full(p.shape, 0.5, np.float32)
    return np.clip(0.5 + p / (2 * float(epsilon)), 0.0, 1.0)


def topk_text(rows, k: int = 3) -> str:
    """``(index, label, probability)`` rows as lines ``"label  12.3%"``."""
    return "\n".join(f"{str(label)[:22]}  {p:.1%}" for _, label, p in list(rows)[:k])


def draw_picture(ax, image, title: str = "") -> dict:
    """An image panel; returns ``{"image"}``."""
    art = ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    _clean(ax, title)
    return {"image": art}


def update_picture(artists: dict, image=None, title: str | None = None) -> None:
    if image is not None:
        artists["image"].set_data(np.clip(image, 0, 1))
    if title is not None:
        artists["image"].axes.set_title(title, fontsize=9, y=1.0)


def draw_drift(ax) -> dict:
    """The drift curve: ‖A(x′) − A(x)‖ / ‖A(x)‖ by depth, with a marker on the chosen layer."""
    (line,) = ax.plot([], [], "-o", color=ADVERSARIAL_COLOR, ms=3, lw=1.2)
    (mark,) = ax.plot([], [], "s", color="black", ms=7, mfc="none")
    ax.set_xlabel("depth (layer, forward order) — click to choose", fontsize=8)
    ax.set_ylabel("relative change", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("where the attack takes hold", fontsize=9, y=1.0)
    return {"line": line, "mark": mark, "ax": ax}


def update_drift(artists: dict, values, selected: int | None = None,
                 title: str | None = None) -> None:
    v = np.asarray(values, dtype=float)
    x = np.arange(len(v))
    artists["line"].set_data(x, v)
    if selected is not None and 0 <= selected < len(v):
        artists["mark"].set_data([selected], [v[selected]])
    else:
        artists["mark"].set_data([], [])
    ax = artists["ax"]
    top = float(np.nanmax(v)) if len(v) and np.isfinite(v).any() else 1.0
    ax.set_xlim(-0.5, max(0.5, len(v) - 0.5))
    ax.set_ylim(0, max(top, 1e-6) * 1.1)
    if title is not None:
        ax.set_title(title, fontsize=9, y=1.0)


def channel_pairs(clean, adversarial, gap: int = 1) -> np.ndarray:
    """Maps n×h×w of the clean and the adversarial image as one 2-row mosaic (clean above),
    gaps NaN (drawn transparent)."""
    a = np.asarray(clean, dtype=np.float32)
    b = np.asarray(adversarial, dtype=np.float32)
    n, h, w = a.shape
    out = np.full((2 * h + gap, max(1, n * (w + gap) - gap)), np.nan, np.float32)
    for i in range(n):
        c0 = i * (w + gap)
        out[:h, c0:c0 + w] = a[i]
        out[h + gap:, c0:c0 + w] = b[i]
    return out


def draw_channels(ax, title: str = "") -> dict:
    art = ax.imshow(np.full((1, 1), np.nan), cmap="viridis", interpolation="nearest",
                    aspect="auto")
    _clean(ax, title)
    return {"image": art}


def update_channels(artists: dict, mosaic, title: str | None = None) -> None:
    art = artists["image"]
    art.set_data(mosaic)
    finite = mosaic[np.isfinite(mosaic)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    art.set_clim(lo, hi if hi > lo else lo + 1e-6)
    art.set_extent((-0.5, mosaic.shape[1] - 0.5, mosaic.shape[0] - 0.5, -0.5))
    if title is not None:
        art.axes.set_title(title, fontsize=9, y=1.0)


def draw_prune_curves(ax) -> dict:
    """Against the fraction of units off, one colour per criterion: the top-1 agreement with
    the intact network (solid) and the mean drop of its class's probability (dashed); a
    vertical line at the chosen fraction."""
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("fraction of the layer's units switched off", fontsize=8)
    ax.set_ylabel("agreement (solid), probability drop (dashed)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    cursor = ax.axvline(0.0, color="black", lw=1, ls="--")
    return {"ax": ax, "lines": {}, "drops": {}, "cursor": cursor, "legend": None}


def update_prune_curves(artists: dict, curves, fraction: float | None = None,
                        highlight: str | None = None, title: str | None = None) -> None:
    """``curves``: ``(name, fractions, agreement, drop)`` per criterion; lines are made once
    per name and updated after; names no longer given are hidden."""
    ax, lines, drops = artists["ax"], artists["lines"], artists["drops"]
    names = []
    for name, fractions, agreement, drop in curves:
        names.append(name)
        if name not in lines:
            color = CRITERION_COLORS[len(lines) % len(CRITERION_COLORS)]
            (lines[name],) = ax.plot([], [], "-o", ms=3, lw=1.2, label=name, color=color)
            (drops[name],) = ax.plot([], [], "--", lw=1.0, color=color)
        x = np.asarray(fractions, float)
        lines[name].set_data(x, np.asarray(agreement, float))
        drops[name].set_data(x, np.asarray(drop, float))
    for name, line in lines.items():
        for art in (line, drops[name]):
            art.set_visible(name in names)
            art.set_linewidth(2.6 if name == highlight else 1.2)
    shown = [lines[n] for n in names]
    if artists["legend"] is not None:
        artists["legend"].remove()
    artists["legend"] = ax.legend(shown, names, fontsize=7, loc="center right") if shown else None
    if fraction is not None:
        artists["cursor"].set_xdata([fraction, fraction])
    if title is not None:
        ax.set_title(title, fontsize=9, y=1.0)
