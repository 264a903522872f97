"""Drawing an evaluation: methods × metrics as bars with their 95% intervals, and a gallery of
images with their map, the box drawn from it and the true boxes (matplotlib and numpy only;
the numbers come from ``Evaluation.bars()``)."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle

from .attribution import draw_attribution

TRUE_COLOR = "#00d000"  # true boxes
MAP_COLOR = "#ff2020"  # the box drawn from the map


def draw_bars(ax, bars: dict, *, selected: int | None = None):
    """Grouped bars on ``ax``: one group per metric, one bar per method, each with its 95%
    interval; the ``selected`` method's bars outlined. Returns the bar containers (one per
    method), whose patches carry the method's index as ``gid``."""
    ax.cla()
    methods, metrics = bars["methods"], bars["metrics"]
    values = np.nan_to_num(np.asarray(bars["values"], float))
    low, high = np.asarray(bars["low"], float), np.asarray(bars["high"], float)
    n = max(1, len(methods))
    width = 0.8 / n
    x = np.arange(len(metrics))
    containers = []
    for i, method in enumerate(methods):
        err = np.vstack([np.nan_to_num(values[i] - low[i]), np.nan_to_num(high[i] - values[i])])
        c = ax.bar(x - 0.4 + width * (i + 0.5), values[i], width, yerr=err.clip(0),
                   capsize=2, label=method, color=f"C{i}",
                   edgecolor="black" if selected == i else "none",
                   linewidth=1.6 if selected == i else 0)
        for patch in c.patches:
            patch.set_gid(str(i))
        containers.append(c)
    ax.set_xticks(x, [f"{name}\n({better} better)" for _, name, better in metrics],
                  fontsize=8)
    top = float(np.nanmax(high)) if np.isfinite(high).any() else 1.0
    ax.set_ylim(0, 1.18 * max(1.0, top))  # headroom for the legend above the bars
    ax.set_ylabel("value (bars: 95% interval)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if methods:
        ax.legend(fontsize=8, ncol=min(4, len(methods)), loc="upper right")
    return containers


def plot_evaluation(bars: dict, fig=None):
    """A new figure (or ``fig``) with the bars; returns the figure."""
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(max(6.0, 1.6 * len(bars["metrics"]) + 2), 3.6),
                         layout="constrained")
    ax = fig.add_subplot()
    draw_bars(ax, bars)
    ax.set_title("methods × metrics (95% intervals)", fontsize=10)
    return fig


def draw_gallery(axes):
    """Empty gallery cells on ``axes``; returns their artists for :func:`update_gallery`."""
    cells = []
    for ax in axes:
        ax.set_axis_off()
        cells.append({"ax": ax, "artists": []})
    return cells


def update_gallery(cells, entries):
    """Fill the cells: each entry a dict ``image`` (H×W×3), ``map`` (H×W or None), ``box``
    (the map's box or None), ``truth`` (K×4), ``title``. Cells without an entry are blank."""
    for cell, entry in zip(cells, list(entries) + [None] * (len(cells) - len(entries))):
        ax = cell["ax"]
        ax.cla()
        ax.set_axis_off()
        if entry is None:
            continue
        if entry.get("map") is not None:
            draw_attribution(ax, entry["map"], entry["image"], alpha=0.5, title=None)
        else:
            ax.imshow(np.clip(entry["image"], 0, 1))
        for x0, y0, x1, y1 in np.asarray(entry.get("truth", []), float).reshape(-1, 4):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=TRUE_COLOR, linewidth=1.5))
        box = entry.get("box")
        if box is not None and np.all(np.isfinite(box)):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=MAP_COLOR, linewidth=1.5, linestyle="--"))
        ax.set_title(entry.get("title", ""), fontsize=6)
        ax.set_axis_off()
    return cells
