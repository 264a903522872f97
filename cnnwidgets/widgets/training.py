"""``cw.TrainingMonitor``: watch a network learn, live, and drag back in time over snapshots."""
from __future__ import annotations

import html

import ipywidgets as widgets
import traitlets

from ..engine.training import Monitor, train
from ..render import training as R
from .base import make_figure
from .live import StartStop

class TrainingMonitor(StartStop):
    """Loss and accuracy curves growing live, a slider over the snapshots (drag back in time
    while training goes on), and for the chosen snapshot: the first layer's filters, the dead
    units per layer, a Grad-CAM and the feature maps of each fixed image. Start / Stop run
    ``cw.train`` on ``data`` in the background; a second Start continues from where it stopped.

    ``cw.TrainingMonitor(model, data, images=None, every=10, ...)``: the arguments of
    :class:`cw.Monitor <cnnwidgets.engine.training.Monitor>` (``monitor``: the engine object,
    for scripts), plus the training settings (traitlets ``epochs``, ``lr``, ``optimizer``,
    ``batch_size``). In a loop of your own call ``w.step(loss, accuracy)`` after each step
    (live in the notebook when the loop runs in a thread; drawn when the cell ends otherwise).

    State (traitlets): ``snapshot`` (the index of the snapshot shown), ``follow`` (show each
    new snapshot as it comes), ``running`` (read-only).
    """

    epochs = traitlets.Float(3.0)
    lr = traitlets.Float(0.01)
    optimizer = traitlets.Enum(("sgd", "adam"), default_value="adam")
    batch_size = traitlets.Int(32)
    snapshot = traitlets.Int(0)
    follow = traitlets.Bool(True)

    def __init__(self, model, data=None, *, images=None, every: int = 10, epochs: float = 3.0,
                 lr: float = 0.01, optimizer: str = "adam", batch_size: int = 32,
                 shown: int = 4, **monitor_kwargs):
        super().__init__()
        self.monitor = monitor_kwargs.pop("monitor", None) or Monitor(
            model, data, images=images, every=every, **monitor_kwargs)
        self.model = self.monitor.model
        self.data = data
        self.result = None
        self._shown = max(1, min(int(shown), len(self.monitor.images)))
        with self.hold_trait_notifications():
            self.epochs, self.lr, self.optimizer, self.batch_size = epochs, lr, optimizer, batch_size
        self._build()
        self.monitor.listeners.append(self._listener())
        self._show_snapshot(len(self.monitor.snapshots) - 1)

    # ------------------------------------------------------------------ validation
    @traitlets.validate("epochs", "lr")
    def _positive(self, proposal):
        if not proposal["value"] > 0:
            raise traitlets.TraitError(f"{proposal['trait'].name} must be greater than 0")
        return proposal["value"]

    @traitlets.validate("batch_size")
    def _batch(self, proposal):
        if proposal["value"] < 1:
            raise traitlets.TraitError("batch_size must be at least 1")
        return proposal["value"]

    @traitlets.validate("snapshot")
    def _valid_snapshot(self, proposal):
        n = len(self.monitor.snapshots)
        if not 0 <= proposal["value"] < n:
            raise traitlets.TraitError(f"snapshot must be between 0 and {n - 1}")
        return proposal["value"]

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        m = self.monitor
        k = self._shown
        self.curves, curves_canvas = make_figure(8.0, 2.1, dpi=85)
        ax_loss, ax_acc = self.curves.subplots(1, 2)
        self._curves = R.draw_curves(ax_loss, ax_acc)
        self.curves.subplots_adjust(left=0.07, right=0.98, bottom=0.22, top=0.86, wspace=0.2)

        cols = max(k, 2)
        self.figure, canvas = make_figure(1.9 * cols + 0.6, 6.4, dpi=85)
        grid = self.figure.add_gridspec(3, cols, height_ratios=[1.0, 1.0, 1.0], hspace=0.35,
                                        left=0.05, right=0.97, top=0.93, bottom=0.03)
        half = max(1, cols // 2)
        first = m.snapshots[0]
        self._filters = R.draw_filters(self.figure.add_subplot(grid[0, :half]), first.filters,
                                       f"filters of {m.first_conv}")
        self._dead = R.draw_dead(self.figure.add_subplot(grid[0, half:]), m.dead_layers)
        self._cams = [R.draw_cam(self.figure.add_subplot(grid[1, i]), m.display[i],
                                 first.cams[i]) for i in range(k)]
        self._maps = [R.draw_maps(self.figure.add_subplot(grid[2, i]), first.maps[i])
                      for i in range(k)]
        self._title = self.figure.suptitle("", fontsize=10)

        lay = widgets.Layout(width="170px")
        d = {"description_width": "60px"}
        self._start_stop(clear=False)
        self._w_epochs = widgets.BoundedFloatText(min=0.1, max=1000, step=1, description="epochs",
                                                  style=d, layout=lay)
        self._w_lr = widgets.BoundedFloatText(min=1e-6, max=10, step=0.001, description="lr",
                                              style=d, layout=lay)
        self._w_opt = widgets.Dropdown(options=["sgd", "adam"], description="optimiser", style=d,
                                       layout=lay)
        self._w_snapshot = widgets.IntSlider(min=0, max=0, description="snapshot",
                                             continuous_update=True, style=d,
                                             layout=widgets.Layout(width="420px"))
        self._w_follow = widgets.Checkbox(description="follow the newest", indent=False,
                                          layout=widgets.Layout(width="160px"))
        self._step_label = widgets.HTML()
        self.bind(self._w_epochs, "epochs")
        self.bind(self._w_lr, "lr")
        self.bind(self._w_opt, "optimizer")
        self.bind(self._w_follow, "follow")
        self.bind(self._w_snapshot, "snapshot")
        self.observe(lambda change: self._show_snapshot(change["new"]), "snapshot")
        # dragging the slider back stops following; dragging it to the end follows again
        self._w_snapshot.observe(self.guarded(self._slider_moved), "value")
        controls = widgets.HBox([self._start, self._stop, self._w_epochs, self._w_lr,
                                 self._w_opt])
        scrub = widgets.HBox([self._w_snapshot, self._step_label, self._w_follow])
        self.children = [controls, self.errors, curves_canvas.view, scrub, canvas.view, self.status]

    # ------------------------------------------------------------------ live updates
    def _listener(self):
        """The monitor's listener: called in the training thread after each step."""
        push = self.latest_on_main(lambda _: self._refresh())
        # on the kernel's main thread, newest only: steps that come while a redraw waits are
        # shown by that redraw (it reads the monitor's whole history)
        return lambda monitor, snap: push(snap)

    def _refresh(self) -> None:
        """Curves to the latest step; the slider to the latest snapshot (shown when following)."""
        steps, losses, accs = self.monitor.curves()
        R.update_curves(self._curves, steps, losses, accs, self._planned_steps())
        n = len(self.monitor.snapshots)
        with self.quietly():
            self._w_snapshot.max = n - 1
        if self.follow and self.snapshot != n - 1:
            self.snapshot = n - 1  # observed: draws the panels
        self.curves.canvas.draw_idle()

    def _planned_steps(self) -> int | None:
        try:
            per_epoch = -(-len(self.data) // self.batch_size)
        except TypeError:
            return None
        return int(self._start_step + self.epochs * per_epoch) if self.running else None

    def _slider_moved(self, change) -> None:
        self.follow = change["new"] == self._w_snapshot.max

    def _show_snapshot(self, index: int) -> None:
        snap = self.monitor.snapshots[index]
        labels = self.model.labels
        R.update_filters(self._filters, snap.filters)
        R.update_dead(self._dead, [snap.dead.get(n, 0.0) for n in self.monitor.dead_layers])
        for i in range(self._shown):
            t, p = int(snap.targets[i]), int(snap.predictions[i])
            mark = "✓" if t == p else "✗"
            R.update_cam(self._cams[i], snap.cams[i],
                         f"{mark} {labels[p]}" + ("" if t == p else f" (is {labels[t]})"))
            R.update_maps(self._maps[i], snap.maps[i],
                          title=f"{self.monitor.layer}" if i == 0 else "")
        loss = "" if snap.loss != snap.loss else f", loss {snap.loss:.3f}"
        found = ""
        if self.monitor.concepts is not None:
            top = ", ".join(f"{c} ×{n}" for c, n in list(snap.detectors.items())[:4])
            found = (f"; {snap.detector_count} concept detectors in "
                     f"{self.monitor.concept_layer}" + (f" ({top})" if top else ""))
        self._title.set_text(f"step {snap.step}{loss}{found}")
        self._step_label.value = f"step <b>{snap.step}</b> of {self.monitor.steps}"
        R.update_marker(self._curves, snap.step)
        self.figure.canvas.draw_idle()
        self.curves.canvas.draw_idle()

    # ------------------------------------------------------------------ training
    def step(self, loss, accuracy=None):
        """Record one step of your own training loop (see :meth:`Monitor.step`)."""
        return self.monitor.step(loss, accuracy)

    def run(self, wait: bool = True) -> None:
        """Train with the current settings (blocking when ``wait``); a run still going is
        stopped first. ``result`` holds what ``cw.train`` returned."""
        if self.data is None:
            raise ValueError("this monitor has no training data: pass data to "
                             "cw.TrainingMonitor(model, data) or call w.step() from your own loop")
        self.stop()
        settings = dict(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer,
                        batch_size=self.batch_size, seed=self.monitor.steps)
        self._start_step = self.monitor.steps
        self._set_running(True)
        self.status.value = f"training for {self.epochs:g} epochs with {self.optimizer}, lr {self.lr:g} …"

        def work(cancel):
            return train(self.model, self.data, monitor=self.monitor, cancel=cancel,
                         progress=False, **settings)

        self.submit(work, self._finished, background=not wait,
                    failed=lambda exc: self._set_running(False))

    def _finished(self, result) -> None:
        self.result = result
        self._set_running(False)
        self._refresh()
        if result.stopped and result.stopped != "cancelled":
            self.status.value = ("<span style='color:#a40000'><b>stopped:</b> "
                                 f"{html.escape(result.stopped)}</span>")
        else:
            word = "stopped" if result.stopped else "done"
            last = f", last loss {result.losses[-1]:.3f}" if len(result.losses) else ""
            self.status.value = f"{word} after {result.steps} steps{last}"

    _start_step = 0
