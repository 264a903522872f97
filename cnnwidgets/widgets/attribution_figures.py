"""The figures of ``cw.AttributionExplorer``: one method beside the input, up to
:data:`MAX_PANELS` methods side by side, and the deletion / insertion curves under them."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np

from ..render.attribution import (
    DEFAULT_CMAP,
    DEFAULT_SIGNED_CMAP,
    RegionDrag,
    draw_attribution,
    draw_image,
    set_message,
    show_cells,
    show_panel,
    update_attribution,
)
from ..render.metrics import draw_curves
from .base import make_figure

MAX_PANELS = 4


def _cmap_for(cmap: str, signed: bool) -> str:
    """The colour map ``cmap`` names, ``"auto"`` choosing by the map's sign."""
    if cmap != "auto":
        return cmap
    return DEFAULT_SIGNED_CMAP if signed else DEFAULT_CMAP


class AttributionFigures:
    """The explorer's three figures on ``display`` (the image as the network sees it).

    ``canvas_box`` shows the single or the compare figure, ``eval_box`` the curves while they
    are on. Each canvas leaves the page in a Box of its own: JupyterLab keeps the element of an
    ipympl canvas taken out of a container on the page (and adds another when it comes back),
    while a removed Box takes its whole subtree with it.
    """

    def __init__(self, display):
        self.display = display
        blank = np.zeros(display.shape[:2], dtype=np.float32)
        self.single_fig, self.single_canvas = make_figure(7.0, 3.6)
        axes = self.single_fig.subplots(1, 2)
        self.image_panel = draw_image(axes[0], display, "input")
        self.main = draw_attribution(axes[1], blank, display, alpha=0.5)
        self.compare_fig, self.compare_canvas = make_figure(11.0, 3.3, dpi=80)
        axes = self.compare_fig.subplots(1, MAX_PANELS)
        self.panels = [draw_attribution(ax, blank, display, alpha=0.5) for ax in axes]
        self.eval_fig, self.eval_canvas = make_figure(7.0, 2.6, dpi=90)
        self.eval_axes = self.eval_fig.subplots(1, 2)
        self.eval_fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.86, wspace=0.25)
        self._single_holder = widgets.Box([self.single_canvas.view])
        self._compare_holder = widgets.Box([self.compare_canvas.view])
        self._eval_holder = widgets.Box([self.eval_canvas.view])
        self.canvas_box = widgets.Box([self._single_holder])
        self.eval_box = widgets.Box([])
        self.drag = None  #: the click-and-drag on the input (a dense output's region)
        self._grid = None
        # the single figure is a function of these: a state shown before gets its frame back
        # (``FastCanvas.frame_key``); ``_shown``: the token of the results drawn (None: unknown)
        self._shown = None
        self._style = None
        self._region = None
        self.single_canvas.frame_key = lambda: (
            None if self._shown is None else (self._shown, self._style, self._region))

    def choose_region(self, grid, on_move, on_release) -> None:
        """Let a click-and-drag on the input panel choose a rectangle of the ``grid`` (H'×W')
        of a dense output's pixels, spread over the image: ``on_move(rows, cols)`` as the
        drag goes, ``on_release(rows, cols)`` at its end (see ``render.RegionDrag``)."""
        self._grid = tuple(grid)
        self.image_panel["title"].set_text("input: drag to choose a region")
        self.drag = RegionDrag(self.image_panel["image"].axes, self.display.shape, grid,
                               on_move, on_release)

    def show_region(self, rows, cols) -> None:
        """Outline the output pixels ``rows`` × ``cols`` (inclusive) on the input panel."""
        show_cells(self.image_panel, rows, cols, self._grid)
        self._region = (tuple(rows), tuple(cols))
        self.single_canvas.draw_idle()

    def select(self, compare: bool, evaluate: bool):
        """Show the compare figure or the single one, and the curves or not; returns the
        figure shown (the one ``save`` writes)."""
        self.canvas_box.children = [self._compare_holder if compare else self._single_holder]
        self.eval_box.children = [self._eval_holder] if evaluate else []
        return self.compare_fig if compare else self.single_fig

    def show(self, results, names, *, compare: bool, alpha: float, cmap: str,
             token=None) -> None:
        """Draw ``results`` (attributions, or a compared method's exception, in ``names``
        order): in the single figure, or one per panel when ``compare``. ``token`` names these
        results (the same token: the same results; None: none) for the single figure's kept
        frames."""
        if len(results) == 1 and not compare:
            self._draw(self.main, results[0], alpha, cmap)
            self._shown, self._style = token, (alpha, cmap)
            self.single_canvas.draw_idle()
            return
        blank = np.zeros(self.display.shape[:2], dtype=np.float32)
        for i, panel in enumerate(self.panels):
            if i < len(results) and isinstance(results[i], Exception):
                update_attribution(panel, blank, fade=True, fine=False,
                                   title=f"{names[i]}: error")
                set_message(panel, str(results[i]))
            elif i < len(results):
                self._draw(panel, results[i], alpha, cmap)
                set_message(panel, "")
            show_panel(panel, i < len(results))
        self.compare_canvas.draw_idle()

    @staticmethod
    def _draw(panel, r, alpha: float, cmap: str) -> None:
        update_attribution(panel, r.map, signed=r.signed, alpha=alpha,
                           cmap=_cmap_for(cmap, r.signed), title=r.title(),
                           fade=r.signed, fine=r.fine)

    def show_curves(self, curves) -> None:
        """Draw each map's ``(deletion, insertion)`` curves (None: a method that failed)."""
        pairs = [p for p in curves if p is not None]
        draw_curves(self.eval_axes[0], [d for d, _ in pairs])
        draw_curves(self.eval_axes[1], [i for _, i in pairs])
        self.eval_canvas.draw_idle()

    def restyle(self, results, *, compare: bool, alpha: float, cmap: str) -> None:
        """A new opacity or colour map on the maps shown, without recomputing them."""
        signed = [getattr(r, "signed", False) for r in (results or [])]
        panels = self.panels if compare else [self.main]
        for i, panel in enumerate(panels):
            s = signed[i] if i < len(signed) else False
            update_attribution(panel, alpha=alpha, cmap=_cmap_for(cmap, s))
        if not compare:
            self._style = (alpha, cmap)
        self.single_canvas.draw_idle()
        self.compare_canvas.draw_idle()
