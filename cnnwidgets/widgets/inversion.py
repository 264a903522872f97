"""``cw.InversionExplorer``: network inversion forming live, beside the DeconvNet projection."""
from __future__ import annotations

import ipywidgets as widgets
import traitlets

from ..engine.optvis import deconv, invert_steps
from ..render import optvis as R
from .base import make_figure
from .live import LiveOptimisation, default_layer


class InversionExplorer(LiveOptimisation):
    """Network inversion forming live, with the DeconvNet projection beside it:
    ``cw.InversionExplorer(model, image)``.

    Pick a layer: the DeconvNet projection of its strongest activation (or of ``channel``)
    appears at once, the original is marked with the top-k positions and the projection's box;
    Start runs the Mahendran & Vedaldi inversion, refreshing every ``preview_every`` steps.
    """

    channel = traitlets.Int(-1)  # −1: the channel with the strongest activation
    top_k = traitlets.Int(5)
    seed = traitlets.Int(0)

    def __init__(self, model, image, layer: str | None = None, *, steps: int = 200,
                 preview_every: int = 5, channel: int = -1):
        super().__init__(model)
        model = self.model
        self.image = image
        self._display = model.prepare(image)[1]
        self.projection = None
        with self.hold_trait_notifications():
            self.layer = layer or default_layer(model, 0.2)
            self.steps = steps
            self.preview_every = preview_every
            self.channel = channel
        self._build()
        self._update_deconv()

    @traitlets.validate("layer")
    def _check_layer(self, proposal):
        if len(self.model.check_layer(proposal["value"]).shape) != 3:
            raise traitlets.TraitError(f"layer {proposal['value']!r} does not output a feature map")
        return proposal["value"]

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
        self._w_layer = widgets.Dropdown(options=self._layers, description="layer", style=d,
                                         layout=widgets.Layout(width="330px"))
        self._w_channel = widgets.BoundedIntText(min=-1, max=self._n_channels() - 1,
                                                 description="channel", style=d,
                                                 layout=widgets.Layout(width="160px"))
        self._w_steps = widgets.IntSlider(min=10, max=1000, step=10, description="steps",
                                          style=d)
        self.bind(self._w_layer, "layer", to_control=self._menu_layer)
        self.bind(self._w_channel, "channel")
        self.bind(self._w_steps, "steps")
        self.observe(self.guarded(self._on_layer), "layer")
        self.observe(self.guarded(lambda change: self._update_deconv()), ["channel", "top_k"])
        self._progress.max = self.steps
        self.children = [
            widgets.HBox([self._w_layer, self._w_channel, self._w_steps]),
            widgets.HBox([self._start, self._stop, self._progress]),
            canvas.view, self.status, self.errors,
        ]

    def _on_layer(self, change) -> None:
        """A new layer: a new projection, and the inversion starts over (running again if it
        was running)."""
        was_running = self.running
        self.stop()
        self._fit_channel(reset=-1)
        R.update_image(self._inv, self._display * 0 + 0.5, "inversion")
        R.update_loss(self._line, [])
        self._progress.value = 0
        self._update_deconv()
        if was_running:
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

    # ------------------------------------------------------------------ running
    def _optimisation(self):
        layer, steps, seed = self.layer, self.steps, self.seed
        return (lambda: invert_steps(self.model, self.image, layer, steps=steps, seed=seed),
                f"inverting {layer} …")

    def _show_step(self, step) -> None:
        img = step.image()
        self.result = img
        R.update_image(self._inv, img, f"inversion of {self.layer}")
