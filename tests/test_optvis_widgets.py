"""FeatureVisualizer and InversionExplorer: controls change state, runs update artists in place."""
from __future__ import annotations

import time

import numpy as np
import pytest
import traitlets

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.render.optvis import mosaic

from test_optvis import smooth_image, tiny_model


@pytest.fixture
def model():
    return tiny_model(32)


def test_feature_visualizer_runs_and_updates_artists(model):
    w = cw.FeatureVisualizer(model, layer="conv2", channel=1, steps=6, size=32, preview_every=2)
    before = np.array(w._img.get_array())
    w.run(wait=True)
    after = np.array(w._img.get_array())
    assert after.shape == (32, 32, 3) and not np.array_equal(before, after)
    x, y = w._line.get_data()
    assert len(x) == 6 and np.allclose(y, w.history)
    assert w._progress.value == 6 and not w.running
    assert w.status.value.startswith("done at step 6/6")
    assert hook_count(model.module) == 0
    w.save("/tmp/issue6_widget_test.png")


def test_feature_visualizer_controls_and_validation(model):
    w = cw.FeatureVisualizer(model, layer="conv1", steps=4, size=32)
    w._w_channel.value = 3  # the control sets the traitlet
    assert w.channel == 3
    assert w._ax_img.get_title() == "conv1:3"
    w.layer = "conv2"  # conv2 has 4 channels: the control's range follows
    assert w._w_layer.value == "conv2" and w._w_channel.max == 3
    with pytest.raises(traitlets.TraitError, match="out of range"):
        w.channel = 4
    with pytest.raises(traitlets.TraitError):
        w.mode = "dream"
    with pytest.raises(ValueError, match="no class label"):
        w.target = "zebra"
    w._w_channel.value = 3
    w._w_channel.max = 10
    w._w_channel.value = 9  # a bad value from a control shows in the error box
    assert w.errors.last_error is not None and w.channel == 3


def test_feature_visualizer_grid_and_class(model):
    w = cw.FeatureVisualizer(model, layer="conv2", steps=3, size=16, preview_every=1)
    w.mode = "grid"
    w.grid = 3
    w.run(wait=True)
    assert w.result.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(w._img.get_array(), mosaic(w.result))
    w.mode = "class"
    w._w_target.value = "cow"
    assert w.target == "cow"
    w.run(wait=True)
    assert w.history[-1] < w.history[0]


def test_feature_visualizer_background_stop(model):
    w = cw.FeatureVisualizer(model, layer="conv2", steps=100000, size=16, preview_every=5)
    w.run(wait=False)
    t0 = time.time()
    while w._progress.value < 5 and time.time() - t0 < 30:
        time.sleep(0.05)
    assert w.running
    w.stop()
    assert not w.running
    assert "stopped" in w.status.value
    assert 5 <= len(w.history) < 100000
    assert hook_count(model.module) == 0
    assert all(p.requires_grad and p.grad is None for p in model.module.parameters())


def test_stop_button_and_a_new_run_superseding_the_running_one(model):
    """As in a kernel (results reach the figure through the event loop): a second Start
    stops the first run before it begins; what the first run still had queued for the figure
    (a preview, its end) is dropped; the Stop button stops the second run."""
    import asyncio

    drawn = []  # the `steps` of the runs whose previews reached the figure

    async def cell():
        w = cw.FeatureVisualizer(model, layer="conv2", steps=100000, size=16, preview_every=1)
        w._loop = asyncio.get_running_loop()
        w._on_step = lambda step: drawn.append(step.steps)
        w.run(wait=False)
        first = w.task.thread
        time.sleep(0.5)  # the loop does not run meanwhile: the first run's preview waits
        w.steps = 99999
        w.run(wait=False)
        assert not first.is_alive() and w.task.thread.is_alive() and w.running
        for _ in range(500):
            await asyncio.sleep(0.02)
            if drawn:
                break
        w._stop.click()
        await asyncio.sleep(0.1)
        return w, first

    w, first = asyncio.run(cell())
    assert drawn and set(drawn) == {99999}
    assert not w.task.running and not w.running and w._stop.disabled and not w._start.disabled
    assert w.status.value.startswith("stopped at step") and "/99999," in w.status.value
    assert hook_count(model.module) == 0


def test_inversion_explorer(model):
    w = cw.InversionExplorer(model, smooth_image(32), layer="conv1", steps=6, preview_every=3)
    dec = np.array(w._dec.get_array())
    assert not np.allclose(dec, 0.5)  # the projection is shown at once
    assert w.projection.layer == "conv1"
    inv_before = np.array(w._inv.get_array())
    w.run(wait=True)
    assert not np.array_equal(inv_before, np.array(w._inv.get_array()))
    assert len(w._line.get_data()[0]) == 6
    w._w_layer.value = "conv2"
    assert w.layer == "conv2" and w.projection.layer == "conv2"
    assert not np.array_equal(dec, np.array(w._dec.get_array()))
    offsets = w._marks.get_offsets()
    assert len(offsets) == min(5, 16 * 16)
    w.channel = 2
    assert w.projection.channel == 2
    assert hook_count(model.module) == 0


def test_background_run_and_notebook_calls_do_not_interfere(model):
    # eval mode, as cw.load_model leaves a model: the engine core's model.predict and this
    # package's steps both switch to eval inside, and train/eval is not what is tested here
    model.module.eval()
    image = smooth_image(32)
    expected = model.predict(image, k=3)
    proj0 = np.asarray(cw.deconv(model, image, "conv2", channel=1)).copy()
    w = cw.FeatureVisualizer(model, layer="conv2", steps=100000, size=16, preview_every=5)
    w.run(wait=False)
    try:
        for _ in range(20):  # the main thread uses the model while the optimiser runs
            assert model.predict(image, k=3) == expected
            np.testing.assert_array_equal(np.asarray(cw.deconv(model, image, "conv2", channel=1)),
                                          proj0)
    finally:
        w.stop()
    assert w._progress.value > 0
    assert hook_count(model.module) == 0
    assert all(p.requires_grad and p.grad is None for p in model.module.parameters())


def test_default_and_unlisted_layers_are_in_the_menu():
    # MobileNetV3's squeeze-excitation convolutions output C×1×1: the layer menu does not list
    # them, and the default layer used to be one of them ("Invalid selection: value not found")
    import torch
    import torchvision

    torch.manual_seed(0)
    model = cw.Model(torchvision.models.mobilenet_v3_small(weights=None).eval(),
                     input_size=(64, 64))
    for cls in (cw.FeatureVisualizer, cw.InversionExplorer):
        w = cls(model) if cls is cw.FeatureVisualizer else cls(model, cw.sample_image("cat"))
        assert w.layer in model.layers() and w._w_layer.value == w.layer
    w = cw.FeatureVisualizer(model)
    se = "features.1.block.1.fc1"
    assert se not in model.layers() and model.layer_info(se).shape[1:] == (1, 1)
    w.layer = se  # a valid layer from code: added to the menu, which shows it
    assert w._w_layer.value == se and se in w._w_layer.options
