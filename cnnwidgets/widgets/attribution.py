"""``cw.AttributionExplorer``: any attribution method, target and layer, with the method's own
parameters as controls (built from the registry's specs), and up to four methods side by side.

State is traitlets (``method``, ``target``, ``layer``, ``params``, ``compare``, ``alpha``,
``cmap``, ``evaluate``); setting one from code updates the controls and the view. Computation
runs in a background thread; a newer selection cancels the older one and a stale result is
dropped. With ``evaluate`` on, every shown map also gets its deletion and insertion curves
(``cw.metrics``), drawn together under the maps so the methods can be compared on faithfulness.
"""
from __future__ import annotations

import threading

import ipywidgets as widgets
import numpy as np
import traitlets

from ..engine.attribution import Cancelled, attribute, get_method, methods
from ..engine.attribution.core import check_layer, default_layer
from ..engine.metrics import deletion, insertion
from ..engine.model import as_model
from ..render.attribution import (
    COLORMAPS,
    DEFAULT_CMAP,
    DEFAULT_SIGNED_CMAP,
    draw_attribution,
    draw_image,
    set_message,
    show_panel,
    update_attribution,
)
from ..render.metrics import draw_curves
from .base import WidgetBase, make_figure

MAX_PANELS = 4
EVAL_STEPS = 25  #: steps of the deletion / insertion curves in the widget (a quick look)


def _control(spec, value):
    """An ipywidgets control for one registry ``Param`` (no per-method code anywhere)."""
    style = {"description_width": "initial"}
    layout = widgets.Layout(width="300px")
    common = dict(description=spec.name, value=value, style=style, layout=layout,
                  tooltip=spec.help, continuous_update=False)
    low, high = spec.range if spec.range else (None, None)
    if spec.type is bool:
        return widgets.Checkbox(description=spec.name, value=value, tooltip=spec.help, indent=False)
    if spec.type is str and spec.choices:
        return widgets.Dropdown(options=list(spec.choices), description=spec.name, value=value,
                                style=style, layout=layout, tooltip=spec.help)
    if spec.type is int:
        if low is not None and high is not None and high - low <= 1024:
            return widgets.IntSlider(min=low, max=high, step=int(spec.step or 1), **common)
        return widgets.BoundedIntText(min=low if low is not None else -2**31,
                                      max=high if high is not None else 2**31 - 1, **common)
    if spec.type is float:
        if low is not None and high is not None:
            return widgets.FloatSlider(min=low, max=high, step=spec.step or (high - low) / 100,
                                       readout_format=".2f", **common)
        return widgets.FloatText(**common)
    return widgets.Text(description=spec.name, value=str(value), style=style, layout=layout)


class AttributionExplorer(WidgetBase):
    """Explore attribution maps of ``model`` on ``image``.

    ``method``: the main method; ``target``: class index or label (``None`` = top-1);
    ``layer``: layer for CAM methods (``""`` = the method's default); ``params``: the main
    method's parameters (defaults filled in); ``compare``: up to three more methods shown
    side by side (with their default parameters); ``alpha``, ``cmap``: overlay look;
    ``evaluate``: also compute and draw each map's deletion and insertion curves
    (``EVAL_STEPS`` steps each; ``curves`` holds the last ones).
    """

    method = traitlets.Unicode("grad_cam")
    target = traitlets.Any(None)
    layer = traitlets.Unicode("")
    params = traitlets.Dict()
    compare = traitlets.List(traitlets.Unicode())
    alpha = traitlets.Float(0.5)
    cmap = traitlets.Unicode("auto")
    evaluate = traitlets.Bool(False)

    def __init__(self, model, image, method: str = "grad_cam", target=None, *,
                 compare=(), background: bool = True, **kwargs):
        super().__init__(**kwargs)
        from ..engine import load_image

        self.model = model = as_model(model, "AttributionExplorer")
        self.image = load_image(image)
        self.background = background
        self.result = None  #: the last list of ``cw.Attribution`` shown
        #: the last deletion / insertion curves: ``[(deletion, insertion)]``, one per map
        self.curves: list = []
        self._cancel = threading.Event()
        self._busy = False
        _, self.display = model.prepare(self.image)
        self.top = model.predict(self.image, k=5)

        # ---------------------------------------------------------- controls
        kinds = {"gradient": "gradient", "cam": "CAM", "perturbation": "perturbation",
                 "other": "other"}
        self.method_select = widgets.Dropdown(
            options=[(f"{n}  ({kinds[get_method(n).kind]})", n) for n in methods()],
            description="method", layout=widgets.Layout(width="300px"))
        self.top_select = widgets.Dropdown(
            options=[(f"{lab} ({p:.1%})", i) for i, lab, p in self.top],
            description="top-5", layout=widgets.Layout(width="300px"))
        self.label_search = widgets.Combobox(
            options=[f"{i}: {lab}" for i, lab in enumerate(model.labels)],
            placeholder="search all labels…", description="any class", ensure_option=True,
            layout=widgets.Layout(width="300px"))
        self.layer_select = widgets.Dropdown(
            options=[(f"default ({default_layer(model)})", "")] + [(n, n) for n in model.layers()],
            description="layer",
            layout=widgets.Layout(width="300px"))
        self.alpha_slider = widgets.FloatSlider(value=0.5, min=0, max=1, step=0.05,
                                                description="opacity",
                                                layout=widgets.Layout(width="300px"))
        self.cmap_select = widgets.Dropdown(options=["auto", *COLORMAPS], description="colours",
                                            layout=widgets.Layout(width="300px"))
        self.compare_select = widgets.SelectMultiple(
            options=methods(), description="compare", rows=5,
            layout=widgets.Layout(width="300px"))
        self.evaluate_check = widgets.Checkbox(
            value=False, description="deletion / insertion curves", indent=False,
            tooltip="how fast the score falls as the map's top pixels are removed, and rises "
                    "as they are inserted (slower: 2 × 26 forward passes per map)")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop",
                                            button_style="warning", disabled=True,
                                            layout=widgets.Layout(width="120px"))
        self.param_box = widgets.VBox()
        self._param_controls: dict = {}
        self._memory: dict = {}  # method → its last parameters, restored when it is chosen again
        self._quiet = False
        self._names: list = []

        # ---------------------------------------------------------- figures
        self.single_fig, self.single_canvas = make_figure(7.0, 3.6)
        axes = self.single_fig.subplots(1, 2)
        self._image_panel = draw_image(axes[0], self.display, "input")
        blank = np.zeros(self.display.shape[:2], dtype=np.float32)
        self._main_panel = draw_attribution(axes[1], blank, self.display, alpha=0.5)
        self.compare_fig, self.compare_canvas = make_figure(11.0, 3.3, dpi=80)
        axes = self.compare_fig.subplots(1, MAX_PANELS)
        self._panels = [draw_attribution(ax, blank, self.display, alpha=0.5) for ax in axes]
        self.figure = self.single_fig
        # A canvas leaves the page in a Box of its own: JupyterLab keeps the element of an ipympl
        # canvas taken out of a container on the page (and adds another when it comes back),
        # while a removed Box takes its whole subtree with it.
        self._single_holder = widgets.Box([self.single_canvas])
        self._compare_holder = widgets.Box([self.compare_canvas])
        self.canvas_box = widgets.Box([self._single_holder])
        self.eval_fig, self.eval_canvas = make_figure(7.0, 2.6, dpi=90)
        self._eval_axes = self.eval_fig.subplots(1, 2)
        self.eval_fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.86, wspace=0.25)
        self._eval_holder = widgets.Box([self.eval_canvas])
        self.eval_box = widgets.Box([])  # holds the curves while ``evaluate`` is on

        controls = widgets.VBox([
            self.method_select, self.top_select, self.label_search, self.layer_select,
            widgets.HTML("<b>parameters</b>"), self.param_box,
            widgets.HTML("<b>view</b>"), self.alpha_slider, self.cmap_select,
            self.compare_select, widgets.HTML("<b>evaluate</b>"), self.evaluate_check,
            self.cancel_button,
        ], layout=widgets.Layout(width="320px"))
        self.children = [widgets.HBox([controls, widgets.VBox([self.canvas_box, self.eval_box])]),
                         self.status, self.errors]

        # ---------------------------------------------------------- wiring
        self.method_select.observe(self._guard(lambda c: setattr(self, "method", c.new)), "value")
        self.top_select.observe(self._guard(lambda c: setattr(self, "target", c.new)), "value")
        self.label_search.observe(self._guard(self._on_search), "value")
        self.layer_select.observe(self._guard(lambda c: setattr(self, "layer", c.new)), "value")
        self.alpha_slider.observe(self._guard(lambda c: setattr(self, "alpha", c.new)), "value")
        self.cmap_select.observe(self._guard(lambda c: setattr(self, "cmap", c.new)), "value")
        self.compare_select.observe(
            self._guard(lambda c: setattr(self, "compare", list(c.new)[:MAX_PANELS - 1])), "value")
        self.evaluate_check.observe(self._guard(lambda c: setattr(self, "evaluate", c.new)),
                                    "value")
        self.cancel_button.on_click(self._guard(lambda b: self.cancel()))

        with self.hold_trait_notifications():
            self.method = method
            self.target = self.top[0][0] if target is None else target
            self.compare = list(compare)
        self._build_params()
        self._sync_controls()
        self._observe()
        self.refresh()

    def _guard(self, fn):
        """Like ``guarded``, but leaves clearing the error box to the computation's result:
        these callbacks start computations whose errors (in the foreground) must stay shown."""

        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                self.errors.show(exc)
                return None

        return wrapper

    # ------------------------------------------------------------------ validation
    @traitlets.validate("method")
    def _valid_method(self, proposal):
        return get_method(proposal.value).name

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        value = proposal.value
        if value is None:
            return self.top[0][0]
        return self.model.target_index(value)

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        return check_layer(self.model, proposal.value) if proposal.value else ""

    @traitlets.validate("compare")
    def _valid_compare(self, proposal):
        names = [get_method(n).name for n in proposal.value]
        if len(names) > MAX_PANELS - 1:
            raise traitlets.TraitError(
                f"compare takes at most {MAX_PANELS - 1} methods (shown beside the main one)")
        return names

    @traitlets.validate("alpha")
    def _valid_alpha(self, proposal):
        if not 0.0 <= proposal.value <= 1.0:
            raise traitlets.TraitError(f"alpha must be between 0 and 1, not {proposal.value}")
        return proposal.value

    @traitlets.validate("cmap")
    def _valid_cmap(self, proposal):
        import matplotlib

        if proposal.value != "auto" and proposal.value not in matplotlib.colormaps:
            raise traitlets.TraitError(f"unknown colour map {proposal.value!r}")
        return proposal.value

    @traitlets.validate("params")
    def _valid_params(self, proposal):
        return get_method(self.method).resolve(dict(proposal.value))

    # ------------------------------------------------------------------ reactions
    def _observe(self):
        self.observe(self._guard(self._on_method), "method")
        self.observe(self._guard(self._on_state),
                     ["target", "layer", "params", "compare", "evaluate"])
        self.observe(self._guard(lambda c: (self._sync_controls(), self._restyle())),
                     ["alpha", "cmap"])

    def _on_state(self, change):
        if self._quiet:
            return
        if change.name == "params":
            self._memory[self.method] = dict(change.new)
        self._sync_controls()
        self.refresh()

    def _on_method(self, change):
        self._build_params()
        self._sync_controls()
        self.refresh()

    def _on_search(self, change):
        if change.new and ":" in change.new:
            self.target = int(change.new.split(":", 1)[0])

    def _build_params(self):
        """Controls for the current method, generated from its ``Param`` specs."""
        spec = get_method(self.method)
        values = spec.resolve(self._memory.get(spec.name, {}))
        self._param_controls = {}
        for p in spec.params:
            ctrl = _control(p, values[p.name])
            ctrl.observe(self._guard(lambda c, name=p.name: self._set_param(name, c.new)), "value")
            self._param_controls[p.name] = ctrl
        self.param_box.children = list(self._param_controls.values()) or [
            widgets.HTML("<i>no parameters</i>")]
        self._quiet = True
        try:
            self.params = values
        finally:
            self._quiet = False

    def _set_param(self, name, value):
        self.params = {**self.params, name: value}

    def _sync_controls(self):
        """Make every control show the traitlets' values (after a change from code)."""
        self.method_select.value = self.method
        if self.target in [i for i, _, _ in self.top]:
            self.top_select.value = self.target
        spec = get_method(self.method)
        self.layer_select.disabled = not spec.layer
        if self.layer in [value for _, value in self.layer_select.options]:
            self.layer_select.value = self.layer
        for name, ctrl in self._param_controls.items():
            if name in self.params and ctrl.value != self.params[name]:
                ctrl.value = self.params[name]
        self.alpha_slider.value = self.alpha
        self.cmap_select.value = self.cmap
        self.compare_select.value = tuple(n for n in self.compare if n in methods())
        self.evaluate_check.value = self.evaluate
        self.eval_box.children = [self._eval_holder] if self.evaluate else []
        compare = bool(self.compare)
        self.figure = self.compare_fig if compare else self.single_fig
        self.canvas_box.children = [self._compare_holder if compare else self._single_holder]

    # ------------------------------------------------------------------ computing
    def cancel(self) -> None:
        """Stop the running computation (it raises ``Cancelled`` between batches)."""
        self._cancel.set()

    cancel_background = cancel  # the interpreter's exit stops a running computation too

    def refresh(self) -> None:
        """Recompute the shown methods in the background (a newer call supersedes this one)."""
        self._cancel.set()  # stop the stale computation, if any
        cancel = self._cancel = threading.Event()
        names = [self.method] + [n for n in self.compare if n != self.method]
        target, layer, params = self.target, self.layer, dict(self.params)
        evaluate = self.evaluate
        label = self.model.label(target)
        self.status.value = f"computing {', '.join(names)} for “{label}”…"
        self.cancel_button.disabled = False
        stage = {"what": ", ".join(names)}

        def progress(done, total):
            if not cancel.is_set():
                self.status.value = f"computing {stage['what']}… {done}/{total}"

        def curves_of(results):
            out = []
            for r in results:
                if isinstance(r, Exception):
                    out.append(None)
                    continue
                pair = []
                for kind, fn in (("deletion", deletion), ("insertion", insertion)):
                    stage["what"] = f"{kind} curve of {r.method}"
                    pair.append(fn(self.model, self.image, r, steps=EVAL_STEPS, cancel=cancel,
                                   progress=progress))
                out.append(tuple(pair))
            return out

        def compute():
            results = []
            try:
                for i, name in enumerate(names):
                    spec = get_method(name)
                    try:
                        results.append(attribute(
                            self.model, self.image, name, target=target,
                            layer=(layer or None) if spec.layer else None, cancel=cancel,
                            progress=progress, **(params if i == 0 else {})))
                    except Cancelled:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a compared method's own error
                        if i == 0:
                            raise
                        results.append(exc)  # shown in its panel, the others still show
                curves = curves_of(results) if evaluate else []
            except Cancelled:
                return None
            return results, curves

        def done(outcome):
            self.cancel_button.disabled = True
            if outcome is None:
                self.status.value = "cancelled"
                return
            results, curves = outcome
            self.result = results
            self.curves = curves
            self._names = names
            self._show(results)
            if evaluate:
                self._show_curves(curves)
            took = ", ".join(f"{r.method} {r.seconds:.2f} s" for r in results
                             if not isinstance(r, Exception))
            self.status.value = f"“{label}” (class {target}): {took}"

        self.submit(compute, done, background=self.background)

    # ------------------------------------------------------------------ drawing
    def _cmap_for(self, signed: bool) -> str:
        if self.cmap != "auto":
            return self.cmap
        return DEFAULT_SIGNED_CMAP if signed else DEFAULT_CMAP

    def _show(self, results):
        if len(results) == 1 and not self.compare:
            r = results[0]
            update_attribution(self._main_panel, r.map, signed=r.signed, alpha=self.alpha,
                               cmap=self._cmap_for(r.signed), title=r.title(),
                               fade=r.signed, fine=r.fine)
            self.single_canvas.draw_idle()
            return
        blank = np.zeros(self.display.shape[:2], dtype=np.float32)
        for i, panel in enumerate(self._panels):
            if i < len(results) and isinstance(results[i], Exception):
                update_attribution(panel, blank, fade=True, fine=False,
                                   title=f"{self._names[i]}: error")
                set_message(panel, str(results[i]))
            elif i < len(results):
                r = results[i]
                update_attribution(panel, r.map, signed=r.signed, alpha=self.alpha,
                                   cmap=self._cmap_for(r.signed), title=r.title(),
                                   fade=r.signed, fine=r.fine)
                set_message(panel, "")
            show_panel(panel, i < len(results))
        self.compare_canvas.draw_idle()

    def _show_curves(self, curves):
        pairs = [p for p in curves if p is not None]
        draw_curves(self._eval_axes[0], [d for d, _ in pairs])
        draw_curves(self._eval_axes[1], [i for _, i in pairs])
        self.eval_canvas.draw_idle()

    def _restyle(self):
        signed = [getattr(r, "signed", False) for r in (self.result or [])]
        panels = [self._main_panel] if not self.compare else self._panels
        for i, panel in enumerate(panels):
            s = signed[i] if i < len(signed) else False
            update_attribution(panel, alpha=self.alpha, cmap=self._cmap_for(s))
        self.single_canvas.draw_idle()
        self.compare_canvas.draw_idle()

    def default_layer(self) -> str:
        """The layer CAM methods use when ``layer`` is ``""``."""
        return default_layer(self.model)
