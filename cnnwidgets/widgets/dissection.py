"""``cw.DissectionExplorer``: browse a network dissection layer by layer, unit by unit."""
from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import traitlets

from ..engine.datasets import concept_mask, dataset_from_spec, item_image
from ..engine.dissection import DissectionResult
from ..render import dissection as render
from .base import KEEP, WidgetBase, make_figure


class DissectionExplorer(WidgetBase):
    """Pick a layer and a unit; see its concept, category, IoU and threshold, the images where
    it fires most with the unit's binarised map outlined (yellow) and everything outside the
    concept's mask dimmed, detectors per category for the layer and detectors per layer.

    ``result``: a :class:`cw.DissectionResult` (or the path of a saved one).
    ``dataset``: the concept data set it was computed on; by default it is rebuilt from the
    result when it can be (the synthetic set always can). Without one, the unit's activation
    maps are shown in place of the images.

    State (traitlets): ``layer``, ``unit``, ``sort`` ("iou": best units first, or "unit"),
    ``detectors_only`` (list only detectors).
    """

    layer = traitlets.Unicode()
    unit = traitlets.Int(0)
    sort = traitlets.Enum(("iou", "unit"), default_value="iou")
    detectors_only = traitlets.Bool(False)

    def __init__(self, result, dataset=None, *, images: int | None = None, **kwargs):
        if not isinstance(result, DissectionResult):
            result = DissectionResult.load(result)
        if not result.layers:
            raise ValueError("the dissection result has no layers")
        super().__init__(**kwargs)
        self.result = result
        self.dataset = dataset if dataset is not None else dataset_from_spec(result.dataset)
        first = result.layers[0]
        n_top = result.data[first]["top_index"].shape[1]
        self.n_images = max(1, min(int(images or 8), n_top or 1))
        self.categories = result.category_names

        # ------------------------------------------------------------- controls
        self._layer_box = widgets.Dropdown(options=result.layers, description="layer",
                                           layout=widgets.Layout(width="280px"))
        self._unit_box = widgets.Dropdown(description="unit", layout=widgets.Layout(width="340px"))
        self._sort_box = widgets.ToggleButtons(options=[("by IoU", "iou"), ("by unit", "unit")],
                                               value="iou", style={"button_width": "70px"})
        self._only_box = widgets.Checkbox(value=False, description="detectors only", indent=False,
                                          layout=widgets.Layout(width="130px"))
        self.info = widgets.HTML()

        # ------------------------------------------------------------- figure
        shape, mask_shape = self._shapes()
        cols = 4 if self.n_images > 4 else self.n_images
        rows = int(np.ceil(self.n_images / cols))
        self.figure, self.canvas = make_figure(9.5, 2.25 * rows + 2.6, dpi=85)
        grid = self.figure.add_gridspec(rows + 1, cols * 2, height_ratios=[1] * rows + [1.05])
        axes = [self.figure.add_subplot(grid[i // cols, 2 * (i % cols): 2 * (i % cols) + 2])
                for i in range(self.n_images)]
        self._cells = render.draw_top_images(axes, shape, mask_shape)
        self._cat_bars = render.draw_category_bars(
            self.figure.add_subplot(grid[rows, :cols]), self.categories)
        summary = result.summary()
        counts = [[summary[l][c] for c in self.categories] for l in result.layers]
        self._layer_bars = render.draw_layer_bars(self.figure.add_subplot(grid[rows, cols:]),
                                                  result.layers, self.categories, counts)

        self._title = self.figure.suptitle("", fontsize=10)
        self.bind(self._layer_box, "layer")
        self.bind(self._unit_box, "unit", to_trait=lambda unit: KEEP if unit is None else unit)
        self.bind(self._sort_box, "sort")
        self.bind(self._only_box, "detectors_only")
        controls = widgets.HBox([self._layer_box, self._unit_box, self._sort_box, self._only_box])
        self.children = [controls, self.info, self.errors, self.canvas.view, self.status]
        self.layer = first
        self._refresh_units()
        self._draw_unit()

    # ----------------------------------------------------------------- state
    def _shapes(self):
        if self.dataset is not None and len(self.dataset):
            item = self.dataset[0]
            shape = item_image(item).shape[:2]
            mask_shape = concept_mask(item, 0, list(self.dataset.concepts)).shape
            return shape, mask_shape
        h, w = (int(v) for v in self.result.data[self.result.layers[0]]["map_shape"])
        size = (max(h, 64), max(w, 64))
        return size, size

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        if proposal["value"] not in self.result.layers:
            raise traitlets.TraitError(
                f"no layer {proposal['value']!r} in this result; choose one of {self.result.layers}")
        return proposal["value"]

    @traitlets.validate("unit")
    def _valid_unit(self, proposal):
        n = len(self.result.thresholds(self.layer)) if self.layer else 0
        if not 0 <= proposal["value"] < max(n, 1):
            raise traitlets.TraitError(f"unit must be between 0 and {n - 1} for layer {self.layer!r}")
        return proposal["value"]

    @traitlets.observe("layer")
    def _layer_changed(self, change):
        if hasattr(self, "_cells"):  # not while a layer given to the constructor is set
            self._refresh_units()
            if self.unit >= len(self.result.thresholds(self.layer)):
                self.unit = 0
            self._draw_unit()

    @traitlets.observe("sort", "detectors_only")
    def _order_changed(self, change):
        self._refresh_units()

    @traitlets.observe("unit")
    def _unit_changed(self, change):
        if hasattr(self, "_cells"):
            self._draw_unit()

    def records(self):
        """The unit records of the current layer, in the current order and filter."""
        records = self.result.units(self.layer, sort=self.sort)
        if self.detectors_only:
            records = [r for r in records if r.iou >= self.result.iou_threshold]
        return records

    def _refresh_units(self):
        if not self.layer:
            return
        records = self.records()
        options = [(f"{r.unit:4d} · {r.concept or '—'} ({r.category or '—'}) IoU {r.iou:.3f}"
                    + (" ✓" if r.iou >= self.result.iou_threshold else ""), r.unit)
                   for r in records]
        self._unit_box.options = options  # the unit follows the menu's first entry
        self.resync("unit")
        # category bars for this layer
        counts = self.result.summary()[self.layer]
        n_units = len(self.result.thresholds(self.layer))
        render.update_category_bars(
            self._cat_bars, [counts[c] for c in self.categories],
            f"{self.layer}: {sum(counts[c] for c in self.categories)} of {n_units} units are "
            f"detectors ({counts['concepts']} concepts)")
        render.highlight_layer(self._layer_bars, self.result.layers.index(self.layer))

    # ----------------------------------------------------------------- drawing
    def _draw_unit(self):
        layer, unit = self.layer, self.unit
        record = self.result.units(layer)[unit]
        concept_index = self.result.concepts.index(record.concept) if record.concept else -1
        detector = record.iou >= self.result.iou_threshold
        color = render.category_color(record.category,
                                      self.categories.index(record.category)
                                      if record.category in self.categories else 0)
        self.info.value = (
            f"<b>{html.escape(layer)}</b> unit <b>{unit}</b>: "
            f"<span style='color:{color}'><b>{html.escape(record.concept or '(no concept)')}</b></span>"
            f"{f' ({html.escape(record.category)})' if record.category else ''}, "
            f"IoU <b>{record.iou:.3f}</b> "
            f"{'≥' if detector else '<'} {self.result.iou_threshold:g} "
            f"({'a detector' if detector else 'not a detector'}), threshold "
            f"T = {record.threshold:.4g} (top {self.result.quantile:g} of its activations). "
            "<span style='color:#b8a000'>yellow outline</span>: where the unit is above T; "
            "dimmed: outside the concept's mask."
        )
        indices = self.result.top_images(layer, unit)[: self.n_images]
        images, concepts, units, titles = [], [], [], []
        for rank, index in enumerate(indices):
            if self.dataset is not None:
                item = self.dataset[index]
                images.append(item_image(item))
                cm = concept_mask(item, concept_index, list(self.dataset.concepts))
                concepts.append(cm)
                units.append(self.result.unit_mask(layer, unit, rank, cm.shape))
            else:
                size = self._cells[0]["unit"].get_array().shape[:2]
                images.append(self.result.unit_map(layer, unit, rank))
                concepts.append(None)
                units.append(self.result.unit_mask(layer, unit, rank, size))
            score = float(self.result.data[layer]["top_scores"][unit, rank])
            titles.append(f"image {index} · max {score:.3g}")
        render.update_top_images(self._cells, images, concepts, units, titles)
        self._title.set_text(f"{layer} unit {unit}: {record.concept or '—'} ({record.category or '—'}), "
                             f"IoU {record.iou:.3f} — top images; yellow: unit ≥ T, "
                             f"dimmed: not {record.concept or 'a concept'}")
        self.canvas.draw_idle()
