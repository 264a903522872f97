"""Where each figure's axes are, written on its ipympl canvas as CSS classes (test instrumentation).

The browser tests judge "does this figure look drawn?" on the pixels the browser shows, inside
the figure's axes: an empty axes with its ticks is not a drawing, nor is an image of one flat
colour. The browser alone cannot tell where the axes are, so the tests' widgets notebook calls
:func:`install` first; from then on every draw of a figure puts on its canvas widget

* ``cwfig-N``: the figure's identity (N counts figures in the kernel), the same on every redraw,
  so that before / after pictures are compared figure by figure, whatever appears or goes;
* ``cwax-K-X0-Y0-X1-Y1`` for each visible axes: K is ``i`` when the axes shows an image, the
  region being where the image lies inside the axes, ``p`` otherwise (a plot: inside its frame);
* ``cwex-X0-Y0-X1-Y1`` for each visible legend: its box is left out (a legend is not a drawing).

Coordinates are in 1/10000 of the figure's width and height, from its top left corner, so they
hold at any device pixel ratio. Only the geometry comes from the kernel: whether the region is
drawn is judged in the browser's pixels (``browserkit.judge_drawn``).
"""
from __future__ import annotations

import functools
import itertools

SCALE = 10000
PREFIXES = ("cwfig-", "cwax-", "cwex-")
_ids = itertools.count()


def _frac(bbox, width: float, height: float) -> tuple[int, int, int, int]:
    def clamp(v):
        return max(0, min(SCALE, int(round(v * SCALE))))
    return (clamp(bbox.x0 / width), clamp(1 - bbox.y1 / height),
            clamp(bbox.x1 / width), clamp(1 - bbox.y0 / height))


def figure_tags(fig, renderer=None) -> list[str]:
    """The classes describing ``fig`` as last drawn (call after a draw: axes positions are
    final only then, e.g. after ``aspect="equal"`` shrank an image's axes)."""
    from matplotlib.transforms import Bbox

    if not hasattr(fig, "_cw_test_id"):
        fig._cw_test_id = next(_ids)
    tags = [f"cwfig-{fig._cw_test_id}"]
    width, height = fig.bbox.width, fig.bbox.height
    if width <= 0 or height <= 0:
        return tags
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        images = [im for im in ax.get_images() if im.get_visible()]
        region = ax.bbox
        if images:
            extent = Bbox.union([im.get_window_extent(renderer) for im in images])
            region = Bbox.intersection(region, extent) or region
        box = _frac(region, width, height)
        if box[2] > box[0] and box[3] > box[1]:
            tags.append("cwax-{}-{}-{}-{}-{}".format("i" if images else "p", *box))
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            tags.append("cwex-{}-{}-{}-{}".format(*_frac(legend.get_window_extent(renderer),
                                                          width, height)))
    return tags


def tag_canvas(fig, renderer=None) -> None:
    """Replace the ``cw*`` classes of ``fig``'s canvas widget by the figure's current tags."""
    canvas = fig.canvas
    if not hasattr(canvas, "_dom_classes"):  # not an ipympl canvas
        return
    kept = [c for c in canvas._dom_classes if not c.startswith(PREFIXES)]
    classes = tuple(kept + figure_tags(fig, renderer))
    if classes != tuple(canvas._dom_classes):
        canvas._dom_classes = classes


def install() -> None:
    """Tag every figure's canvas after each of its draws (for the rest of this process)."""
    from matplotlib.figure import Figure

    if getattr(Figure.draw, "_cw_tagging", False):
        return
    draw = Figure.draw

    @functools.wraps(draw)
    def tagged_draw(self, renderer):
        result = draw(self, renderer)
        try:
            tag_canvas(self, renderer)
        except Exception as exc:  # noqa: BLE001 - the tags must never break a widget's draw
            import warnings

            warnings.warn(f"figtags: could not tag a figure: {exc!r}")
        return result

    tagged_draw._cw_tagging = True
    Figure.draw = tagged_draw
