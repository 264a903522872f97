"""``cw.AttributionExplorer``: any attribution method, target and layer, with the method's own
parameters as controls (built from the registry's specs), and up to four methods side by side.

State is traitlets (``method``, ``target``, ``layer``, ``params``, ``compare``, ``alpha``,
``cmap``, ``evaluate``); setting one from code updates the controls and the view. Computation
runs in a background thread; a newer selection cancels the older one and a stale result is
dropped. With ``evaluate`` on, every shown map also gets its deletion and insertion curves
(``cw.metrics``), drawn together under the maps so the methods can be compared on faithfulness.
"""
from __future__ import annotations

import collections
import html

import ipywidgets as widgets
import traitlets

from ..engine.attribution import Cancelled, attribute, get_method, methods
from ..engine.attribution.core import check_map_layer, default_layer
from ..engine.cache import weights_state
from ..engine.metrics import deletion, insertion
from ..engine.model import as_model
from ..engine.targets import check as check_target, class_of, name_of, rectangle
from ..render.attribution import COLORMAPS
from .attribution_figures import MAX_PANELS, AttributionFigures
from .base import KEEP, WidgetBase

EVAL_STEPS = 25  #: steps of the deletion / insertion curves in the widget (a quick look)
KEPT = 16  #: computed views kept, so that going back to one shows it without computing


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
    return widgets.Text(description=spec.name, value=str(value), style=style, layout=layout,
                        continuous_update=False)


def _request(names, target, layer, params, evaluate, model):
    """What a view is computed from, as a key of the views kept (None: a target that cannot
    be a key: it is then computed every time). The target is the key itself, compared as it
    compares (a Region by identity: its mask is not read)."""
    if isinstance(target, list):
        target = tuple(target)
    try:
        hash(target)
        hash(tuple(params.items()))
    except TypeError:
        return None
    return (tuple(names), type(target), target, layer, tuple(sorted(params.items())), evaluate,
            weights_state(*model.module.modules()))


def _search_target(text: str):
    """The class of an entry of the label search ("9: goldfish"), or KEEP."""
    return int(text.split(":", 1)[0]) if text and ":" in text else KEEP


def _attribute_all(model, image, names, *, target, layer, params, evaluate, cancel, progress):
    """``(attributions, curves)`` of the methods ``names`` (the first with ``params``), or
    None when cancelled. A compared method's error stands in its place (shown in its panel);
    the first method's error is raised. With ``evaluate``, ``curves`` holds each map's
    ``(deletion, insertion)`` (None for an error). ``progress(what, done, total)``."""
    stage = {"what": ", ".join(names)}

    def step(done, total):
        progress(stage["what"], done, total)

    results = []
    try:
        for i, name in enumerate(names):
            try:
                results.append(attribute(
                    model, image, name, target=target,
                    layer=(layer or None) if get_method(name).layer else None, cancel=cancel,
                    progress=step, **(params if i == 0 else {})))
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a compared method's own error
                if i == 0:
                    raise
                results.append(exc)
        curves = []
        for r in results if evaluate else []:
            if isinstance(r, Exception):
                curves.append(None)
                continue
            pair = []
            for kind, fn in (("deletion", deletion), ("insertion", insertion)):
                stage["what"] = f"{kind} curve of {r.method}"
                pair.append(fn(model, image, r, steps=EVAL_STEPS, cancel=cancel, progress=step))
            curves.append(tuple(pair))
    except Cancelled:
        return None
    return results, curves


class AttributionExplorer(WidgetBase):
    """Explore attribution maps of ``model`` on ``image``.

    ``method``: the main method; ``target``: class index or label (``None`` = top-1), or any
    target ``cw.attribute`` takes (a list of classes, ``cw.targets.Region`` / ``Box``, a
    callable), whose name is shown; for a dense output the *region* sliders and button, or a
    click-and-drag on the input panel, pick a rectangle of output pixels for the chosen class
    (``rows``, ``cols``: its inclusive ranges; releasing the drag explains it);
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
    #: a dense output's region: inclusive ranges of output rows and columns (the sliders')
    rows = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(0, 0))
    cols = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(0, 0))

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
        _, self.display = model.prepare(self.image)
        self.top = model.predict(self.image, k=5)
        self._param_controls: dict = {}
        self._memory: dict = {}  # method → its last parameters, restored when it is chosen again
        self._kept: collections.OrderedDict = collections.OrderedDict()  # request → outcome
        self._computed = 0  # outcomes computed so far: each one's number names it (kept frames)
        self.keep = KEPT  #: how many computed views are kept (0: always compute)
        self._quiet = False

        self.figures = AttributionFigures(self.display)
        self.figure = self.figures.single_fig
        controls = self._build_controls()
        self.children = [widgets.HBox([controls, widgets.VBox([self.figures.canvas_box,
                                                               self.figures.eval_box])]),
                         self.status, self.errors]
        with self.hold_trait_notifications():
            self.method = method
            self.target = self.top[0][0] if target is None else target
            self.compare = list(compare)
        self._build_params()
        self._show_mode()
        # reactions: their errors show in the widget, and stay when they start a computation
        self.observe(self.guarded(self._on_method, clear=False), "method")
        self.observe(self.guarded(self._on_state, clear=False),
                     ["target", "layer", "params", "compare", "evaluate"])
        self.observe(self.guarded(self._restyle, clear=False), ["alpha", "cmap"])
        self.refresh()

    def _build_controls(self) -> widgets.VBox:
        """The controls, bound to the traitlets, in a column left of the figures."""
        kinds = {"gradient": "gradient", "cam": "CAM", "perturbation": "perturbation",
                 "other": "other"}
        self.method_select = widgets.Dropdown(
            options=[(f"{n}  ({kinds[get_method(n).kind]})", n) for n in methods()],
            description="method", layout=widgets.Layout(width="300px"))
        self.top_select = widgets.Dropdown(
            options=[(f"{lab} ({p:.1%})", i) for i, lab, p in self.top],
            description="top-5", layout=widgets.Layout(width="300px"))
        self.label_search = widgets.Combobox(
            options=[f"{i}: {lab}" for i, lab in enumerate(self.model.labels)],
            placeholder="search all labels…", description="any class", ensure_option=True,
            layout=widgets.Layout(width="300px"))
        self.layer_select = widgets.Dropdown(
            options=[(f"default ({default_layer(self.model)})", "")]
            + [(n, n) for n in self.model.layers()],
            description="layer", layout=widgets.Layout(width="300px"))
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
        self._no_params = widgets.HTML("<i>no parameters</i>")  # one, not one per switch
        self.target_label = widgets.HTML()
        self.region_box = self._region_controls()
        self.bind(self.method_select, "method")
        self.bind(self.top_select, "target")
        self.bind(self.label_search, "target", to_trait=_search_target, to_control=lambda _: KEEP)
        self.bind(self.layer_select, "layer")
        self.bind(self.alpha_slider, "alpha")
        self.bind(self.cmap_select, "cmap")
        self.bind(self.compare_select, "compare", to_trait=lambda v: list(v)[:MAX_PANELS - 1],
                  to_control=tuple)
        self.bind(self.evaluate_check, "evaluate")
        self.cancel_button.on_click(self.guarded(lambda b: self.cancel(), clear=False))
        return widgets.VBox([
            self.method_select, self.top_select, self.label_search, self.target_label,
            self.region_box, self.layer_select,
            widgets.HTML("<b>parameters</b>"), self.param_box,
            widgets.HTML("<b>view</b>"), self.alpha_slider, self.cmap_select,
            self.compare_select, widgets.HTML("<b>evaluate</b>"), self.evaluate_check,
            self.cancel_button,
        ], layout=widgets.Layout(width="320px"))

    def _region_controls(self) -> widgets.VBox:
        """For a dense output (N×C×H×W): row and column ranges of output pixels and a button
        that explains the chosen class over them (``cw.targets.Region``); empty otherwise."""
        shape = self.model.output_shape
        if shape is None or len(shape) != 3:
            return widgets.VBox()
        _, h, w = shape
        layout = widgets.Layout(width="300px")
        self.region_rows = widgets.IntRangeSlider(value=(0, h - 1), min=0, max=h - 1,
                                                  description="rows", layout=layout)
        self.region_cols = widgets.IntRangeSlider(value=(0, w - 1), min=0, max=w - 1,
                                                  description="columns", layout=layout)
        self.region_button = widgets.Button(description="explain this region",
                                            tooltip="the class's scores summed over these "
                                                    "output pixels")
        self.region_button.on_click(self.guarded(lambda b: self.pick_region()))
        self.rows, self.cols = (0, h - 1), (0, w - 1)
        self.bind(self.region_rows, "rows", to_trait=tuple, to_control=tuple)
        self.bind(self.region_cols, "cols", to_trait=tuple, to_control=tuple)
        self.figures.choose_region((h, w), self.guarded(self._drag_to),
                                   self.guarded(self.pick_region))
        self.figures.show_region(self.rows, self.cols)
        self.observe(self.guarded(lambda c: self.figures.show_region(self.rows, self.cols)),
                     ["rows", "cols"])
        return widgets.VBox([widgets.HTML("<b>region of the output</b>"), self.region_rows,
                             self.region_cols, self.region_button])

    def _drag_to(self, rows, cols) -> None:
        """A drag on the input panel moved: the region (and so its sliders and outline)."""
        with self.hold_trait_notifications():
            self.rows, self.cols = tuple(rows), tuple(cols)

    def pick_region(self, rows=None, cols=None) -> None:
        """Explain the current class over a rectangle of output pixels (``rows`` / ``cols``
        when given, else the current ones: the sliders', or the last drag's)."""
        self._drag_to(self.rows if rows is None else rows, self.cols if cols is None else cols)
        cls = class_of(self.model, self.target)
        self.target = rectangle(self.model, self.top[0][0] if cls is None else cls,
                                self.rows, self.cols)

    # ------------------------------------------------------------------ validation
    @traitlets.validate("method")
    def _valid_method(self, proposal):
        return get_method(proposal.value).name

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        value = proposal.value
        return check_target(self.model, self.top[0][0] if value is None else value, self.image)

    @traitlets.validate("rows", "cols")
    def _valid_range(self, proposal):
        shape = self.model.output_shape
        if shape is None or len(shape) != 3:
            raise traitlets.TraitError("a region of output pixels needs a dense output N×C×H×W")
        size = shape[1] if proposal.trait.name == "rows" else shape[2]
        low, high = proposal.value
        if not 0 <= low <= high < size:
            raise traitlets.TraitError(
                f"{proposal.trait.name} must be a range (first, last) within 0…{size - 1}, "
                f"not {tuple(proposal.value)}")
        return (int(low), int(high))

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        return check_map_layer(self.model, proposal.value) if proposal.value else ""

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
    def _on_state(self, change):
        if self._quiet:
            return
        if change.name == "params":
            self._memory[self.method] = dict(change.new)
        self._show_mode()
        self.refresh()

    def _on_method(self, change):
        self._build_params()
        self._show_mode()
        self.refresh()

    def _build_params(self):
        """Controls for the current method, generated from its ``Param`` specs."""
        spec = get_method(self.method)
        values = spec.resolve(self._memory.get(spec.name, {}))
        for ctrl in self._param_controls.values():  # replaced: unbound and closed, not leaked
            self.unbind(ctrl)
            ctrl.close()
        self._param_controls = {p.name: _control(p, values[p.name]) for p in spec.params}
        self.param_box.children = list(self._param_controls.values()) or [self._no_params]
        self._quiet = True
        try:
            self.params = values
        finally:
            self._quiet = False
        for name, ctrl in self._param_controls.items():
            self.bind(ctrl, "params", to_trait=lambda v, name=name: {**self.params, name: v},
                      to_control=lambda params, name=name: params.get(name, KEEP))

    def _show_mode(self):
        """The layer menu for CAM methods only; the compare figure when methods are compared;
        the curves while ``evaluate`` is on."""
        self.layer_select.disabled = not get_method(self.method).layer
        self.figure = self.figures.select(bool(self.compare), self.evaluate)

    # ------------------------------------------------------------------ computing
    def cancel(self) -> None:
        """Stop the running computation (it raises ``Cancelled`` within one layer's work)."""
        self.task.cancel()

    def refresh(self) -> None:
        """Recompute the shown methods in the background (a newer call supersedes this one).
        A request computed before — same methods, target, layer, parameters and curves, and
        the network's weights unchanged since — is shown at once from what was kept
        (:data:`KEPT` requests), without computing."""
        names = [self.method] + [n for n in self.compare if n != self.method]
        target, layer, params = self.target, self.layer, dict(self.params)
        evaluate = self.evaluate
        label = name_of(self.model, target, self.image)
        self.target_label.value = f"explaining: <b>{html.escape(label)}</b>"
        request = _request(names, target, layer, params, evaluate, self.model)

        def done(outcome, kept=None):
            self.cancel_button.disabled = True
            if outcome is None:
                self.status.value = "cancelled"
                return
            if kept is None:  # computed now: numbered
                kept = False
                self._computed += 1
                outcome = (*outcome, self._computed)
                if request is not None:
                    self._kept[request] = outcome
            if request is not None:
                self._kept.move_to_end(request)
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
            results, curves, number = outcome
            self.result = results
            self.curves = curves
            self.figures.show(results, names, compare=bool(self.compare), alpha=self.alpha,
                              cmap=self.cmap, token=number)
            if evaluate:
                self.figures.show_curves(curves)
            took = ", ".join(f"{r.method} {r.seconds:.2f} s" for r in results
                             if not isinstance(r, Exception))
            which = f" (class {target})" if isinstance(target, int) else ""
            self.status.value = f"“{label}”{which}: {took}" + (" (computed before)" if kept
                                                                else "")

        if request is not None and request in self._kept:
            self.task.supersede()  # a computation still running must not overwrite it later
            done(self._kept[request], kept=True)
            self.errors.clear()
            return
        self.status.value = f"computing {', '.join(names)} for “{label}”…"
        self.cancel_button.disabled = False

        def work(cancel):
            # on the main thread (a widget's state is changed there only), newest report only
            show = self.latest_on_main(lambda report: None if cancel.is_set()
                                       else setattr(self.status, "value", report))

            def progress(what, done, total):
                show(f"computing {what}… {done}/{total}")

            return _attribute_all(self.model, self.image, names, target=target, layer=layer,
                                  params=params, evaluate=evaluate, cancel=cancel,
                                  progress=progress)

        self.submit(work, done, background=self.background,
                    failed=lambda exc: setattr(self.cancel_button, "disabled", True))

    def _restyle(self, change=None):
        self.figures.restyle(self.result, compare=bool(self.compare), alpha=self.alpha,
                             cmap=self.cmap)

    def default_layer(self) -> str:
        """The layer CAM methods use when ``layer`` is ``""``."""
        return default_layer(self.model)
