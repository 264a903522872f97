"""``cw.FeatureMapExplorer``: every feature map of a layer, one click from the detail."""
from __future__ import annotations

import math

import ipywidgets as widgets
import traitlets

from ..engine.featuremaps import SORT_KEYS, feature_maps
from ..engine.hooks import layer_not_found
from ..engine.model import Model, as_model
from ..render import feature_maps as draw
from .base import WidgetBase, make_figure

#: channels shown per page at most; layers with more channels are split into pages
PAGE_SIZE = 1024
#: bars in the "which channels fire here" chart
TOP_K = 10


class FeatureMapExplorer(WidgetBase):
    """Browse a CNN layer by layer.

    Left: every feature map of ``layer`` as a grid, strongest first. Click a map to enlarge it
    over the image (middle); click a pixel of the enlarged map to see the channels that fire most
    there (right; click a bar to jump to that channel). State lives in traitlets that code can
    read and set: ``layer``, ``channel``, ``position`` (row, col on the layer's grid), ``sort``,
    ``page``.

    Example::

        w = cw.FeatureMapExplorer(cw.load_model("efficientnet_lite0"), cw.sample_image("cat"))
        w.layer = "_blocks.4"
        w.channel = 12
        w.save("maps.png")
    """

    layer = traitlets.Unicode(help="the layer shown (a name from model.layers())")
    channel = traitlets.Int(0, help="the enlarged channel")
    position = traitlets.Tuple(None, allow_none=True, help="(row, col) on the layer's grid")
    sort = traitlets.Enum(SORT_KEYS, default_value="mean", help="order of the grid")
    page = traitlets.Int(0, help="page of the grid, for layers with many channels")

    def __init__(self, model: Model, image, layer: str | None = None, *, layers=None,
                 prefetch: bool = True, width: float = 11.0, height: float = 4.6):
        super().__init__()
        model = as_model(model, "FeatureMapExplorer")
        self.model = model
        self.image = image
        _, self.display_image = model.prepare(image)
        self._layers = list(layers) if layers is not None else model.layers()
        if not self._layers:
            raise ValueError("the model has no layer that outputs feature maps to explore")
        self._fm = None
        self._order = None
        self._layout_grid = None
        self._busy = False

        # ---- figure: grid | enlarged map over the image | channels at the clicked pixel
        self.figure, self.canvas = make_figure(width, height, dpi=80)
        # fixed axes positions (figure fractions): no layout engine work on each redraw
        self.ax_grid = self.figure.add_axes((0.005, 0.02, 0.39, 0.88))
        self.ax_map = self.figure.add_axes((0.405, 0.02, 0.33, 0.88))
        self.ax_bars = self.figure.add_axes((0.75, 0.1, 0.225, 0.80))
        self._grid_artist, self._grid_box = draw.draw_grid(self.ax_grid, [[0.0]], 0.0, 1.0)
        H, W = self.display_image.shape[:2]
        self._overlay, self._marker = draw.draw_overlay(self.ax_map, self.display_image, [[0.0]])
        self._bars, self._bar_labels = draw.draw_bars(self.ax_bars, TOP_K)
        self._bar_channels = []
        self.canvas.mpl_connect("button_press_event", self.guarded(self._on_click))
        # the figure is a function of these: a state shown before gets its pixels back
        self.canvas.frame_key = lambda: (self.layer, self.channel, self.position, self.sort,
                                         self.page)

        # ---- controls
        self._layer_box = widgets.Dropdown(options=self._layers, description="layer",
                                           layout=widgets.Layout(width="360px"))
        self._sort_box = widgets.Dropdown(
            options=[("strongest mean first", "mean"), ("strongest peak first", "max"),
                     ("channel order", "index")],
            value="mean", description="sort", layout=widgets.Layout(width="300px"))
        self._page_box = widgets.Dropdown(options=[("1", 0)], description="channels",
                                          layout=widgets.Layout(width="240px", display="none"))
        for box, name in ((self._layer_box, "layer"), (self._sort_box, "sort"),
                          (self._page_box, "page")):
            self.bind(box, name)
        self.info = widgets.HTML()
        controls = widgets.HBox([self._layer_box, self._sort_box, self._page_box],
                                layout=widgets.Layout(flex_flow="row wrap"))
        self.children = [controls, self.info, self.canvas.view, self.errors]

        # the first layer shown: the one asked for, else a middle one (more telling than the stem)
        start = layer if layer is not None else self._layers[min(len(self._layers) - 1,
                                                                 len(self._layers) // 3)]
        if prefetch and start in self._layers:
            # one forward pass fills the cache for every layer that fits: switching is then
            # drawing only (the first layer's own forward pass is this one)
            i = self._layers.index(start)
            order = sorted(range(len(self._layers)), key=lambda j: abs(j - i))
            model.prefetch(image, [self._layers[j] for j in order])
        self.layer = start

    # ------------------------------------------------------------------ validation
    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        name = proposal["value"]
        if name not in self._layers:
            raise traitlets.TraitError(str(layer_not_found(name, self._layers)))
        return name

    @traitlets.validate("channel")
    def _valid_channel(self, proposal):
        c = int(proposal["value"])
        if self._fm is not None and not 0 <= c < self._fm.channels:
            raise traitlets.TraitError(
                f"channel {c} is out of range: layer {self.layer!r} has {self._fm.channels} "
                f"channels (0–{self._fm.channels - 1})")
        return c

    @traitlets.validate("position")
    def _valid_position(self, proposal):
        pos = proposal["value"]
        if pos is None or self._fm is None:
            return pos
        row, col = (int(v) for v in pos)
        h, w = self._fm.grid
        if not (0 <= row < h and 0 <= col < w):
            raise traitlets.TraitError(f"position {pos} is outside the layer's {h}×{w} grid")
        return (row, col)

    @traitlets.validate("page")
    def _valid_page(self, proposal):
        p = int(proposal["value"])
        if not 0 <= p < self.pages:
            raise traitlets.TraitError(f"page {p} does not exist; this layer has {self.pages} page(s)")
        return p

    # ------------------------------------------------------------------ state changes
    @property
    def pages(self) -> int:
        if self._fm is None:
            return 1
        return max(1, math.ceil(self._fm.channels / PAGE_SIZE))

    @property
    def page_size(self) -> int:
        if self._fm is None:
            return PAGE_SIZE
        return math.ceil(self._fm.channels / self.pages)

    @traitlets.observe("layer")
    def _layer_changed(self, change):
        if self._fm is not None and self._fm.layer == change["new"]:
            return  # already shown (put back after a failure)
        try:
            fm = feature_maps(self.model, self.image, change["new"])
        except Exception:
            if change["old"]:
                self.layer = change["old"]  # a failure leaves the widget on the layer it showed
            raise
        self._fm = fm
        self._order = fm.order(self.sort)
        self._busy = True
        try:
            labels = []
            for p in range(self.pages):
                lo = p * self.page_size
                hi = min(fm.channels, lo + self.page_size)
                labels.append((f"{lo + 1}–{hi} of {fm.channels}", p))
            self._page_box.options = labels
            self._page_box.layout.display = None if self.pages > 1 else "none"
            self.set_trait("page", 0)
            top = int(self._order[0])
            self.set_trait("channel", top)
            self.set_trait("position", fm.peak(top))
        finally:
            self._busy = False
        info = self.model.layer_info(fm.layer)
        h, w = fm.grid
        self.info.value = (f"<b>{fm.layer}</b> ({info.type}): {fm.channels} channels of "
                           f"{h}×{w}. Click a map to enlarge it; click the enlarged map to see "
                           "which channels fire there.")
        self._draw_grid()
        self._draw_detail()
        self.canvas.draw_idle()

    @traitlets.observe("sort", "page")
    def _grid_changed(self, change):
        if self._busy or self._fm is None:
            return
        if change["name"] == "sort":
            self._order = self._fm.order(change["new"])
        self._draw_grid()
        self.canvas.draw_idle()

    @traitlets.observe("channel", "position")
    def _detail_changed(self, change):
        if self._busy or self._fm is None:
            return
        if change["name"] == "channel":  # the grid turns to the channel's page and marks it
            rank = int((self._order == change["new"]).nonzero()[0][0])
            page = rank // self.page_size
            if page != self.page:
                self._busy = True
                try:
                    self.set_trait("page", page)
                finally:
                    self._busy = False
                self._draw_grid()
            else:
                self._select_tile()
        self._draw_detail()
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ drawing
    def _page_channels(self):
        start = self.page * self.page_size
        return self._order[start: start + self.page_size]

    def _draw_grid(self):
        fm = self._fm
        channels = self._page_channels()
        h, w = fm.grid
        self._layout_grid = draw.grid_layout(len(channels), h, w, aspect=1.2)
        lo, hi = fm.value_range()
        tiles = draw.mosaic(fm.maps[channels], self._layout_grid)
        title = f"{len(channels)} maps, " + {"mean": "strongest mean first",
                                           "max": "strongest peak first",
                                           "index": "channel order"}[self.sort]
        if self.pages > 1:
            title += f" (page {self.page + 1}/{self.pages})"
        draw.update_grid(self.ax_grid, self._grid_artist, tiles, lo, hi, title)
        self._select_tile()

    def _select_tile(self):
        channels = self._page_channels()
        where = (channels == self.channel).nonzero()[0]
        draw.select_tile(self._grid_box, self._layout_grid, int(where[0]) if len(where) else None)

    def _draw_detail(self):
        fm = self._fm
        c = self.channel
        h, w = fm.grid
        H, W = self.display_image.shape[:2]
        row, col = self.position if self.position is not None else fm.peak(c)
        point = ((col + 0.5) * W / w, (row + 0.5) * H / h)
        draw.update_overlay(self.ax_map, self._overlay, self._marker, fm.maps[c],
                            f"channel {c} (mean {fm.mean[c]:.3g}, peak {fm.max[c]:.3g})", point)
        channels, values = fm.top_channels(row, col, TOP_K)
        self._bar_channels = [int(ch) for ch in channels]
        highlight = self._bar_channels.index(c) if c in self._bar_channels else None
        draw.update_bars(self.ax_bars, self._bars, self._bar_labels,
                         [f"ch {ch}" for ch in channels], values,
                         f"top channels at ({row}, {col})", highlight)

    # ------------------------------------------------------------------ clicks
    def _on_click(self, event):
        if event.xdata is None or event.ydata is None or self._fm is None:
            return
        if event.inaxes is self.ax_grid:
            index = self._layout_grid.tile_at(event.xdata + 0.5, event.ydata + 0.5)
            if index is not None:
                self.channel = int(self._page_channels()[index])
        elif event.inaxes is self.ax_map:
            h, w = self._fm.grid
            H, W = self.display_image.shape[:2]
            row = min(h - 1, max(0, int(event.ydata / H * h)))
            col = min(w - 1, max(0, int(event.xdata / W * w)))
            self.position = (row, col)
        elif event.inaxes is self.ax_bars:
            i = int(round(event.ydata))
            if 0 <= i < len(self._bar_channels):
                self.channel = self._bar_channels[i]

    # ------------------------------------------------------------------ data access
    @property
    def maps(self):
        """The current layer's ``FeatureMaps`` (numpy arrays and per-channel statistics)."""
        return self._fm
