"""``cw.FeatureVisualizer`` and ``cw.InversionExplorer``: optimisation you watch as it runs.

Both drive an engine generator (``optimize`` / ``invert_steps``) in a background thread with a
stop event; every ``preview_every`` steps the image, the loss curve and the progress bar are
updated in place. ``run(wait=True)`` runs synchronously (scripts, tests, notebooks).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import ipywidgets as widgets
import traitlets

from ..engine.model import as_model
from ..engine.optvis import deconv, invert_steps, objectives, optimize
from ..render import optvis as R
from .base import WidgetBase, background_thread, make_figure


class _LiveRun:
    """Runs a step generator (in a thread or not), calling ``on_step`` every few steps.

    A preview happens every ``every`` steps, but never sooner than its own measured cost allows:
    after a preview that took ``t`` seconds the next waits ``t (1/PREVIEW_BUDGET − 1)``, so the
    previews take at most ``PREVIEW_BUDGET`` of the run's time (a slow figure render is
    previewed less often instead of slowing the optimisation down).
    """

    PREVIEW_BUDGET = 0.08

    def __init__(self, owner: WidgetBase):
        self.owner = owner
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.stop_event.set()
        if self.alive and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def start(self, make: Callable, on_step: Callable, on_end: Callable, every: int,
              wait: bool) -> None:
        self.stop()
        self.stop_event = threading.Event()
        stop_event = self.stop_event

        owner = self.owner
        # figures and widgets are only touched on the kernel's main thread (WidgetBase.on_main);
        # while a preview waits there, newer steps replace it instead of queueing up
        show = owner.latest_on_main(on_step)
        progress = owner.latest_on_main(lambda value: setattr(owner._progress, "value", value))

        def loop():
            gen = None
            last = shown = None
            gap = 0.0  # seconds to wait after a preview, so previews cost ≤ PREVIEW_BUDGET
            next_at = 0.0
            failure = None
            try:
                gen = make()
                for step in gen:
                    last = step
                    if stop_event.is_set():
                        break
                    now = time.perf_counter()
                    due = step.step % every == 0 and now >= next_at
                    if due or step.step == step.steps:
                        show(step)
                        shown = step
                        end = time.perf_counter()
                        gap = (end - now) * (1.0 / self.PREVIEW_BUDGET - 1.0)
                        next_at = end + gap
                    else:
                        progress(step.step)
                if last is not None and shown is not last:
                    show(last)  # stopped between previews: show where it got to
            except Exception as exc:  # noqa: BLE001 - shown in the widget
                failure = exc
            finally:
                if gen is not None:
                    gen.close()

                def finished(last=last, stopped=stop_event.is_set(), failure=failure):
                    if failure is not None:
                        owner.errors.show(failure)
                    else:
                        owner.errors.clear()
                    on_end(last, stopped)

                owner.on_main(finished)

        if wait:
            self.thread = None
            loop()
        else:
            self.thread = background_thread(self.owner, loop)
            self.owner._thread = self.thread  # so WidgetBase.wait() joins it


def _default_layer(model, fraction: float = 0.25) -> str:
    """A convolution a ``fraction`` of the way through the network, among the layers the
    layer menu lists (a 1×1 squeeze-excitation convolution or one run twice is not listed)."""
    listed = model.layers()
    known = set(listed)
    maps = [n for n in model.layers("conv") if n in known] or listed
    return maps[min(len(maps) - 1, int(len(maps) * fraction))]


def _listed(widget, name: str) -> str:
    """Add a valid layer the menu does not list (a C×1×1 output, say) to the menu."""
    if name not in widget._layers:
        widget._layers = [*widget._layers, name]
        if getattr(widget, "_w_layer", None) is not None:
            widget._w_layer.options = widget._layers
    return name


class _OptBase(WidgetBase):
    running = traitlets.Bool(False, read_only=True).tag(sync=False)
    steps = traitlets.Int(128)
    preview_every = traitlets.Int(4)

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model = as_model(model, type(self).__name__)
        self._runner = _LiveRun(self)
        self._progress = widgets.IntProgress(value=0, min=0, max=1, description="",
                                             layout=widgets.Layout(width="260px"))
        self._start = widgets.Button(description="Start", icon="play", button_style="success",
                                     layout=widgets.Layout(width="90px"))
        self._stop = widgets.Button(description="Stop", icon="stop", disabled=True,
                                    layout=widgets.Layout(width="90px"))
        self._start.on_click(self.guarded(lambda _: self.run(wait=False)))
        self._stop.on_click(self.guarded(lambda _: self.stop()))

    @traitlets.validate("steps")
    def _check_steps(self, proposal):
        if proposal["value"] < 1:
            raise traitlets.TraitError("steps must be at least 1")
        return proposal["value"]

    @traitlets.validate("preview_every")
    def _check_every(self, proposal):
        if proposal["value"] < 1:
            raise traitlets.TraitError("preview_every must be at least 1")
        return proposal["value"]

    def _set_running(self, flag: bool) -> None:
        self.set_trait("running", flag)
        self._start.disabled = flag
        self._stop.disabled = not flag

    def stop(self) -> None:
        """Stop the running optimisation (the image keeps its last state)."""
        self._runner.stop()

    def cancel_background(self) -> None:
        self._runner.stop_event.set()

    def _draw(self) -> None:
        if self.figure is not None:
            self.figure.canvas.draw_idle()

    def _freeze_layout(self) -> None:
        """Lay the figure out once and keep those positions: a constrained-layout pass on every
        live refresh would double the cost of each render."""
        fig = self.figure
        engine = fig.get_layout_engine() if fig is not None else None
        if engine is not None and engine.__class__.__name__ != "PlaceHolderLayoutEngine":
            engine.execute(fig)
            fig.set_layout_engine("none")


class FeatureVisualizer(_OptBase):
    """Activation maximisation running live: ``cw.FeatureVisualizer(model)``.

    Pick a layer and channel (mode ``"channel"`` / ``"neuron"``), a class (``"class"``) or the
    first ``grid`` channels of a layer at once (``"grid"``, one image per channel in one
    batch); choose the parameterisation and the objective weights; Start / Stop. The image and
    the loss curve refresh every ``preview_every`` steps. ``run(wait=True)`` runs synchronously;
    ``.result`` holds the last images (N×H×W×3) and ``.history`` the losses.
    """

    MODES = ("channel", "neuron", "class", "grid")

    layer = traitlets.Unicode()
    channel = traitlets.Int(0)
    mode = traitlets.Unicode("channel")
    target = traitlets.Unicode("")
    param = traitlets.Unicode("fft")
    decorrelate = traitlets.Bool(True)
    weight = traitlets.Float(1.0)
    diversity = traitlets.Float(0.0)
    batch = traitlets.Int(1)
    grid = traitlets.Int(8)
    size = traitlets.Int(128)
    seed = traitlets.Int(0)
    lr = traitlets.Float(0.05)

    def __init__(self, model, layer: str | None = None, channel: int = 0, *, steps: int = 128,
                 size: int = 128, preview_every: int = 4, **kwargs):
        super().__init__(model)
        model = self.model
        self._layers = model.layers()
        self.result = None
        self.history: list = []
        with self.hold_trait_notifications():
            self.layer = layer or _default_layer(model)
            self.channel = channel
            self.steps = steps
            self.size = size
            self.preview_every = preview_every
            self.target = model.labels[0] if model.labels else "0"
            for k, v in kwargs.items():
                setattr(self, k, v)
        self._build()

    # ------------------------------------------------------------------ validation
    @traitlets.validate("layer")
    def _check_layer(self, proposal):
        name = proposal["value"]
        info = self.model.check_layer(name)
        if len(info.shape) < 1:
            raise traitlets.TraitError(f"layer {name!r} has no channels")
        return _listed(self, name)

    @traitlets.validate("channel")
    def _check_channel(self, proposal):
        c = proposal["value"]
        n = self.model.layer_info(self.layer).shape[0] if self.layer else None
        if c < 0 or (n is not None and c >= n):
            raise traitlets.TraitError(f"channel {c} is out of range for {self.layer!r} (0–{n - 1})")
        return c

    @traitlets.validate("mode")
    def _check_mode(self, proposal):
        if proposal["value"] not in self.MODES:
            raise traitlets.TraitError(f"mode must be one of {', '.join(self.MODES)}")
        return proposal["value"]

    @traitlets.validate("param")
    def _check_param(self, proposal):
        if proposal["value"] not in ("fft", "pixel"):
            raise traitlets.TraitError("param must be 'fft' or 'pixel'")
        return proposal["value"]

    @traitlets.validate("target")
    def _check_target(self, proposal):
        value = proposal["value"]
        key = int(value) if value.strip().isdigit() else value
        self.model.target_index(key)  # raises a clear ValueError with suggestions
        return value

    @traitlets.validate("size", "grid", "batch")
    def _check_positive(self, proposal):
        if proposal["value"] < 1:
            raise traitlets.TraitError(f"{proposal['trait'].name} must be at least 1")
        return proposal["value"]

    # ------------------------------------------------------------------ objective
    def objective(self) -> tuple:
        """``(objective, batch)`` for the current settings."""
        if self.mode == "grid":
            n = min(self.grid, self.model.layer_info(self.layer).shape[0])
            obj = sum(objectives.channel(self.layer, i, batch=i) for i in range(n))
            batch = n
        else:
            if self.mode == "class":
                key = int(self.target) if self.target.strip().isdigit() else self.target
                obj = objectives.class_logit(key)
            elif self.mode == "neuron":
                obj = objectives.neuron(self.layer, self.channel)
            else:
                obj = objectives.channel(self.layer, self.channel)
            obj = self.weight * obj
            batch = self.batch
        if self.diversity and batch > 1:
            obj = obj + self.diversity * objectives.diversity(self.layer)
        return obj, batch

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        fig, canvas = make_figure(7.5, 3.6)
        gs = fig.add_gridspec(1, 2, width_ratios=[1.15, 1])
        self._ax_img = fig.add_subplot(gs[0])
        self._ax_loss = fig.add_subplot(gs[1])
        self.figure = fig
        self._img = R.draw_image(self._ax_img, [[[0.5, 0.5, 0.5]]], self._title())
        self._line = R.draw_loss(self._ax_loss, "loss (minimised)")

        d = {"description_width": "70px"}
        lay = widgets.Layout(width="290px")
        self._w_layer = widgets.Dropdown(options=self._layers, value=self.layer,
                                         description="layer", style=d, layout=lay)
        self._w_channel = widgets.BoundedIntText(value=self.channel, min=0,
                                                 max=self._n_channels() - 1,
                                                 description="channel", style=d, layout=lay)
        self._w_mode = widgets.ToggleButtons(options=self.MODES, value=self.mode,
                                             style={"button_width": "70px"})
        self._w_target = widgets.Combobox(value=self.target, options=self.model.labels,
                                          description="class", ensure_option=False, style=d,
                                          layout=lay)
        self._w_param = widgets.Dropdown(options=["fft", "pixel"], value=self.param,
                                         description="param", style=d, layout=lay)
        self._w_decor = widgets.Checkbox(value=self.decorrelate, description="decorrelate colour",
                                         indent=False)
        self._w_weight = widgets.FloatSlider(value=self.weight, min=0.0, max=2.0, step=0.1,
                                             description="weight", style=d, layout=lay)
        self._w_div = widgets.FloatSlider(value=self.diversity, min=0.0, max=5.0, step=0.1,
                                          description="diversity", style=d, layout=lay)
        self._w_batch = widgets.IntSlider(value=self.batch, min=1, max=8, description="batch",
                                          style=d, layout=lay)
        self._w_grid = widgets.IntSlider(value=self.grid, min=1, max=32, description="grid N",
                                         style=d, layout=lay)
        self._w_steps = widgets.IntSlider(value=self.steps, min=8, max=1024, step=8,
                                          description="steps", style=d, layout=lay)
        self._w_size = widgets.IntSlider(value=self.size, min=32, max=256, step=16,
                                         description="size", style=d, layout=lay)
        pairs = [(self._w_layer, "layer"), (self._w_channel, "channel"), (self._w_mode, "mode"),
                 (self._w_target, "target"), (self._w_param, "param"),
                 (self._w_decor, "decorrelate"), (self._w_weight, "weight"),
                 (self._w_div, "diversity"), (self._w_batch, "batch"), (self._w_grid, "grid"),
                 (self._w_steps, "steps"), (self._w_size, "size")]
        for control, name in pairs:
            control.observe(self.guarded(lambda ch, name=name: setattr(self, name, ch["new"])),
                            "value")
        self._pairs = pairs
        self.observe(self._sync_controls, [n for _, n in pairs])
        self.observe(self._retitle, ["layer", "channel", "mode", "target"])
        self._progress.max = self.steps

        controls = widgets.VBox([
            self._w_mode, self._w_layer, self._w_channel, self._w_target, self._w_param,
            self._w_decor, self._w_weight, self._w_div, self._w_batch, self._w_grid,
            self._w_steps, self._w_size,
            widgets.HBox([self._start, self._stop]), self._progress,
        ])
        self.children = [widgets.HBox([controls, canvas]), self.status, self.errors]

    def _n_channels(self) -> int:
        return int(self.model.layer_info(self.layer).shape[0])

    def _sync_controls(self, change) -> None:
        for control, name in self._pairs:
            if name == change["name"] and control.value != change["new"]:
                control.value = change["new"]
        if change["name"] == "layer":
            self._w_channel.max = self._n_channels() - 1
            if self.channel >= self._n_channels():
                self.channel = 0

    def _title(self) -> str:
        if self.mode == "class":
            return f"class {self.target!r}"
        if self.mode == "grid":
            return f"{self.layer}: channels 0–{min(self.grid, self._n_channels()) - 1}"
        return f"{self.layer}:{self.channel}" + (" (centre neuron)" if self.mode == "neuron" else "")

    def _retitle(self, change=None) -> None:
        self._ax_img.set_title(self._title(), fontsize=9)
        self._draw()

    # ------------------------------------------------------------------ running
    def run(self, wait: bool = True) -> None:
        """Start the optimisation with the current settings (blocking when ``wait``)."""
        obj, batch = self.objective()
        steps, every = self.steps, self.preview_every
        self._progress.max = steps
        self._progress.value = 0
        self.history = []
        self._set_running(True)
        self._freeze_layout()
        self.status.value = f"optimising {obj.name} …"

        def make():
            return optimize(self.model, obj, steps=steps, param=self.param, size=self.size,
                            batch=batch, lr=self.lr, seed=self.seed,
                            decorrelate=self.decorrelate)

        self._runner.start(make, self._on_step, self._on_end, every, wait)

    def _on_step(self, step) -> None:
        images = step.images()
        self.result = images
        self.history = list(step.history)
        R.update_image(self._img, R.mosaic(images) if len(images) > 1 else images[0])
        R.update_loss(self._line, step.history, step.steps)
        self._progress.value = step.step
        self._draw()

    def _on_end(self, last, stopped: bool) -> None:
        self._set_running(False)
        if last is not None:
            word = "stopped" if stopped else "done"
            self.status.value = (f"{word} at step {last.step}/{last.steps}, "
                                 f"loss {last.loss:.4g}")


class InversionExplorer(_OptBase):
    """Network inversion forming live, with the DeconvNet projection beside it:
    ``cw.InversionExplorer(model, image)``.

    Pick a layer: the DeconvNet projection of its strongest activation (or of ``channel``)
    appears at once, the original is marked with the top-k positions and the projection's box;
    Start runs the Mahendran & Vedaldi inversion, refreshing every ``preview_every`` steps.
    """

    layer = traitlets.Unicode()
    channel = traitlets.Int(-1)  # −1: the channel with the strongest activation
    top_k = traitlets.Int(5)
    seed = traitlets.Int(0)

    def __init__(self, model, image, layer: str | None = None, *, steps: int = 200,
                 preview_every: int = 5, channel: int = -1):
        super().__init__(model)
        model = self.model
        self.image = image
        self._display = model.prepare(image)[1]
        self._layers = model.layers()
        self.projection = None
        self.result = None
        self.history: list = []
        with self.hold_trait_notifications():
            self.layer = layer or _default_layer(model, 0.2)
            self.steps = steps
            self.preview_every = preview_every
            self.channel = channel
        self._build()
        self._update_deconv()

    @traitlets.validate("layer")
    def _check_layer(self, proposal):
        info = self.model.check_layer(proposal["value"])
        if len(info.shape) != 3:
            raise traitlets.TraitError(f"layer {proposal['value']!r} does not output a feature map")
        return _listed(self, proposal["value"])

    @traitlets.validate("channel")
    def _check_channel(self, proposal):
        c = proposal["value"]
        n = self.model.layer_info(self.layer).shape[0] if self.layer else None
        if c < -1 or (n is not None and c >= n):
            raise traitlets.TraitError(f"channel {c} is out of range for {self.layer!r} "
                                       f"(0–{n - 1}, or −1 for the strongest)")
        return c

    def _build(self) -> None:
        fig, canvas = make_figure(10.0, 3.2, dpi=85)
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
        self.figure = fig
        self._ax = axes
        R.draw_image(axes[0], self._display, "input")
        self._marks = R.draw_positions(axes[0])
        self._box = R.draw_box(axes[0])
        grey = self._display * 0 + 0.5
        self._inv = R.draw_image(axes[1], grey, "inversion")
        self._dec = R.draw_image(axes[2], grey, "DeconvNet projection")
        self._line = R.draw_loss(axes[3], "inversion loss")

        d = {"description_width": "60px"}
        self._w_layer = widgets.Dropdown(options=self._layers, value=self.layer,
                                         description="layer", style=d,
                                         layout=widgets.Layout(width="330px"))
        self._w_channel = widgets.BoundedIntText(value=self.channel, min=-1,
                                                 max=self.model.layer_info(self.layer).shape[0] - 1,
                                                 description="channel", style=d,
                                                 layout=widgets.Layout(width="160px"))
        self._w_steps = widgets.IntSlider(value=self.steps, min=10, max=1000, step=10,
                                          description="steps", style=d)
        self._w_layer.observe(self.guarded(lambda ch: setattr(self, "layer", ch["new"])), "value")
        self._w_channel.observe(self.guarded(lambda ch: setattr(self, "channel", ch["new"])),
                                "value")
        self._w_steps.observe(self.guarded(lambda ch: setattr(self, "steps", ch["new"])), "value")
        self.observe(self.guarded(self._on_layer), ["layer", "channel", "top_k"])
        self.observe(lambda ch: setattr(self._w_steps, "value", ch["new"]), "steps")
        self._progress.max = self.steps
        self.children = [
            widgets.HBox([self._w_layer, self._w_channel, self._w_steps]),
            widgets.HBox([self._start, self._stop, self._progress]),
            canvas, self.status, self.errors,
        ]

    def _on_layer(self, change) -> None:
        if change["name"] == "layer":
            self._w_layer.value = self.layer
            self._w_channel.max = self.model.layer_info(self.layer).shape[0] - 1
            if self.channel >= self.model.layer_info(self.layer).shape[0]:
                self.channel = -1
        if change["name"] == "channel":
            self._w_channel.value = self.channel
        was_running = self.running
        if change["name"] == "layer":
            self.stop()
            R.update_image(self._inv, self._display * 0 + 0.5, "inversion")
            R.update_loss(self._line, [])
            self._progress.value = 0
        self._update_deconv()
        if was_running and change["name"] == "layer":
            self.run(wait=False)

    def _update_deconv(self) -> None:
        ch = None if self.channel < 0 else self.channel
        proj = deconv(self.model, self.image, self.layer, channel=ch, top_k=self.top_k)
        self.projection = proj
        pos = proj.input_positions
        R.update_image(self._dec, proj, f"DeconvNet {self.layer}:{proj.channel} (zoomed)")
        R.zoom_to(self._ax[2], proj.box, proj.shape)
        R.update_positions(self._marks, pos[:, 0], pos[:, 1])
        R.update_box(self._box, proj.box)
        self._draw()

    def run(self, wait: bool = True) -> None:
        """Run the inversion of the current layer (blocking when ``wait``)."""
        layer, steps, every = self.layer, self.steps, self.preview_every
        self._progress.max = steps
        self._progress.value = 0
        self.history = []
        self._set_running(True)
        self._freeze_layout()
        self.status.value = f"inverting {layer} …"

        def make():
            return invert_steps(self.model, self.image, layer, steps=steps, seed=self.seed)

        self._runner.start(make, self._on_step, self._on_end, every, wait)

    def _on_step(self, step) -> None:
        img = step.image()
        self.result = img
        self.history = list(step.history)
        R.update_image(self._inv, img, f"inversion of {self.layer}")
        R.update_loss(self._line, step.history, step.steps)
        self._progress.value = step.step
        self._draw()

    def _on_end(self, last, stopped: bool) -> None:
        self._set_running(False)
        if last is not None:
            word = "stopped" if stopped else "done"
            self.status.value = f"{word} at step {last.step}/{last.steps}, loss {last.loss:.4g}"
