"""Drawing evaluation results: deletion / insertion curves and the sanity check (matplotlib and
numpy only; the results are read through their attributes)."""
from __future__ import annotations

import numpy as np

from .attribution import draw_attribution

_COLORS = {"deletion": "tab:red", "insertion": "tab:green"}


def draw_curve(ax, curve, *, label: str | None = None, color: str | None = None,
               shade: bool = True):
    """The curve on ``ax``, its area shaded; several curves can share one Axes."""
    if color is None and not ax.lines:  # the first curve in its kind's colour, then the cycle
        color = _COLORS.get(curve.kind)
    name = label or f"{curve.method or 'map'} — AUC {curve.auc:.3f}"
    (line,) = ax.plot(curve.fractions, curve.scores, color=color, lw=1.8, label=name)
    if shade:
        ax.fill_between(curve.fractions, curve.scores, color=line.get_color(), alpha=0.15)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of pixels {'removed' if curve.kind == 'deletion' else 'inserted'}")
    ax.set_ylabel(f"{curve.score} of “{curve.label}”" if curve.label else curve.score)
    into = {"deletion": "to", "insertion": "into"}.get(curve.kind, "with")
    ax.set_title(f"{curve.kind} {into} {curve.baseline} ({curve.better} area is better)",
                 fontsize=10, y=1.0)
    ax.legend(fontsize=8, loc="upper right" if curve.kind == "deletion" else "lower right")
    ax.grid(alpha=0.3)
    return line


def draw_curves(ax, curves, *, colors=None):
    """Several curves of one kind on ``ax``, redrawn from scratch (widgets call it again with
    each new result); one colour per curve, the legend gives each method's area."""
    ax.cla()
    colors = colors or [f"C{i}" for i in range(len(curves))]
    for curve, color in zip(curves, colors):
        draw_curve(ax, curve, color=color, shade=len(curves) == 1)
    if not curves:
        ax.set_axis_off()
    else:
        ax.set_axis_on()
    return ax


def plot_curve(curve, ax=None, *, label: str | None = None, color: str | None = None):
    """The curve on ``ax``; with no ``ax``, a new figure with the curve above a strip of the
    perturbed images it was measured on (0, 25, 50, 75 and 100% of the pixels)."""
    if ax is not None:
        draw_curve(ax, curve, label=label, color=color)
        return ax
    import matplotlib.pyplot as plt

    images = [] if curve.images is None else list(curve.images)
    fig = plt.figure(figsize=(7, 5.2 if images else 3.4), layout="constrained")
    if not images:
        ax = fig.add_subplot()
        draw_curve(ax, curve, label=label, color=color)
        return ax
    grid = fig.add_gridspec(2, len(images), height_ratios=(2.2, 1))
    ax = fig.add_subplot(grid[0, :])
    draw_curve(ax, curve, label=label, color=color)
    fractions = np.linspace(0, 1, len(images))
    for i, image in enumerate(images):
        small = fig.add_subplot(grid[1, i])
        small.imshow(np.clip(image, 0, 1))
        small.set_axis_off()
        small.set_title(f"{fractions[i]:.0%}", fontsize=8, y=1.0)
    return ax


def plot_sanity(result, fig=None, *, alpha: float = 0.5, size: float = 2.4):
    """One panel per map: the original, then each randomisation stage with its rank
    correlation to the original. Returns the figure."""
    n = len(result.maps)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(size * n, size + 0.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False).ravel()
    for i, (ax, heat) in enumerate(zip(axes, result.maps)):
        if i == 0:
            title = f"original\n{result.method}"
        else:
            title = f"random down to\n{result.stages[i - 1]}\nρ = {result.similarity[i - 1]:.2f}"
        draw_attribution(ax, heat, result.image, alpha=alpha, signed=result.signed,
                         fade=result.signed, fine=getattr(result, "fine", False), title=title)
        ax.title.set_fontsize(8)
    fig.suptitle(f"cascading randomisation of the weights, top down — ρ: rank correlation with "
                 f"the original map (low = the map depends on those weights)", fontsize=9)
    return fig
