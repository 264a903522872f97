"""``cw.Explorer``: every explorer for one model and image, as tabs built on first view."""
from __future__ import annotations

from importlib import import_module

import ipywidgets as widgets

from ..engine.model import Model, as_model
from .base import WidgetBase

#: (tab title, module, class, needs the image) in tab order
TABS = [
    ("Feature maps", "cnnwidgets.widgets.feature_maps", "FeatureMapExplorer", True),
    ("Attribution", "cnnwidgets.widgets.attribution", "AttributionExplorer", True),
    ("CNN Fixations", "cnnwidgets.widgets.fixations", "FixationExplorer", True),
    ("Feature visualisation", "cnnwidgets.widgets.feature_visualizer", "FeatureVisualizer",
     False),
    ("Inversion", "cnnwidgets.widgets.inversion", "InversionExplorer", True),
]


def _available():
    found = []
    for title, module, name, needs_image in TABS:
        try:
            cls = getattr(import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append((title, cls, needs_image))
    return found


class Explorer(WidgetBase):
    """All explorers as tabs. Each tab's widget is built the first time the tab is shown, so
    opening the explorer costs one widget, not all of them. ``dissection`` (a
    ``cw.DissectionResult``) adds a dissection tab.
    """

    def __init__(self, model: Model, image, *, dissection=None):
        super().__init__()
        model = as_model(model, "cw.Explorer")
        self.model = model
        self.image = image
        self._factories = []
        for title, cls, needs_image in _available():
            args = (model, image) if needs_image else (model,)
            self._factories.append((title, cls, args))
        if dissection is not None:
            from .dissection import DissectionExplorer

            self._factories.append(("Dissection", DissectionExplorer, (dissection,)))
        self.tabs = widgets.Tab(children=[widgets.VBox() for _ in self._factories])
        for i, (title, _, _) in enumerate(self._factories):
            self.tabs.set_title(i, title)
        self.views: dict[str, widgets.Widget] = {}
        self.tabs.observe(self.guarded(lambda change: self._build(change["new"])), "selected_index")
        self.children = [self.tabs, self.errors]
        self._build(0)

    def _build(self, index):
        if index is None or not 0 <= index < len(self._factories):
            return
        title, cls, args = self._factories[index]
        if title in self.views:
            return
        holder = self.tabs.children[index]
        holder.children = [widgets.HTML(f"<i>building the {title.lower()} view…</i>")]
        view = cls(*args)
        self.views[title] = view
        holder.children = [view]

    @property
    def titles(self) -> list[str]:
        return [t for t, _, _ in self._factories]

    def show(self, title: str):
        """Select the tab called ``title`` (building its widget if needed) and return it."""
        index = self.titles.index(title)
        self.tabs.selected_index = index
        self._build(index)
        return self.views[title]

    def save(self, path, dpi=None) -> None:
        """Save the figure of the tab being shown."""
        title = self.titles[self.tabs.selected_index or 0]
        self._build(self.tabs.selected_index or 0)
        self.views[title].save(path, dpi=dpi)
