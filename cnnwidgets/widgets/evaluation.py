"""``cw.EvaluationExplorer``: the methods × metrics of a ``cw.evaluate`` run, and each method's
best and worst images."""
from __future__ import annotations

import ipywidgets as widgets
import traitlets

from ..engine.evaluation import Evaluation
from ..render import evaluation as render
from .base import WidgetBase, make_figure

PER_IMAGE = ("iou", "pointing", "deletion", "insertion")


class EvaluationExplorer(WidgetBase):
    """The summary as bars with their 95% intervals; click a method's bar (or pick it in the
    menu) to see its ``images`` best and worst images by ``metric``: the map over the crop the
    network saw, the box drawn from the map (red, dashed) and the true boxes (green). With a
    ``model``, click an image to open it in an ``AttributionExplorer`` below.

    ``evaluation``: a :class:`cw.Evaluation` (or the path of a saved one). ``model``: the
    evaluated model — maps are computed again for the gallery when the run wrote none
    (``maps_dir``); without either, the images show without maps. ``dataset``: the evaluated
    data set (default: rebuilt from the evaluation when it can be).

    State (traitlets): ``method``, ``metric`` (a per-image column: "iou", "pointing",
    "deletion", "insertion"), ``target`` ("label" or "top1"), ``opened`` (the data set index
    shown in the attribution explorer, −1 for none).
    """

    method = traitlets.Unicode()
    metric = traitlets.Unicode("iou")
    target = traitlets.Unicode("label")
    opened = traitlets.Int(-1)

    def __init__(self, evaluation, model=None, dataset=None, *, images: int = 4, **kwargs):
        if not isinstance(evaluation, Evaluation):
            evaluation = Evaluation.load(evaluation)
        super().__init__(**kwargs)
        self.evaluation = evaluation
        self.model = model
        self.dataset = dataset
        self.n_images = max(1, int(images))
        metrics = [m for m in PER_IMAGE if m == "iou" and "localization" in evaluation.metrics
                   or m in evaluation.metrics]
        self._metrics = metrics or ["iou"]
        self.shown: list[int] = []  #: data set indices in the gallery: best, then worst

        self._method_box = widgets.Dropdown(options=evaluation.methods, description="method",
                                            layout=widgets.Layout(width="260px"))
        self._metric_box = widgets.Dropdown(options=self._metrics, description="rank by",
                                            layout=widgets.Layout(width="220px"))
        self._target_box = widgets.Dropdown(options=evaluation.targets, description="target",
                                            layout=widgets.Layout(width="200px"))
        self.info = widgets.HTML()
        self.detail = widgets.VBox()

        n = self.n_images
        self.figure, self.canvas = make_figure(9.5, 3.2 + 2 * 2.3, dpi=80)
        grid = self.figure.add_gridspec(3, n, height_ratios=[1.4, 1, 1], hspace=0.45,
                                        left=0.07, right=0.98, top=0.95, bottom=0.03)
        self._bar_ax = self.figure.add_subplot(grid[0, :])
        cells = [self.figure.add_subplot(grid[1 + i // n, i % n]) for i in range(2 * n)]
        self._cells = render.draw_gallery(cells)
        self.canvas.mpl_connect("button_press_event", self.guarded(self._clicked))

        self.bind(self._method_box, "method")
        self.bind(self._metric_box, "metric")
        self.bind(self._target_box, "target")
        self.children = [widgets.HBox([self._method_box, self._metric_box, self._target_box]),
                         self.info, self.errors, self.canvas.view, self.status, self.detail]
        with self.hold_trait_notifications():
            self.metric = self._metrics[0]
            self.target = evaluation.targets[0]
            self.method = evaluation.methods[0]
        self._draw()
        self.observe(self.guarded(lambda change: self._draw()), ["method", "metric", "target"])
        self.observe(self.guarded(self._open), "opened")

    @traitlets.validate("method")
    def _valid_method(self, proposal):
        if proposal["value"] not in self.evaluation.methods:
            raise traitlets.TraitError(f"no method {proposal['value']!r}; choose one of "
                                       f"{self.evaluation.methods}")
        return proposal["value"]

    @traitlets.validate("metric")
    def _valid_metric(self, proposal):
        if proposal["value"] not in self._metrics:
            raise traitlets.TraitError(f"metric must be one of {self._metrics}")
        return proposal["value"]

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        if proposal["value"] not in self.evaluation.targets:
            raise traitlets.TraitError(f"target must be one of {self.evaluation.targets}")
        return proposal["value"]

    # ----------------------------------------------------------------- drawing
    def _draw(self):
        ev = self.evaluation
        selected = ev.methods.index(self.method)
        render.draw_bars(self._bar_ax, ev.bars(self.target), selected=selected)
        self._bar_ax.set_title(f"{len(ev.methods)} methods on {ev.n_images} images — click a "
                               "method's bar for its best and worst images", fontsize=9)
        ranked = list(ev.ranked(self.method, self.metric, self.target))
        n = self.n_images
        best = ranked[:n]
        worst = ranked[::-1][:n] if len(ranked) > n else []
        self.shown = best + [None] * (n - len(best)) + worst
        entries = []
        for i, index in enumerate(self.shown):
            if index is None:
                entries.append(None)
                continue
            e = ev.example(int(index), self.method, self.target, model=self.model,
                           dataset=self.dataset)
            e["title"] = ("best " if i < n else "worst ") + e["title"]
            entries.append(e)
        render.update_gallery(self._cells, entries)
        summary = {e["method"]: e for e in ev.summary(self.target)}[self.method]
        facts = [f"{k} {v[0]:.3f}" for k, v in summary.items()
                 if isinstance(v, tuple) and k != "accuracy"]
        self.info.value = (f"<b>{self.method}</b> ({self.target}): " + ", ".join(facts)
                           + ". <span style='color:#00a000'>green</span>: true boxes; "
                           "<span style='color:#e00000'>red dashed</span>: the map's box."
                           + (" Click an image to open it." if self.model is not None else ""))
        self.canvas.draw_idle()

    def _clicked(self, event):
        if event.inaxes is self._bar_ax:
            for container in self._bar_ax.containers:
                for patch in getattr(container, "patches", []):
                    if patch.contains(event)[0] and patch.get_gid() is not None:
                        self.method = self.evaluation.methods[int(patch.get_gid())]
                        return
            return
        for cell, index in zip(self._cells, self.shown):
            if event.inaxes is cell["ax"] and index is not None:
                self.opened = int(index)

    def _open(self, change):
        if self.model is None or self.opened < 0:
            self.detail.children = []
            return
        from .attribution import AttributionExplorer

        e = self.evaluation.example(self.opened, self.method, self.target, model=self.model,
                                    dataset=self.dataset)
        self.detail.children = [widgets.HTML(f"<b>image {self.opened}</b>"),
                                AttributionExplorer(self.model, e["source"], self.method,
                                                    target=int(e["row"]["target"]))]
