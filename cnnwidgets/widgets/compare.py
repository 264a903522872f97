"""``cw.CompareExplorer``: two networks side by side, unit by unit, with their CKA matrix."""
from __future__ import annotations

import html

import ipywidgets as widgets
import traitlets

from ..engine.attribution import attribute
from ..engine.compare import Comparison, compare, default_images
from ..engine.featuremaps import feature_maps
from ..engine.images import load_image, sample_image
from ..engine.model import as_model
from ..render import compare as RC
from ..render.attribution import draw_attribution, update_attribution
from ..render.feature_maps import draw_overlay, update_overlay
from .base import WidgetBase, make_figure

#: the attribution methods offered (quick ones: the widget recomputes both columns per change)
METHODS = ("grad_cam", "grad_cam_pp", "layer_cam", "eigen_cam", "saliency", "gradient_x_input",
           "fixations")


class CompareExplorer(WidgetBase):
    """Two networks, one control set: ``cw.CompareExplorer(model_a, model_b, image)``.

    Left, the layer × layer linear CKA matrix of the two networks (click a cell to take that
    layer pair). Then one column per network: the same attribution method on the same image,
    and below it a unit of A's layer next to its best-matched unit in B's layer (by
    activation correlation), each over the image. Works for a trained network against a
    random one, two architectures, or two snapshots of a training monitor
    (``monitor.model_at(step)``).

    ``images``: the images the comparison is measured on (default: ``image``, the sample
    photos and their mirror images); ``layers_a`` / ``layers_b``: as ``cw.compare``; ``comparison``: a ready
    ``cw.Comparison`` of these two models.

    State (traitlets): ``layer_a``, ``layer_b``, ``unit`` (a unit of ``layer_a``), ``method``.
    """

    layer_a = traitlets.Unicode()
    layer_b = traitlets.Unicode()
    unit = traitlets.Int(0)
    method = traitlets.Enum(METHODS, default_value="grad_cam")

    def __init__(self, model_a, model_b, image=None, *, images=None, layers_a=None,
                 layers_b=None, comparison: Comparison | None = None, method: str = "grad_cam",
                 **kwargs):
        super().__init__(**kwargs)
        self.model_a = as_model(model_a, "cw.CompareExplorer (model_a)")
        self.model_b = as_model(model_b, "cw.CompareExplorer (model_b)")
        self.image = load_image(image if image is not None else sample_image("cat"))
        if comparison is None:
            if images is None:
                images = default_images(self.image)
            comparison = compare(self.model_a, self.model_b, images, layers_a, layers_b)
        self.comparison = comparison
        self._attributions = {}
        self._build()
        with self.hold_trait_notifications():
            self.method = method
            self.layer_a = comparison.layers_a[0]
            self.layer_b = comparison.best_layer(self.layer_a)
        self._refresh_units()
        self._update(background=False)
        self.observe(self._pair_changed, ["layer_a", "layer_b"])
        self.observe(lambda change: None if self._pairing else self._update(), ["unit", "method"])

    _pairing = False  # the unit menu is being rebuilt for a new layer pair

    # ------------------------------------------------------------------ validation
    @traitlets.validate("layer_a")
    def _valid_a(self, proposal):
        if proposal["value"] not in self.comparison.layers_a:
            raise traitlets.TraitError(f"layer {proposal['value']!r} of A was not compared; "
                                       f"choose one of {self.comparison.layers_a}")
        return proposal["value"]

    @traitlets.validate("layer_b")
    def _valid_b(self, proposal):
        if proposal["value"] not in self.comparison.layers_b:
            raise traitlets.TraitError(f"layer {proposal['value']!r} of B was not compared; "
                                       f"choose one of {self.comparison.layers_b}")
        return proposal["value"]

    @traitlets.validate("unit")
    def _valid_unit(self, proposal):
        n = len(self._matches().partner) if self.layer_a and self.layer_b else None
        if proposal["value"] < 0 or (n is not None and proposal["value"] >= n):
            raise traitlets.TraitError(f"unit must be between 0 and {n - 1} for {self.layer_a!r}")
        return proposal["value"]

    def _matches(self):
        return self.comparison.matches(self.layer_a, self.layer_b)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        c = self.comparison
        self.figure, self.canvas = make_figure(10.5, 5.4, dpi=85)
        grid = self.figure.add_gridspec(2, 3, width_ratios=[1.25, 1, 1], wspace=0.25,
                                        hspace=0.25, left=0.14, right=0.98, top=0.92,
                                        bottom=0.22)
        self._ax_cka = self.figure.add_subplot(grid[:, 0])
        self._cka, self._cell = RC.draw_cka(self._ax_cka, c.cka, c.layers_a, c.layers_b,
                                            f"A: {c.name_a}", f"B: {c.name_b}")
        _, display_a = self.model_a.prepare(self.image)
        _, display_b = self.model_b.prepare(self.image)
        blank_a, blank_b = display_a[..., 0] * 0, display_b[..., 0] * 0
        self._attr = [draw_attribution(self.figure.add_subplot(grid[0, 1]), blank_a, display_a),
                      draw_attribution(self.figure.add_subplot(grid[0, 2]), blank_b, display_b)]
        self._unit_axes = [self.figure.add_subplot(grid[1, 1]), self.figure.add_subplot(grid[1, 2])]
        self._units = [draw_overlay(self._unit_axes[0], display_a, blank_a[:2, :2]),
                       draw_overlay(self._unit_axes[1], display_b, blank_b[:2, :2])]
        self.canvas.mpl_connect("button_press_event", self.guarded(self._on_click))

        d = {"description_width": "60px"}
        self._w_a = widgets.Dropdown(options=c.layers_a, description="layer A", style=d,
                                     layout=widgets.Layout(width="240px"))
        self._w_b = widgets.Dropdown(options=c.layers_b, description="layer B", style=d,
                                     layout=widgets.Layout(width="240px"))
        self._w_unit = widgets.Dropdown(description="unit", style=d,
                                        layout=widgets.Layout(width="300px"))
        self._w_method = widgets.Dropdown(options=METHODS, description="method", style=d,
                                          layout=widgets.Layout(width="220px"))
        self.bind(self._w_a, "layer_a")
        self.bind(self._w_b, "layer_b")
        self.bind(self._w_unit, "unit")
        self.bind(self._w_method, "method")
        notes = "".join(f"<div style='color:#805000'>note: {html.escape(n)}</div>" for n in c.notes)
        self._notes = widgets.HTML(notes)
        controls = widgets.HBox([self._w_a, self._w_b, self._w_unit, self._w_method])
        self.children = [controls, self._notes, self.errors, self.canvas.view, self.status]

    # ------------------------------------------------------------------ events
    def _on_click(self, event) -> None:
        if event.inaxes is not self._ax_cka:
            return
        cell = RC.cell_at(event.xdata, event.ydata, self.comparison.cka.shape)
        if cell is not None:
            with self.hold_trait_notifications():
                self.layer_a = self.comparison.layers_a[cell[0]]
                self.layer_b = self.comparison.layers_b[cell[1]]

    def _pair_changed(self, change=None) -> None:
        self._pairing = True
        try:
            self._refresh_units()
        finally:
            self._pairing = False
        self._update()

    def _refresh_units(self) -> None:
        """The unit menu for the layer pair: best-matched units of A first."""
        m = self._matches()
        options = []
        for u in m.order():
            partner, score = int(m.partner[u]), float(m.score[u])
            text = (f"{u} ↔ {partner}  (r = {score:.2f})" if partner >= 0
                    else f"{u} (constant: no match)")
            options.append((text, int(u)))
        with self.quietly():
            self._w_unit.options = options
        best = options[0][1] if options else 0
        if self.unit >= len(m.partner) or self.unit != best:
            self.unit = best
        self.resync("unit")

    # ------------------------------------------------------------------ computing
    def _update(self, background: bool = True) -> None:
        la, lb, unit, method = self.layer_a, self.layer_b, self.unit, self.method
        m = self._matches()
        partner = int(m.partner[unit])
        self.status.value = "computing …"

        def work(cancel):
            attrs = []
            for model in (self.model_a, self.model_b):
                key = (id(model), method)
                if key not in self._attributions:
                    self._attributions[key] = attribute(model, self.image, method,
                                                        cancel=cancel, progress=False)
                attrs.append(self._attributions[key])
            map_a = feature_maps(self.model_a, self.image, la).maps[unit]
            map_b = feature_maps(self.model_b, self.image, lb).maps[partner] if partner >= 0 \
                else None
            return attrs, map_a, map_b

        def done(result):
            attrs, map_a, map_b = result
            c = self.comparison
            for panel, r, name in zip(self._attr, attrs, (c.name_a, c.name_b)):
                update_attribution(panel, r.map, signed=r.signed, fade=r.signed, fine=r.fine,
                                   title=f"{name}: {r.method} → {r.label}")
            score = float(m.score[unit])
            (ov_a, mk_a), (ov_b, mk_b) = self._units
            update_overlay(self._unit_axes[0], ov_a, mk_a, map_a, f"A {la}:{unit}")
            if map_b is not None:
                update_overlay(self._unit_axes[1], ov_b, mk_b, map_b,
                               f"B {lb}:{partner} (r = {score:.2f})")
            else:
                update_overlay(self._unit_axes[1], ov_b, mk_b, map_a[:1, :1], "B: no match")
            row, col = c.layers_a.index(la), c.layers_b.index(lb)
            RC.select_cell(self._cell, row, col)
            self.status.value = (f"{la} ↔ {lb}: CKA {c.cka[row, col]:.3f}; unit {unit} ↔ "
                                 f"{partner}")
            self.canvas.draw_idle()

        self.submit(work, done, background=background)
