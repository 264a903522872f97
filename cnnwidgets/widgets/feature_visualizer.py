"""``cw.FeatureVisualizer``: activation maximisation you watch as it runs."""
from __future__ import annotations

import ipywidgets as widgets
import traitlets

from ..engine.optvis import objectives, optimize
from ..render import optvis as R
from .base import make_figure
from .live import LiveOptimisation, at_least_one, default_layer


def _target_key(target: str):
    """A class given in the class box: its index when it is a number, else its label."""
    return int(target) if target.strip().isdigit() else target


class FeatureVisualizer(LiveOptimisation):
    """Activation maximisation running live: ``cw.FeatureVisualizer(model)``.

    Pick a layer and channel (mode ``"channel"`` / ``"neuron"``), a class (``"class"``) or the
    first ``grid`` channels of a layer at once (``"grid"``, one image per channel in one
    batch); choose the parameterisation and the objective weights; Start / Stop. The image and
    the loss curve refresh every ``preview_every`` steps. ``run(wait=True)`` runs synchronously;
    ``.result`` holds the last images (N×H×W×3) and ``.history`` the losses.
    """

    MODES = ("channel", "neuron", "class", "grid")

    channel = traitlets.Int(0)
    mode = traitlets.Enum(MODES, default_value="channel")
    target = traitlets.Unicode("")
    param = traitlets.Enum(("fft", "pixel"), default_value="fft")
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
        with self.hold_trait_notifications():
            self.layer = layer or default_layer(model)
            self.channel = channel
            self.steps = steps
            self.size = size
            self.preview_every = preview_every
            self.target = model.labels[0] if model.labels else "0"
            for k, v in kwargs.items():
                setattr(self, k, v)
        self._build()

    # ------------------------------------------------------------------ validation
    _positive_sizes = traitlets.validate("size", "grid", "batch")(at_least_one)

    @traitlets.validate("layer")
    def _check_layer(self, proposal):
        name = proposal["value"]
        if len(self.model.check_layer(name).shape) < 1:
            raise traitlets.TraitError(f"layer {name!r} has no channels")
        return name

    @traitlets.validate("channel")
    def _check_channel(self, proposal):
        c = proposal["value"]
        n = self.model.layer_info(self.layer).shape[0] if self.layer else None
        if c < 0 or (n is not None and c >= n):
            raise traitlets.TraitError(f"channel {c} is out of range for {self.layer!r} (0–{n - 1})")
        return c

    @traitlets.validate("target")
    def _check_target(self, proposal):
        self.model.target_index(_target_key(proposal["value"]))  # a clear error, suggestions
        return proposal["value"]

    # ------------------------------------------------------------------ objective
    def objective(self) -> tuple:
        """``(objective, batch)`` for the current settings."""
        if self.mode == "grid":
            n = min(self.grid, self._n_channels())
            obj = sum(objectives.channel(self.layer, i, batch=i) for i in range(n))
            batch = n
        else:
            if self.mode == "class":
                obj = objectives.class_logit(_target_key(self.target))
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
        self._w_layer = widgets.Dropdown(options=self._layers, description="layer", style=d,
                                         layout=lay)
        self._w_channel = widgets.BoundedIntText(min=0, max=self._n_channels() - 1,
                                                 description="channel", style=d, layout=lay)
        self._w_mode = widgets.ToggleButtons(options=self.MODES, style={"button_width": "70px"})
        # sent on Enter, not per key: a half-typed label would be refused at every keystroke
        self._w_target = widgets.Combobox(options=self.model.labels, description="class",
                                          ensure_option=False, continuous_update=False,
                                          style=d, layout=lay)
        self._w_param = widgets.Dropdown(options=["fft", "pixel"], description="param", style=d,
                                         layout=lay)
        self._w_decor = widgets.Checkbox(description="decorrelate colour", indent=False)
        self._w_weight = widgets.FloatSlider(min=0.0, max=2.0, step=0.1, description="weight",
                                             style=d, layout=lay)
        self._w_div = widgets.FloatSlider(min=0.0, max=5.0, step=0.1, description="diversity",
                                          style=d, layout=lay)
        self._w_batch = widgets.IntSlider(min=1, max=8, description="batch", style=d, layout=lay)
        self._w_grid = widgets.IntSlider(min=1, max=32, description="grid N", style=d, layout=lay)
        self._w_steps = widgets.IntSlider(min=8, max=1024, step=8, description="steps", style=d,
                                          layout=lay)
        self._w_size = widgets.IntSlider(min=32, max=256, step=16, description="size", style=d,
                                         layout=lay)
        self.bind(self._w_layer, "layer", to_control=self._menu_layer)
        for control, name in [(self._w_channel, "channel"), (self._w_mode, "mode"),
                              (self._w_target, "target"), (self._w_param, "param"),
                              (self._w_decor, "decorrelate"), (self._w_weight, "weight"),
                              (self._w_div, "diversity"), (self._w_batch, "batch"),
                              (self._w_grid, "grid"), (self._w_steps, "steps"),
                              (self._w_size, "size")]:
            self.bind(control, name)
        self.observe(lambda change: self._fit_channel(reset=0), "layer")
        self.observe(self._retitle, ["layer", "channel", "mode", "target"])
        self._progress.max = self.steps

        controls = widgets.VBox([
            self._w_mode, self._w_layer, self._w_channel, self._w_target, self._w_param,
            self._w_decor, self._w_weight, self._w_div, self._w_batch, self._w_grid,
            self._w_steps, self._w_size,
            widgets.HBox([self._start, self._stop]), self._progress,
        ])
        self.children = [widgets.HBox([controls, canvas.view]), self.status, self.errors]

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
    def _optimisation(self):
        obj, batch = self.objective()
        settings = dict(steps=self.steps, param=self.param, size=self.size, batch=batch,
                        lr=self.lr, seed=self.seed, decorrelate=self.decorrelate)
        return (lambda: optimize(self.model, obj, **settings)), f"optimising {obj.name} …"

    def _show_step(self, step) -> None:
        images = step.images()
        self.result = images
        R.update_image(self._img, R.mosaic(images) if len(images) > 1 else images[0])
