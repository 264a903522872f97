"""Drawing network dissection results (matplotlib + numpy only; no torch).

``draw_*`` functions create artists on the axes they are given and return them; ``update_*``
functions change those artists in place (``set_data``, heights, colours) so a widget never
re-creates its figure.
"""
from __future__ import annotations

import numpy as np

#: Category → bar colour (others cycle through the tab10 palette).
CATEGORY_COLORS = {
    "color": "#d62728", "texture": "#1f77b4", "shape": "#2ca02c", "object": "#ff7f0e",
    "part": "#9467bd", "material": "#8c564b", "scene": "#17becf",
}
_CYCLE = ["#e377c2", "#7f7f7f", "#bcbd22", "#aec7e8", "#ffbb78"]

OUTSIDE_RGB = (0.0, 0.0, 0.0)  # dims what lies outside the concept's mask
UNIT_RGB = (1.0, 0.9, 0.0)  # yellow outline: the unit's binarised map


def category_color(category: str, i: int = 0) -> str:
    return CATEGORY_COLORS.get(category, _CYCLE[i % len(_CYCLE)])


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask (pixels of the mask with a 4-neighbour outside)."""
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    for _ in range(max(1, width)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def overlay(mask: np.ndarray, rgb, alpha: float) -> np.ndarray:
    """An RGBA image: ``rgb`` at ``alpha`` where ``mask`` is true, transparent elsewhere."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape + (4,), np.float32)
    out[mask, :3] = rgb
    out[mask, 3] = alpha
    return out


def draw_top_images(axes, shape, mask_shape):
    """On each axes: the image, the concept's mask (the outside dimmed) and the unit's binarised
    map (outline). Returns one dict of artists per axes."""
    H, W = shape
    cells = []
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        image = ax.imshow(np.zeros((H, W, 3), np.float32), extent=(0, W, H, 0),
                          interpolation="nearest")
        concept = ax.imshow(np.zeros(tuple(mask_shape) + (4,), np.float32), extent=(0, W, H, 0),
                            interpolation="nearest")
        unit = ax.imshow(np.zeros(tuple(mask_shape) + (4,), np.float32), extent=(0, W, H, 0),
                         interpolation="nearest")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        cells.append({"ax": ax, "image": image, "concept": concept, "unit": unit})
    return cells


def update_top_images(cells, images, concept_masks, unit_masks, titles):
    """Show ``images[i]`` (H×W×3 float or uint8, or an h×w map shown in grey), its pixels
    outside the concept's mask dimmed and the outline of the unit's mask on cell ``i``; cells
    beyond the lists go blank."""
    for i, cell in enumerate(cells):
        ax = cell["ax"]
        if i >= len(images):
            for key in ("image", "concept", "unit"):
                cell[key].set_visible(False)
            ax.set_title("")
            continue
        image = np.asarray(images[i])
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        if image.ndim == 2:  # an activation map: grey, normalised
            lo, hi = float(image.min()), float(image.max())
            image = np.repeat(((image - lo) / (hi - lo if hi > lo else 1.0))[..., None], 3, 2)
        cell["image"].set_data(np.clip(image, 0, 1))
        cm = concept_masks[i]
        # the concept's pixels keep their colours; everything outside the concept is dimmed
        cell["concept"].set_data(overlay(~np.asarray(cm, bool), OUTSIDE_RGB, 0.6) if cm is not None
                                 else np.zeros(unit_masks[i].shape + (4,), np.float32))
        um = np.asarray(unit_masks[i], bool)
        width = max(1, round(min(um.shape) / 56))
        cell["unit"].set_data(overlay(outline(um, width), UNIT_RGB, 1.0))
        for key in ("image", "concept", "unit"):
            cell[key].set_visible(True)
        ax.set_title(titles[i], fontsize=8, y=1.0)


def draw_category_bars(ax, categories):
    """Bars of detectors per category (heights set by :func:`update_category_bars`)."""
    x = np.arange(len(categories))
    bars = ax.bar(x, np.zeros(len(categories)),
                  color=[category_color(c, i) for i, c in enumerate(categories)])
    ax.set_xticks(x, categories, fontsize=8)
    ax.set_ylabel("detectors", fontsize=8)
    ax.tick_params(labelsize=8)
    labels = [ax.text(xi, 0, "", ha="center", va="bottom", fontsize=8) for xi in x]
    return {"ax": ax, "bars": bars, "labels": labels}


def update_category_bars(artists, counts, title=""):
    counts = np.asarray(counts, float)
    for bar, label, n in zip(artists["bars"], artists["labels"], counts):
        bar.set_height(n)
        label.set_y(n)
        label.set_text(f"{int(n)}")
    artists["ax"].set_ylim(0, max(1.0, counts.max() * 1.2 if len(counts) else 1.0))
    artists["ax"].set_title(title, fontsize=9, y=1.0)


def draw_layer_bars(ax, layers, categories, counts):
    """Stacked bars: per layer (rows of ``counts``), detectors of each category (columns)."""
    counts = np.asarray(counts, float).reshape(len(layers), len(categories))
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    stacks = []
    for j, cat in enumerate(categories):
        stacks.append(ax.bar(x, counts[:, j], bottom=bottom, color=category_color(cat, j),
                             label=cat, edgecolor="none"))
        bottom += counts[:, j]
    short = [l if len(l) <= 16 else "…" + l[-15:] for l in layers]
    ax.set_xticks(x, short, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("detectors", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_ylim(0, max(1.0, bottom.max() * 1.15))
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    ax.set_title("detectors per layer", fontsize=9, y=1.0)
    return {"ax": ax, "stacks": stacks, "totals": bottom}


def highlight_layer(artists, index):
    """Outline the bars of layer ``index``."""
    for stack in artists["stacks"]:
        for i, bar in enumerate(stack):
            bar.set_edgecolor("black" if i == index else "none")
            bar.set_linewidth(1.5 if i == index else 0)
