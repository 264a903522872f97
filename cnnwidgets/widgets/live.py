"""What the widgets that run an optimisation live share (``cw.FeatureVisualizer``,
``cw.InversionExplorer``): Start / Stop, a progress bar, a loss curve, and previews paced so
that drawing never slows the optimisation down.

A run drives an engine step generator as the widget's background task (:mod:`.tasks`): Stop
sets its cancel event, and a new start stops the old run first. ``run(wait=True)`` runs in the
calling thread (scripts, tests, notebooks).
"""
from __future__ import annotations

import time
from typing import Callable

import ipywidgets as widgets
import traitlets

from ..engine.model import as_model
from ..render import optvis as R
from .base import WidgetBase

#: the largest share of a run's time its previews may take
PREVIEW_BUDGET = 0.08


def default_layer(model, fraction: float = 0.25) -> str:
    """A convolution a ``fraction`` of the way through the network, among the layers the
    layer menu lists (a 1×1 squeeze-excitation convolution or one run twice is not listed)."""
    listed = model.layers()
    known = set(listed)
    maps = [n for n in model.layers("conv") if n in known] or listed
    return maps[min(len(maps) - 1, int(len(maps) * fraction))]


def live_steps(steps, cancel, show: Callable, progress: Callable, every: int):
    """Run the step generator ``steps`` until it ends or ``cancel`` is set; returns
    ``(last step, stopped)``.

    ``show(step)`` previews every ``every`` steps, but never sooner than its own measured cost
    allows: after a preview that took ``t`` seconds the next waits ``t (1/PREVIEW_BUDGET − 1)``,
    so previews take at most :data:`PREVIEW_BUDGET` of the run (a slow figure is previewed less
    often instead of slowing the optimisation). Between previews ``progress(step number)``.
    The last step reached is always shown.
    """
    last = shown = None
    next_at = 0.0
    try:
        for step in steps:
            last = step
            if cancel.is_set():
                break
            now = time.perf_counter()
            if (step.step % every == 0 and now >= next_at) or step.step == step.steps:
                show(step)
                shown = step
                end = time.perf_counter()
                next_at = end + (end - now) * (1.0 / PREVIEW_BUDGET - 1.0)
            else:
                progress(step.step)
        if last is not None and shown is not last:
            show(last)  # stopped between previews: show where it got to
    finally:
        steps.close()
    return last, cancel.is_set()


def at_least_one(self, proposal):
    """A traitlets validator (``traitlets.validate(*names)(at_least_one)``): a count ≥ 1."""
    if proposal["value"] < 1:
        raise traitlets.TraitError(f"{proposal['trait'].name} must be at least 1")
    return proposal["value"]


class StartStop(WidgetBase):
    """A widget whose work runs until it ends or is stopped: the Start / Stop buttons (built
    by :meth:`_start_stop`), the read-only ``running`` traitlet, :meth:`stop`. A subclass says
    what to run in ``run(wait)``, calling ``_set_running`` as the work starts and ends."""

    running = traitlets.Bool(False, read_only=True).tag(sync=False)

    def _start_stop(self, *, clear: bool = True) -> None:
        """Make ``self._start`` and ``self._stop``; ``clear``: whether a Start that goes
        through clears the error box (see :meth:`WidgetBase.guarded`)."""
        self._start = widgets.Button(description="Start", icon="play", button_style="success",
                                     layout=widgets.Layout(width="90px"))
        self._stop = widgets.Button(description="Stop", icon="stop", disabled=True,
                                    layout=widgets.Layout(width="90px"))
        self._start.on_click(self.guarded(lambda _: self.run(wait=False), clear=clear))
        self._stop.on_click(self.guarded(lambda _: self.stop()))

    def run(self, wait: bool = True) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the running work at its next check (what it reached so far is kept)."""
        self.task.stop()

    def _set_running(self, flag: bool) -> None:
        self.set_trait("running", flag)
        self._start.disabled = flag
        self._stop.disabled = not flag


class LiveOptimisation(StartStop):
    """Start / Stop, progress and the live loss curve of an optimisation widget.

    A subclass adds its ``channel`` traitlet, builds its figure (an image artist it updates in
    :meth:`_show_step`, the loss line ``self._line``) and its controls (a layer menu
    ``self._w_layer`` bound through :meth:`_menu_layer`, a channel control
    ``self._w_channel``), and says what to run in :meth:`_optimisation`. ``result`` and
    ``history`` hold the last images and losses.
    """

    layer = traitlets.Unicode()
    steps = traitlets.Int(128)
    preview_every = traitlets.Int(4)

    _positive = traitlets.validate("steps", "preview_every")(at_least_one)

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model = as_model(model, type(self).__name__)
        self._layers = model.layers()
        self.result = None
        self.history: list = []
        self._progress = widgets.IntProgress(value=0, min=0, max=1, description="",
                                             layout=widgets.Layout(width="260px"))
        self._start_stop()

    # ------------------------------------------------------------------ for subclasses
    def _optimisation(self) -> tuple[Callable, str]:
        """``(make, what)``: a function that returns the engine's step generator for the
        current settings, and the status line while it runs."""
        raise NotImplementedError

    def _show_step(self, step) -> None:
        """Show a step's image(s) and keep them in ``result``."""
        raise NotImplementedError

    def _n_channels(self) -> int:
        return int(self.model.layer_info(self.layer).shape[0])

    def _menu_layer(self, name: str) -> str:
        """The layer menu's value for ``name``: a valid layer the menu does not list (a C×1×1
        output, say) is added to it."""
        if name not in self._layers:
            self._layers = [*self._layers, name]
            with self.quietly():
                self._w_layer.options = self._layers
        return name

    def _fit_channel(self, reset: int) -> None:
        """After a layer change: the channel control's range follows the layer's channels, and
        a channel the layer lacks becomes ``reset``."""
        n = self._n_channels()
        with self.quietly():
            self._w_channel.max = n - 1
        if self.channel >= n:
            self.channel = reset

    # ------------------------------------------------------------------ running
    def run(self, wait: bool = True) -> None:
        """Start the optimisation with the current settings (blocking when ``wait``); a run
        still going is stopped first."""
        self.stop()
        make, what = self._optimisation()
        every = self.preview_every
        self._progress.max = self.steps
        self._progress.value = 0
        self.history = []
        self._set_running(True)
        self._freeze_layout()
        self.status.value = what

        def work(cancel):
            def latest(fn):  # on the main thread, newest value only, while this run is current
                return self.latest_on_main(
                    lambda value: None if self.task.superseded(cancel) else fn(value))

            return live_steps(make(), cancel, latest(self._on_step), latest(self._show_progress),
                              every)

        self.submit(work, self._finished, background=not wait,
                    failed=lambda exc: self._set_running(False))

    def _show_progress(self, step_number: int) -> None:
        self._progress.value = step_number

    def _on_step(self, step) -> None:
        self._show_step(step)
        self.history = list(step.history)
        R.update_loss(self._line, step.history, step.steps)
        self._progress.value = step.step
        self._draw()

    def _finished(self, outcome) -> None:
        last, stopped = outcome
        self._set_running(False)
        if last is not None:
            word = "stopped" if stopped else "done"
            self.status.value = f"{word} at step {last.step}/{last.steps}, loss {last.loss:.4g}"

    # ------------------------------------------------------------------ drawing
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
