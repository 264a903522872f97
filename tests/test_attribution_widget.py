"""AttributionExplorer: set a traitlet or a control, check the figure's artists changed."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import traitlets

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.render.attribution import shown_heat


@pytest.fixture(scope="module")
def model():
    import torchvision

    torch.manual_seed(0)
    return cw.Model(torchvision.models.resnet18(weights=None).eval(), input_size=(64, 64))


@pytest.fixture()
def widget(model):
    return cw.AttributionExplorer(model, cw.sample_image("cat"), background=False)


def overlay(w, i=None):
    panel = w.figures.main if i is None else w.figures.panels[i]
    return np.asarray(panel["overlay"].get_array())


def test_first_view_shows_grad_cam_of_the_top1_class(widget, model):
    assert widget.method == "grad_cam" and widget.target == model.predict(cw.sample_image("cat"))[0][0]
    r = widget.result[0]
    np.testing.assert_allclose(overlay(widget), shown_heat(r.map, r.fine))
    assert r.map.max() > 0 and widget.errors.last_error is None
    assert "grad_cam" in widget.figures.main["title"].get_text()


def test_method_change_rebuilds_parameter_controls_from_the_spec(widget):
    before = overlay(widget).copy()
    widget.method_select.value = "smoothgrad"
    assert widget.method == "smoothgrad"
    names = [c.description for c in widget.param_box.children]
    assert names == ["n_samples", "noise", "batch_size", "seed"]
    assert widget.params["n_samples"] == 25
    assert not np.allclose(overlay(widget), before)
    # a control → the traitlet → a recomputation with that parameter
    widget._param_controls["n_samples"].value = 2
    assert widget.params["n_samples"] == 2 and widget.result[0].params["n_samples"] == 2
    # and from code back to the control
    widget.params = {"n_samples": 3}
    assert widget._param_controls["n_samples"].value == 3 and widget.result[0].params["n_samples"] == 3
    assert widget.layer_select.disabled  # smoothgrad reads no layer
    # the next method's controls replace these: closed (no comm left open), not leaked
    old = list(widget._param_controls.values())
    widget.method_select.value = "grad_cam"
    assert old and all(c.comm is None for c in old)


def test_a_pixel_map_then_a_layer_map(widget):
    # a pixel-level map's overlay fades with its magnitude (a per-pixel alpha); going back to
    # a CAM method sets one opacity again, which matplotlib refused after a per-pixel alpha
    widget.method = "saliency"
    assert np.ndim(widget.figures.main["overlay"].get_alpha()) == 2
    widget.method = "grad_cam"
    assert widget.errors.last_error is None
    np.testing.assert_allclose(overlay(widget), shown_heat(widget.result[0].map, widget.result[0].fine))
    np.testing.assert_allclose(widget.figures.main["overlay"].get_alpha(), widget.alpha)
    widget.alpha = 0.3
    np.testing.assert_allclose(widget.figures.main["overlay"].get_alpha(), 0.3)


def test_target_and_layer(widget, model):
    widget.target = model.labels[5]
    assert widget.target == 5 and widget.result[0].target == 5
    widget.label_search.value = f"9: {model.labels[9]}"
    assert widget.target == 9 and widget.result[0].label == model.labels[9]
    before = overlay(widget).copy()
    widget.layer = "layer3"
    assert widget.result[0].layer == "layer3" and not np.allclose(overlay(widget), before)
    assert widget.layer_select.value == "layer3" and not widget.layer_select.disabled
    with pytest.raises(ValueError, match="did you mean"):
        widget.layer = "layer33"


def test_opacity_and_colour_map_restyle_without_recomputing(widget):
    result = widget.result
    widget.alpha_slider.value = 0.8
    assert widget.figures.main["overlay"].get_alpha() == pytest.approx(0.8)
    widget.cmap = "viridis"
    assert widget.figures.main["overlay"].get_cmap().name == "viridis"
    assert widget.cmap_select.value == "viridis"
    assert widget.result is result
    with pytest.raises(traitlets.TraitError):
        widget.alpha = 2.0


def test_compare_mode_shows_up_to_four_methods(widget):
    widget.compare = ["layer_cam", "saliency", "eigen_cam"]
    assert widget.figure is widget.figures.compare_fig
    assert [r.method for r in widget.result] == ["grad_cam", "layer_cam", "saliency", "eigen_cam"]
    for i, r in enumerate(widget.result):
        np.testing.assert_allclose(overlay(widget, i), shown_heat(r.map, r.fine))  # the display copy of the map
        assert all(r.target == widget.result[0].target for r in widget.result)
    widget.compare = ["saliency"]
    assert not widget.figures.panels[2]["overlay"].get_visible()
    with pytest.raises(traitlets.TraitError, match="at most 3"):
        widget.compare = ["saliency", "cam", "rise", "occlusion"]
    widget.compare = []
    assert widget.figure is widget.figures.single_fig


def test_errors_are_shown_in_the_widget(widget):
    widget.layer = "layer3"
    widget.compare = ["cam"]  # CAM needs the map fed to global pooling: its panel shows why
    title = widget.figures.panels[1]["title"].get_text()
    assert title == "cam: error"  # the reason goes inside the panel, not in the one-line title
    message = widget.figures.panels[1]["message"]
    assert message.get_visible() and "global average pooling" in " ".join(
        message.get_text().split())
    assert max(len(line) for line in message.get_text().splitlines()) <= 30  # wrapped
    assert widget.errors.last_error is None
    widget.compare = ["saliency", "cam"]  # the message moves with its method
    assert not widget.figures.panels[1]["message"].get_visible()
    assert widget.figures.panels[2]["message"].get_visible()
    widget.compare = ["saliency"]  # a hidden panel hides its message too
    assert not widget.figures.panels[2]["message"].get_visible()
    widget.compare = []
    widget.method = "cam"  # now the main method fails: the error box says why
    assert "global average pooling" in str(widget.errors.last_error)
    widget.layer = ""
    assert widget.errors.last_error is None


def test_background_stale_results_are_dropped_and_cancel_works(model):
    w = cw.AttributionExplorer(model, cw.sample_image("cat"), background=True)
    w.wait()
    w.method = "occlusion"  # slow: superseded at once by the next selection
    w.method = "saliency"
    w.wait()
    assert w.result[0].method == "saliency"
    assert np.allclose(overlay(w), shown_heat(w.result[0].map, w.result[0].fine))
    w.method = "rise"
    w.params = {"n_masks": 20000, "batch_size": 8}
    w.cancel_button.click()
    w.wait()
    assert w.status.value == "cancelled" and w.result[0].method == "saliency"
    assert hook_count(model.module) == 0


def test_save_writes_the_figure(widget, tmp_path):
    widget.save(tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_evaluate_draws_deletion_and_insertion_curves_for_every_map(widget, model):
    assert widget.figures.eval_box.children == () and widget.curves == []
    widget.compare = ["saliency"]
    widget.evaluate_check.value = True  # the control → the traitlet → curves for both maps
    figures = widget.figures
    assert widget.evaluate and figures.eval_box.children[0].children == (figures.eval_canvas.view,)
    assert len(widget.curves) == 2
    image = cw.sample_image("cat")
    for r, (d, i) in zip(widget.result, widget.curves):
        assert d.kind == "deletion" and i.kind == "insertion" and d.target == r.target
        # the same numbers as cw.metrics on the same map
        again = cw.metrics.deletion(model, image, r, steps=len(d.fractions) - 1)
        np.testing.assert_allclose(d.scores, again.scores, rtol=1e-5, atol=1e-7)
    dele, ins = widget.figures.eval_axes
    assert len(dele.lines) == 2 and len(ins.lines) == 2
    assert [t.get_text().split(" — ")[0] for t in dele.get_legend().get_texts()] == \
        ["grad_cam", "saliency"]
    # a new target: new curves, still one per map
    widget.target = 3
    assert [c[0].target for c in widget.curves] == [3, 3] and len(dele.lines) == 2
    widget.evaluate = False  # from code: the panel hides, no more curves computed
    assert widget.figures.eval_box.children == () and not widget.evaluate_check.value
    widget.target = 4
    assert widget.curves == []


def test_live_occlusion_controls_from_the_spec(widget):
    widget.method = "occlusion"
    names = [c.description for c in widget.param_box.children]
    assert names == ["window", "stride", "baseline", "exact", "threshold", "drill_down",
                     "batch_size"]
    widget._param_controls["window"].value = 24
    widget._param_controls["stride"].value = 20
    r = widget.result[0]
    assert (r.method, r.params["window"], r.params["stride"]) == ("occlusion", 24, 20)
    first = overlay(widget).copy()
    widget._param_controls["exact"].value = False  # Krypton's approximate mode, from a checkbox
    assert widget.result[0].params["exact"] is False
    widget._param_controls["window"].value = 40
    assert widget.result[0].params["window"] == 40 and not np.allclose(overlay(widget), first)


def test_a_view_computed_before_is_shown_again_without_computing(model, monkeypatch):
    # going back to a method (a target, a layer, parameters) shown before is a click to pixels:
    # what was computed is kept, unless the network's weights changed since
    import cnnwidgets.widgets.attribution as module

    calls = []
    real = module.attribute
    monkeypatch.setattr(module, "attribute",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    w = cw.AttributionExplorer(model, cw.sample_image("cat"), background=False)
    first = w.result[0]
    w.method = "cam"
    w.method = "grad_cam"
    assert calls == ["grad_cam", "cam"]  # the second grad_cam came from what was kept
    assert w.result[0] is first and "computed before" in w.status.value
    np.testing.assert_allclose(overlay(w), shown_heat(first.map, first.fine))
    w.layer = "layer3"
    w.layer = ""
    assert calls == ["grad_cam", "cam", "grad_cam"]  # layer3 is new; the default layer kept
    with torch.no_grad():  # the network changed: nothing kept from before it is shown
        model.module.fc.bias.add_(1.0)
    try:
        w.method = "cam"
        assert calls[-1] == "cam" and len(calls) == 4
    finally:
        with torch.no_grad():
            model.module.fc.bias.sub_(1.0)


def test_a_kept_view_is_not_overwritten_by_a_computation_still_running(model):
    w = cw.AttributionExplorer(model, cw.sample_image("cat"), method="cam")
    w.wait()
    w.method = "grad_cam"
    w.wait()
    kept = w.result[0]
    w.method = "occlusion"  # slow: runs in the background ...
    w.method = "grad_cam"  # ... superseded by a view kept from before, shown at once
    assert w.result[0] is kept
    w.wait()  # the occlusion's result, when it comes, is dropped
    assert w.result[0] is kept and w.method == "grad_cam"


def test_the_key_of_a_kept_view_tells_targets_apart(model):
    # two regions with as many pixels have the same name: they must not share a kept view
    from cnnwidgets.widgets.attribution import _request

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0] = b[3, 3] = True
    ra, rb = cw.targets.Region(1, a), cw.targets.Region(1, b)
    assert repr(ra) == repr(rb)
    key = lambda target, params=None: _request(["grad_cam"], target, "", params or {},  # noqa: E731
                                               False, model)
    assert key(ra) != key(rb) and key(ra) == key(ra)
    assert key([3, 5]) == key([3, 5]) != key([3, 6])
    assert key(3) != key(4) and key(None) == key(None)
    assert key(3, {"relu": [1, 2]}) is None  # a value that cannot be a key: computed every time


def test_the_single_figure_gets_its_frame_back_only_for_the_same_view(model):
    # the single figure's frames are kept by (the results shown, opacity, colour map, region):
    # a view shown before gets its frame back without drawing; a view computed anew is drawn
    from conftest import assert_frame_is_current

    w = cw.AttributionExplorer(model, cw.sample_image("cat"), background=False)
    canvas = w.figures.single_canvas
    canvas.draw()
    first = canvas.frame_image.value
    w.method = "cam"
    assert_frame_is_current(canvas)
    drawn = []
    for ax in w.figures.single_fig.axes:
        ax.draw = lambda renderer, ax=ax, inner=ax.draw: (drawn.append(ax), inner(renderer))[1]
    w.method = "grad_cam"  # the kept view: its frame put back
    canvas.draw()
    assert drawn == [] and canvas.frame_image.value == first
    assert_frame_is_current(canvas)
    drawn.clear()
    w.alpha = 0.8  # a new opacity: drawn
    canvas.draw()
    assert drawn
    drawn.clear()
    w.alpha = 0.5
    canvas.draw()
    assert drawn == [] and canvas.frame_image.value == first
    with torch.no_grad():  # the network changed: grad_cam computed anew, its frame drawn
        model.module.fc.bias.add_(1.0)
    try:
        w.method = "cam"
        w.method = "grad_cam"
        drawn.clear()
        canvas.draw()
        assert drawn
        assert_frame_is_current(canvas)
    finally:
        with torch.no_grad():
            model.module.fc.bias.sub_(1.0)
