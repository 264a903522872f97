"""``cw.FixationExplorer``: CNN Fixations over the image, the backtrack layer by layer, the
heatmap with its sigma, the box, outlier removal and the target class."""
from __future__ import annotations

import ipywidgets as widgets
import traitlets

from ..engine.fixations import Fixations, fixations
from ..engine.model import as_model
from ..engine.targets import check as check_target, name_of
from ..render.fixations import (
    draw_fixations,
    draw_heatmap,
    draw_layer,
    update_fixations,
    update_heatmap,
    update_layer,
)
from .base import KEEP, WidgetBase, make_figure


class FixationExplorer(WidgetBase):
    """CNN Fixations of one image, explorable.

    Left: the image with the fixation points (outliers as red crosses when outlier removal is
    on) and their box. Middle: one layer of the backtrack — the ``layer`` slider walks from the
    class neuron down to the pixels and shows where the kept points lie on that layer's grid.
    Right: the heatmap (Gaussian blur of the points) with its ``sigma``.

    State (traitlets, settable from code): ``target`` (class index, or any target
    ``cw.fixations`` takes: a list of classes, ``cw.targets.Region``…), ``layer`` (a name of
    ``fixations.trace``), ``sigma`` (pixels; 0 = the default for the input size),
    ``outlier_removal``, ``show_box``. ``background=False`` computes in the calling thread.
    """

    target = traitlets.Any(-1)
    layer = traitlets.Unicode()
    sigma = traitlets.Float(0.0)
    outlier_removal = traitlets.Bool(True)
    show_box = traitlets.Bool(True)

    def __init__(self, model, image, target=None, *, sigma: float | None = None,
                 background: bool = True, **fixation_kwargs):
        super().__init__()
        model = as_model(model, "FixationExplorer")
        self.model = model
        self.image = image
        self.background = background
        self.fixation_kwargs = fixation_kwargs
        self.result: Fixations | None = None
        _, self.display = model.prepare(image)
        top = model.predict(image, k=5)
        top_ids = [i for i, _, _ in top]
        options = [(f"★ {lab} ({p:.1%})", i) for i, lab, p in top]
        options += [(f"{i}: {lab}", i) for i, lab in enumerate(model.labels) if i not in top_ids]
        self._valid_targets = {i for _, i in options}

        style = {"description_width": "initial"}
        self.target_select = widgets.Dropdown(options=options, description="target",
                                              layout=widgets.Layout(width="320px"))
        self.layer_slider = widgets.IntSlider(0, 0, 0, description="backtrack step",
                                              readout=False, style=style,
                                              layout=widgets.Layout(width="320px"))
        self.layer_label = widgets.HTML()
        self.sigma_slider = widgets.FloatSlider(value=0.0, min=0.0, max=60.0, step=0.5,
                                                description="σ (px, 0 = default)", style=style)
        self.outlier_box = widgets.Checkbox(value=True, description="outlier removal",
                                            indent=False)
        self.box_box = widgets.Checkbox(value=True, description="box", indent=False)

        h, w = self.display.shape[:2]
        self.figure, self.canvas = make_figure(10.5, 3.85, dpi=80)
        axes = self.figure.subplots(1, 3)
        self._fix_art = draw_fixations(axes[0], self.display, [], title="CNN Fixations")
        self._layer_art = draw_layer(axes[1], self.display, [], (1, 1, 1), title="backtrack")
        self._heat_art = draw_heatmap(axes[2], self.display, self.display[..., 0] * 0,
                                      title="heatmap")

        # the traitlets are the state; the controls follow them
        self.bind(self.target_select, "target")
        self.bind(self.layer_slider, "layer", to_trait=self._layer_at, to_control=self._layer_index)
        self.bind(self.sigma_slider, "sigma")
        self.bind(self.outlier_box, "outlier_removal")
        self.bind(self.box_box, "show_box")

        controls = widgets.VBox([
            widgets.HBox([self.target_select, self.sigma_slider]),
            widgets.HBox([self.layer_slider, self.layer_label]),
            widgets.HBox([self.outlier_box, self.box_box]),
        ])
        self.children = [controls, self.errors, self.status, self.canvas.view]

        if sigma is not None:
            self.sigma = float(sigma)
        first = top_ids[0] if target is None else check_target(model, target, image)
        if first == self.target:  # the trait default equals the target: observe won't fire
            self._compute()
        else:
            self.target = first

    # ------------------------------------------------------------------ validation
    @traitlets.validate("target")
    def _valid_target(self, proposal):
        value = proposal["value"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = int(value)
            if value not in self._valid_targets:
                raise traitlets.TraitError(
                    f"target {value} is not a class of the model (0–{len(self.model.labels) - 1})")
            return value
        return check_target(self.model, value, self.image)

    @traitlets.validate("sigma")
    def _valid_sigma(self, proposal):
        value = float(proposal["value"])
        if not 0.0 <= value <= 500.0:
            raise traitlets.TraitError(f"sigma must be between 0 and 500 pixels, not {value}")
        return value

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        value = proposal["value"]
        if self.result is not None and value not in self.result.trace:
            names = ", ".join(list(self.result.trace)[:6])
            raise traitlets.TraitError(
                f"{value!r} is not a layer of this backtrack; layers run {names}, … "
                "(widget.result.layers() lists them all)")
        return value

    # ------------------------------------------------------------------ observers
    @traitlets.observe("target")
    def _target_changed(self, change):
        self._compute()

    def _compute(self):
        self.status.value = (f"<i>backtracking "
                             f"{name_of(self.model, self.target, self.image)!r}…</i>")
        target = self.target
        self.submit(
            lambda cancel: fixations(self.model, self.image, target, **self.fixation_kwargs),
            self._show_result,
            background=self.background,
        )

    def _show_result(self, result: Fixations):
        self.result = result.with_outlier_removal(self.outlier_removal)
        names = result.layers()
        keep = self.layer if self.layer in result.trace else names[0]
        with self.quietly():
            self.layer_slider.max = len(names) - 1
        which = f"class {result.target}, " if isinstance(result.target, int) else ""
        self.status.value = (
            f"{result.label!r} ({which}p = {result.probability:.1%}): "
            f"{len(result.all_points)} pixels reached through {len(names) - 1} layers")
        if self.layer == keep:
            self._draw_layer()
        else:
            self.layer = keep
        self.resync("layer")  # the slider's steps are the new backtrack's layers
        self._draw_points()
        self._draw_heatmap()

    def _layer_at(self, index: int):
        """The backtrack's layer at a step of the slider."""
        return KEEP if self.result is None else self.result.layers()[index]

    def _layer_index(self, layer: str):
        """The slider's step of a backtrack layer."""
        if self.result is None or layer not in self.result.trace:
            return KEEP
        return self.result.layers().index(layer)

    @traitlets.observe("layer")
    def _layer_changed(self, change):
        self._draw_layer()

    @traitlets.observe("sigma")
    def _sigma_changed(self, change):
        self._draw_heatmap()

    @traitlets.observe("outlier_removal")
    def _outliers_changed(self, change):
        if self.result is not None:
            self.result = self.result.with_outlier_removal(change["new"])
            self._draw_points()
            self._draw_heatmap()

    @traitlets.observe("show_box")
    def _box_changed(self, change):
        self._draw_points()

    # ------------------------------------------------------------------ drawing
    def _draw_points(self):
        r = self.result
        if r is None:
            return
        title = f"{len(r.points)} fixations" + (
            f" ({len(r.outliers)} outliers)" if r.outlier_removal else "")
        update_fixations(self._fix_art, r.points, r.outliers,
                         r.box() if self.show_box else None, title=title)
        self.canvas.draw_idle()

    def _draw_layer(self):
        r = self.result
        if r is None or self.layer not in r.trace:
            return
        names = r.layers()
        index = names.index(self.layer)
        shape = r.shapes[self.layer]
        points = r.trace[self.layer]
        kind = "units" if shape[1] * shape[2] == 1 else f"{shape[1]}×{shape[2]} grid"
        self.layer_label.value = (
            f"<b>{index + 1}/{len(names)}</b> <code>{self.layer}</code> — {len(points)} points, "
            f"C={shape[0]}, {kind}")
        update_layer(self._layer_art, points, shape,
                     title=f"{self.layer}: {len(points)} points ({kind})")
        self.canvas.draw_idle()

    def _draw_heatmap(self):
        r = self.result
        if r is None:
            return
        sigma = self.sigma or None
        shown = sigma if sigma is not None else r.default_sigma()
        update_heatmap(self._heat_art, r.heatmap(sigma), title=f"heatmap (σ = {shown:.1f} px)")
        self.canvas.draw_idle()
