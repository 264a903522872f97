"""cw.EvaluationExplorer without a browser: traitlets drive the bars and the gallery, a click on
a bar picks its method, a click on an image opens it."""
from __future__ import annotations

import numpy as np
import pytest
import traitlets
from matplotlib.backend_bases import MouseEvent

import cnnwidgets as cw
from test_evaluation import SQUARES, Squares, red_net


@pytest.fixture(scope="module")
def setup():
    model = red_net()
    ds = Squares(**SQUARES)
    ev = cw.evaluate(model, ds, ["grad_cam", "saliency"], ["localization", "pointing"],
                     progress=False)
    return model, ds, ev


def _click(w, ax, x, y):
    w.figure.canvas.draw()
    px, py = ax.transData.transform((x, y))
    event = MouseEvent("button_press_event", w.canvas, px, py, button=1)
    w.canvas.callbacks.process("button_press_event", event)


def _outlined(w):
    return sorted({p.get_gid() for p in w._bar_ax.patches if p.get_linewidth() > 1})


def test_method_switch_redraws_and_bar_click_selects(setup):
    model, ds, ev = setup
    w = cw.EvaluationExplorer(ev, model, ds, images=1)
    assert w.method == "grad_cam" and _outlined(w) == ["0"]
    # best image by IoU: image 0 (IoU 1), worst: image 1 (IoU 0), each with its map
    assert w.shown == [0, 1]
    first = w._cells[0]["ax"].get_title()
    assert first.startswith("best #0") and "IoU 1.00" in first
    assert w._cells[1]["ax"].get_title().startswith("worst #1")
    assert len(w._cells[0]["ax"].images) == 2  # the crop and the map over it
    w.method = "saliency"
    assert _outlined(w) == ["1"] and w._method_box.value == "saliency"
    # a click on grad_cam's localisation bar picks grad_cam again
    bar = next(p for p in w._bar_ax.patches if p.get_gid() == "0" and p.get_height() > 0)
    _click(w, w._bar_ax, bar.get_x() + bar.get_width() / 2, bar.get_height() / 2)
    assert w.method == "grad_cam" and _outlined(w) == ["0"]
    with pytest.raises(traitlets.TraitError):
        w.method = "no_such_method"
    w.metric = "pointing"
    assert w._metric_box.value == "pointing"


def test_image_click_opens_the_attribution_explorer(setup):
    model, ds, ev = setup
    w = cw.EvaluationExplorer(ev, model, ds, images=1)
    assert w.detail.children == ()
    ax = w._cells[1]["ax"]
    _click(w, ax, 16, 16)
    assert w.opened == 1
    explorer = w.detail.children[-1]
    assert type(explorer).__name__ == "AttributionExplorer"
    assert explorer.method == "grad_cam" and explorer.target == 0
    np.testing.assert_array_equal(explorer.display, model.prepare(ds[1]["image"])[1])


def test_without_a_model_the_stored_maps_are_shown(setup, tmp_path):
    model, ds, _ = setup
    ev = cw.evaluate(model, ds, ["grad_cam"], ["localization"], maps_dir=tmp_path,
                     progress=False)
    w = cw.EvaluationExplorer(ev, dataset=ds, images=1)
    assert len(w._cells[0]["ax"].images) == 2
    w.save(tmp_path / "shot.png")
    assert (tmp_path / "shot.png").stat().st_size > 0
