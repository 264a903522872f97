"""The application labs: ``cw.AttackExplorer`` (attack and watch) and ``cw.PruningExplorer``
(switch units off). Thin compositions of the engine's ``attack``, ``layer_drift``,
``attribute``, ``fixations``, ``ablate`` and ``prune_curve`` with the render layer's
drawing; every computation runs in the widget's background task, newer settings cancelling
older ones (stale results are dropped)."""
from __future__ import annotations

import ipywidgets as widgets
import traitlets

from ..engine.ablation import CRITERIA, ablate, prune_curve
from ..engine.attack import ATTACKS, attack, default_drift_layers, layer_drift
from ..engine.attribution import attribute, methods
from ..engine.featuremaps import feature_maps
from ..engine.fixations import fixations
from ..engine.hooks import layer_not_found
from ..engine.model import as_model
from ..render import applications as draw
from ..render.attribution import draw_attribution, update_attribution
from ..render.fixations import draw_fixations, update_fixations
from .base import WidgetBase, make_figure

EPSILON_MAX = 16  #: the ε slider's end, in grey levels (/255)
CHANNELS_SHOWN = 6  #: channels of the chosen layer shown clean vs adversarial
UNTARGETED = -1  #: ``target`` of an untargeted attack


class AttackExplorer(WidgetBase):
    """Attack an image and watch what changes.

    Top: the original crop, the perturbation (amplified so that ±ε spans black to white, its
    scale written), the adversarial image, and the top-3 before and after. Middle: the same
    attribution ``method`` (Grad-CAM by default; any of ``cw.methods()``) and the CNN
    Fixations, clean vs adversarial (each explains its own top-1). Bottom: how far each layer's
    activations moved, ‖A(x′) − A(x)‖ / ‖A(x)‖ by depth — click the curve to choose a layer —
    and that layer's channels that moved most (clean above, adversarial below).

    State (traitlets): ``epsilon`` (pixel units, 0 to 16/255 on the slider), ``attack``
    (``"fgsm"`` / ``"pgd"``), ``steps`` (PGD), ``target`` (−1: untargeted, else a class index
    to move towards), ``method`` (attribution), ``layer`` (the drift layer shown).
    ``result`` holds the last :class:`~cnnwidgets.engine.attack.Adversarial`, ``drift`` its
    ``Drift``. ``background=False`` computes in the calling thread.
    """

    epsilon = traitlets.Float(4 / 255)
    attack = traitlets.Unicode("fgsm")
    steps = traitlets.Int(10)
    target = traitlets.Int(UNTARGETED)
    method = traitlets.Unicode("grad_cam")
    layer = traitlets.Unicode("")

    def __init__(self, model, image, *, epsilon: float = 4 / 255, attack: str = "fgsm",
                 steps: int = 10, method: str = "grad_cam", layers=None,
                 background: bool = True):
        super().__init__()
        self._ready = False  # observers wait until the widget is built
        model = as_model(model, "AttackExplorer")
        self.model = model
        self.image = image
        self.background = background
        self.result = None
        self.drift = None
        self._clean = {}  # attribution method → the clean image's attribution (ε-independent)
        self._clean_fixations = None
        self._layers = list(layers) if layers is not None else default_drift_layers(model)
        _, self.display = model.prepare(image)
        options = [("untargeted (away from the top-1)", UNTARGETED)]
        options += [(f"→ {i}: {lab}", i) for i, lab in enumerate(model.labels)]
        self._n_classes = len(model.labels)

        style = {"description_width": "initial"}
        self.epsilon_slider = widgets.FloatSlider(
            value=4.0, min=0.0, max=float(EPSILON_MAX), step=0.5, description="ε (/255)",
            style=style, continuous_update=False, layout=widgets.Layout(width="330px"))
        self.attack_box = widgets.Dropdown(options=list(ATTACKS), description="attack",
                                           layout=widgets.Layout(width="170px"))
        self.steps_slider = widgets.IntSlider(10, 1, 50, description="PGD steps", style=style,
                                              continuous_update=False,
                                              layout=widgets.Layout(width="260px"))
        self.target_box = widgets.Dropdown(options=options, description="target",
                                           layout=widgets.Layout(width="330px"))
        self.method_box = widgets.Dropdown(options=methods(), description="map",
                                           layout=widgets.Layout(width="260px"))
        self.layer_box = widgets.Dropdown(options=self._layers, description="layer",
                                          layout=widgets.Layout(width="330px"))

        self.figure, self.canvas = make_figure(11.0, 8.6, dpi=72)
        f = self.figure
        row0 = [f.add_axes((0.01 + 0.245 * i, 0.66, 0.23, 0.29)) for i in range(4)]
        row1 = [f.add_axes((0.01 + 0.245 * i, 0.34, 0.23, 0.27)) for i in range(4)]
        self.ax_drift = f.add_axes((0.07, 0.06, 0.40, 0.22))
        self.ax_channels = f.add_axes((0.52, 0.03, 0.47, 0.25))
        blank = self.display * 0
        self._original = draw.draw_picture(row0[0], self.display, "original")
        self._perturbation = draw.draw_picture(row0[1], blank + 0.5, "perturbation")
        self._adversarial = draw.draw_picture(row0[2], self.display, "adversarial")
        row0[3].set_axis_off()
        self._topk = row0[3].text(0.02, 0.98, "", va="top", ha="left", fontsize=9,
                                  family="monospace", transform=row0[3].transAxes)
        heat = blank[..., 0]
        self._attr = [draw_attribution(row1[0], heat, self.display, title="clean"),
                      draw_attribution(row1[1], heat, self.display, title="adversarial")]
        self._fix = [draw_fixations(row1[2], self.display, [], title="fixations, clean"),
                     draw_fixations(row1[3], self.display, [], title="fixations, adversarial")]
        self._drift_art = draw.draw_drift(self.ax_drift)
        self._channel_art = draw.draw_channels(self.ax_channels, "channels that moved most")
        self.canvas.mpl_connect("button_press_event", self.guarded(self._on_click))

        self.bind(self.epsilon_slider, "epsilon", to_trait=lambda v: v / 255,
                  to_control=lambda v: round(v * 255 * 2) / 2)
        self.bind(self.attack_box, "attack")
        self.bind(self.steps_slider, "steps")
        self.bind(self.target_box, "target")
        self.bind(self.method_box, "method")
        self.bind(self.layer_box, "layer")
        controls = widgets.VBox([
            widgets.HBox([self.epsilon_slider, self.attack_box, self.steps_slider]),
            widgets.HBox([self.target_box, self.method_box, self.layer_box]),
        ])
        self.children = [controls, self.errors, self.status, self.canvas.view]

        self.epsilon, self.attack, self.steps, self.method = epsilon, attack, steps, method
        self._ready = True
        self._compute()

    # ------------------------------------------------------------------ validation
    @traitlets.validate("epsilon")
    def _valid_epsilon(self, proposal):
        value = float(proposal["value"])
        if not 0.0 <= value <= 1.0:
            raise traitlets.TraitError(f"epsilon must be from 0 to 1 (pixel units), not {value}")
        return value

    @traitlets.validate("attack")
    def _valid_attack(self, proposal):
        if proposal["value"] not in ATTACKS:
            raise traitlets.TraitError(f"attack must be one of {ATTACKS}, not {proposal['value']!r}")
        return proposal["value"]

    @traitlets.validate("steps")
    def _valid_steps(self, proposal):
        value = int(proposal["value"])
        if not 1 <= value <= 1000:
            raise traitlets.TraitError(f"steps must be from 1 to 1000, not {value}")
        return value

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        value = int(proposal["value"])
        if value != UNTARGETED and not 0 <= value < self._n_classes:
            raise traitlets.TraitError(f"target must be -1 (untargeted) or a class index "
                                       f"0–{self._n_classes - 1}, not {value}")
        return value

    @traitlets.validate("method")
    def _valid_method(self, proposal):
        if proposal["value"] not in methods():
            raise traitlets.TraitError(f"unknown attribution method {proposal['value']!r}; "
                                       "cw.methods() lists them")
        return proposal["value"]

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        if proposal["value"] and proposal["value"] not in self._layers:
            raise traitlets.TraitError(str(layer_not_found(proposal["value"], self._layers)))
        return proposal["value"]

    # ------------------------------------------------------------------ computing
    @traitlets.observe("epsilon", "attack", "steps", "target", "method")
    def _settings_changed(self, change):
        if self._ready:
            self._compute()

    @traitlets.observe("layer")
    def _layer_changed(self, change):
        # while an attack computes, it reads the layer when it ends (_show_channels checks)
        if self._ready and self.result is not None and not self.task.running:
            self._submit_channels()

    def _submit_channels(self):
        adv, layer = self.result, self.layer
        self.submit(lambda cancel: self._channels(adv, layer), self._show_channels,
                    background=self.background)

    def _compute(self):
        s = dict(epsilon=self.epsilon, kind=self.attack, steps=self.steps,
                 target=None if self.target == UNTARGETED else self.target, method=self.method)
        self.status.value = f"<i>{s['kind'].upper()} at ε = {s['epsilon'] * 255:g}/255…</i>"
        self.submit(lambda cancel: self._work(cancel, **s), self._show,
                    background=self.background)

    def _work(self, cancel, *, epsilon, kind, steps, target, method):
        model = self.model
        adv = attack(model, self.image, kind, epsilon=epsilon, steps=steps, target=target,
                     cancel=cancel, progress=False)
        clean = self._clean.get(method)
        if clean is None:
            clean = self._clean[method] = attribute(model, adv.clean, method, cancel=cancel,
                                                    progress=False)
        attacked = attribute(model, adv, method, cancel=cancel, progress=False)
        if self._clean_fixations is None:
            self._clean_fixations = fixations(model, adv.clean)
        moved = fixations(model, adv)
        drift = layer_drift(model, adv.clean, adv, self._layers)
        layer = self.layer or drift.most_moved()
        return {"adv": adv, "attr": (clean, attacked), "fix": (self._clean_fixations, moved),
                "drift": drift, "channels": self._channels(adv, layer, drift)}

    def _channels(self, adv, layer, drift=None):
        drift = drift or self.drift
        top = drift.top_channels(layer, CHANNELS_SHOWN)
        a = feature_maps(self.model, adv.clean, layer).maps[top]
        b = feature_maps(self.model, adv, layer).maps[top]
        return {"layer": layer, "top": top, "mosaic": draw.channel_pairs(a, b)}

    # ------------------------------------------------------------------ drawing
    def _show(self, out):
        adv = out["adv"]
        self.result, self.drift = adv, out["drift"]
        eps = adv.epsilon
        draw.update_picture(self._adversarial, adv.image,
                            f"adversarial ({adv.method.upper()}, ε = {eps * 255:g}/255)")
        draw.update_picture(self._perturbation, draw.amplified(adv.perturbation, eps),
                            f"perturbation ×{0.5 / eps:.0f} (grey = 0, ±ε = white / black)"
                            if eps > 0 else "perturbation (none)")
        verdict = "success" if adv.success else "no success"
        aim = "" if adv.target is None else f" → {self.model.label(adv.target)[:18]}"
        self._topk.set_text(f"clean\n{draw.topk_text(adv.before)}\n\nadversarial{aim}\n"
                            f"{draw.topk_text(adv.after)}\n\n{verdict}\n"
                            f"L∞ = {adv.linf * 255:.2f}/255\nL2 = {adv.l2:.3f}")
        for art, a, name in zip(self._attr, out["attr"], ("clean", "adversarial")):
            update_attribution(art, a.map, a.image, signed=a.signed, fine=a.fine,
                               title=f"{a.method}, {name}: {a.label[:20]}")
        for art, fx, name in zip(self._fix, out["fix"], ("clean", "adversarial")):
            update_fixations(art, fx.points, box=fx.box(), image=adv.image if name ==
                             "adversarial" else adv.original,
                             title=f"fixations, {name}: {fx.label[:18]}")
        self.status.value = (f"{adv.method.upper()}: {adv.before[0][1]!r} → "
                             f"{adv.after[0][1]!r} ({verdict}) in {adv.seconds:.1f} s")
        self._show_channels(out["channels"])

    def _show_channels(self, ch):
        layer = ch["layer"]
        if not self.layer:
            self._ready = False
            try:
                self.layer = layer
            finally:
                self._ready = True
        index = self._layers.index(layer)
        draw.update_drift(self._drift_art, self.drift.relative, index,
                          title=f"where the attack takes hold (chosen: {layer})")
        draw.update_channels(self._channel_art, ch["mosaic"],
                             title=f"{layer}: channels {', '.join(map(str, ch['top']))} "
                                   "(clean above, adversarial below)")
        self.canvas.draw_idle()
        if layer != self.layer:  # chosen while this was computing
            self._submit_channels()

    def _on_click(self, event):
        if event.inaxes is self.ax_drift and event.xdata is not None and self.drift is not None:
            i = min(len(self._layers) - 1, max(0, int(round(event.xdata))))
            self.layer = self._layers[i]


class PruningExplorer(WidgetBase):
    """Switch a layer's units off and see what the network loses.

    Left: for every criterion (weight L1, mean activation, random — and, with a
    ``dissection``, the chosen concept), how often the top-1 class of ``images`` is still the
    intact network's (solid) and how much that class's probability drops (dashed) as a
    growing fraction of the layer's units is off. Right: the chosen
    image's Grad-CAM and prediction, intact and with ``fraction`` of the units off by
    ``criterion``. With a dissection, a list of the layer's concepts (with their detector
    counts): click one to switch its detectors off first.

    State (traitlets): ``layer``, ``criterion``, ``fraction``, ``index`` (the image shown).
    ``curves`` holds the computed :class:`~cnnwidgets.engine.ablation.PruneCurve` per
    ``(layer, criterion)``. ``background=False`` computes in the calling thread.
    """

    layer = traitlets.Unicode()
    criterion = traitlets.Unicode("weight_l1")
    fraction = traitlets.Float(0.25)
    index = traitlets.Int(0)

    def __init__(self, model, images, dissection=None, *, layer: str | None = None,
                 layers=None, fractions=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
                 method: str = "grad_cam", background: bool = True):
        super().__init__()
        self._ready = False  # observers wait until the widget is built
        model = as_model(model, "PruningExplorer")
        self.model = model
        self.images = list(images)
        if not self.images:
            raise ValueError("PruningExplorer needs at least one image")
        self.dissection = dissection
        self.fractions = tuple(fractions)
        self.method = method
        self.background = background
        self.curves = {}
        self._intact = {}  # image index → (prediction, attribution) of the intact network
        if layers is None:
            maps = model.layers("maps")
            layers = ([n for n in dissection.layers if n in maps] if dissection is not None
                      else [n for n in maps if model.layer_info(n).conv] or maps)
        self._layers = list(layers)
        if not self._layers:
            raise ValueError("PruningExplorer: no layer to prune (pass layers=[...])")

        style = {"description_width": "initial"}
        self.layer_box = widgets.Dropdown(options=self._layers, description="layer",
                                          layout=widgets.Layout(width="330px"))
        self.criterion_box = widgets.Dropdown(options=list(CRITERIA), description="criterion",
                                              layout=widgets.Layout(width="300px"))
        self.fraction_slider = widgets.FloatSlider(0.25, min=0.0, max=1.0, step=0.05,
                                                   description="fraction off", style=style,
                                                   continuous_update=False)
        self.index_slider = widgets.IntSlider(0, 0, len(self.images) - 1, description="image",
                                              continuous_update=False)
        self.concept_list = widgets.Select(options=[], description="concepts", rows=6,
                                           layout=widgets.Layout(
                                               width="300px",
                                               display=None if dissection is not None else "none"))
        self.concept_list.observe(self.guarded(self._concept_clicked), "value")

        self.figure, self.canvas = make_figure(11.0, 3.9, dpi=72)
        self.ax_curves = self.figure.add_axes((0.06, 0.13, 0.36, 0.77))
        self._curve_art = draw.draw_prune_curves(self.ax_curves)
        blank = self._display(0)
        self._panels = [
            draw_attribution(self.figure.add_axes((0.46, 0.02, 0.26, 0.86)), blank[..., 0] * 0,
                             blank, title="intact"),
            draw_attribution(self.figure.add_axes((0.735, 0.02, 0.26, 0.86)),
                             blank[..., 0] * 0, blank, title="units off")]

        self.bind(self.layer_box, "layer")
        self.bind(self.criterion_box, "criterion")
        self.bind(self.fraction_slider, "fraction")
        self.bind(self.index_slider, "index")
        controls = widgets.HBox([
            widgets.VBox([widgets.HBox([self.layer_box, self.criterion_box]),
                          widgets.HBox([self.fraction_slider, self.index_slider])]),
            self.concept_list])
        self.children = [controls, self.errors, self.status, self.canvas.view]

        self._ready = False
        start = layer if layer is not None else self._layers[len(self._layers) // 2]
        self.layer = start
        self._ready = True
        self._compute(curves=True)

    def _display(self, i):
        return self.model.prepare(self.images[i])[1]

    # ------------------------------------------------------------------ validation
    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        if proposal["value"] not in self._layers:
            raise traitlets.TraitError(str(layer_not_found(proposal["value"], self._layers)))
        return proposal["value"]

    @traitlets.validate("criterion")
    def _valid_criterion(self, proposal):
        value = proposal["value"]
        if value not in CRITERIA and value not in self._concepts():
            raise traitlets.TraitError(
                f"unknown criterion {value!r}; use one of {', '.join(CRITERIA)}"
                + (" or a concept of the dissection" if self.dissection is not None else ""))
        return value

    @traitlets.validate("fraction")
    def _valid_fraction(self, proposal):
        value = float(proposal["value"])
        if not 0.0 <= value <= 1.0:
            raise traitlets.TraitError(f"fraction must be from 0 to 1, not {value}")
        return value

    @traitlets.validate("index")
    def _valid_index(self, proposal):
        value = int(proposal["value"])
        if not 0 <= value < len(self.images):
            raise traitlets.TraitError(f"index must be from 0 to {len(self.images) - 1}")
        return value

    def _concepts(self, layer=None) -> list:
        """The layer's detected concepts, most detectors first (none without a dissection)."""
        layer = layer or self.layer
        if self.dissection is None or layer not in self.dissection.layers:
            return []
        counts = {}
        for r in self.dissection.detectors(layer):
            counts[r.concept] = counts.get(r.concept, 0) + 1
        return sorted(counts, key=lambda c: (-counts[c], c))

    # ------------------------------------------------------------------ computing
    @traitlets.observe("layer")
    def _layer_changed(self, change):
        concepts = self._concepts()
        with self.quietly():
            self.criterion_box.options = list(CRITERIA) + concepts
            counts = {c: sum(r.concept == c for r in self.dissection.detectors(self.layer))
                      for c in concepts} if concepts else {}
            self.concept_list.options = [(f"{c} ({counts[c]})", c) for c in concepts]
            self.concept_list.value = None
        if self.criterion not in CRITERIA and self.criterion not in concepts:
            self.criterion = "weight_l1"
        self.resync("criterion")
        if self._ready:
            self._compute(curves=True)

    @traitlets.observe("criterion")
    def _criterion_changed(self, change):
        if self._ready:
            self._compute(curves=(self.layer, self.criterion) not in self.curves)

    @traitlets.observe("fraction", "index")
    def _view_changed(self, change):
        if self._ready:
            self._compute(curves=False)

    def _concept_clicked(self, change):
        if change["new"] and not self._showing:  # not when the list is being refilled
            self.criterion = change["new"]

    def _compute(self, curves: bool):
        layer, criterion, fraction, index = self.layer, self.criterion, self.fraction, self.index
        self.status.value = (f"<i>measuring {layer} …</i>" if curves
                             else f"<i>switching {fraction:.0%} of {layer} off…</i>")
        self.submit(lambda cancel: self._work(cancel, layer, criterion, fraction, index, curves),
                    self._show, background=self.background)

    def _work(self, cancel, layer, criterion, fraction, index, curves):
        names = list(CRITERIA) + ([criterion] if criterion not in CRITERIA else [])
        for name in names if curves else [criterion]:
            if (layer, name) not in self.curves:
                self.curves[(layer, name)] = prune_curve(
                    self.model, self.images, layer, name, self.fractions,
                    dissection=self.dissection, cancel=cancel, progress=False)
        curve = self.curves[(layer, criterion)]
        image = self.images[index]
        if index not in self._intact:
            self._intact[index] = (self.model.predict(image, k=3),
                                   attribute(self.model, image, self.method, cancel=cancel,
                                             progress=False))
        prediction, intact = self._intact[index]
        off = curve.off(fraction)
        with ablate(self.model, {layer: off}):
            after = self.model.predict(image, k=3)
            ablated = attribute(self.model, image, self.method, target=prediction[0][0],
                                cancel=cancel, progress=False)
        return {"layer": layer, "criterion": criterion, "fraction": fraction, "off": off,
                "intact": (prediction, intact), "ablated": (after, ablated)}

    # ------------------------------------------------------------------ drawing
    def _show(self, out):
        layer = out["layer"]
        shown = [(name, c.fractions, c.agreement, c.prob_drop)
                 for (lay, name), c in self.curves.items() if lay == layer]
        curve = self.curves[(layer, out["criterion"])]
        draw.update_prune_curves(self._curve_art, shown, out["fraction"], out["criterion"],
                                 title=f"{layer}: {curve.n_images} images, {curve.channels} units")
        for art, (pred, a), name in zip(self._panels, (out["intact"], out["ablated"]),
                                        ("intact", f"{len(out['off'])} units off")):
            update_attribution(art, a.map, a.image, signed=a.signed, fine=a.fine,
                               title=f"{name}: {pred[0][1][:22]} {pred[0][2]:.0%}")
        self.status.value = (f"{len(out['off'])} of {curve.channels} units of {layer} off by "
                             f"{curve.how} ({curve.n_images} images, {curve.seconds:.1f} s per "
                             "curve)")
        self.canvas.draw_idle()

