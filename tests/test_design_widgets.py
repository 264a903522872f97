"""TrainingMonitor and CompareExplorer: controls change state, runs update artists in place."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import traitlets

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.engine.training import small_cnn
from cnnwidgets.render import compare as RC
from cnnwidgets.render.training import filter_images

from test_compare import Net, noise_images, permuted, wrap


def shapes(n=64, size=16):
    return cw.datasets.SyntheticShapes(n_images=n, size=size, seed=0)


# ------------------------------------------------------------------ render helpers
def test_filter_images_scale_each_filter_around_grey():
    f = np.zeros((2, 3, 1, 2), np.float32)
    f[0, 0, 0, 0], f[0, 1, 0, 1] = 2.0, -1.0  # largest magnitude 2 → 1.0 and 0.25
    f[1] = 0.0  # all zero → mid-grey
    img = filter_images(f)
    assert img.shape == (2, 1, 2, 3)
    assert img[0, 0, 0].tolist() == [1.0, 0.5, 0.5]
    assert img[0, 0, 1].tolist() == [0.5, 0.25, 0.5]
    assert (img[1] == 0.5).all()


def test_cka_cell_under_a_click():
    assert RC.cell_at(0.4, 1.6, (3, 2)) == (2, 0)
    assert RC.cell_at(1.2, -0.4, (3, 2)) == (0, 1)
    assert RC.cell_at(2.6, 0.0, (3, 2)) is None
    assert RC.cell_at(None, 0.0, (3, 2)) is None


# ------------------------------------------------------------------ training monitor
def test_training_monitor_runs_and_updates_panels():
    torch.manual_seed(0)
    net = small_cnn(classes=4, width=4)
    w = cw.TrainingMonitor(net, shapes(64), every=4, epochs=1, lr=0.01, batch_size=16)
    filters0 = np.array(w._filters.get_array())
    assert w._w_snapshot.max == 0 and w.snapshot == 0
    w.run(wait=True)
    assert w.result.steps == 4 and not w.running
    assert w.monitor.snapshots.steps == [0, 4]
    assert w._w_snapshot.max == 1 and w.snapshot == 1  # followed the newest
    assert not np.array_equal(filters0, np.array(w._filters.get_array()))
    x, y = w._curves["loss"][0].get_data()
    assert list(x) == [1, 2, 3, 4] and np.allclose(y, w.result.losses)
    assert w.status.value.startswith("done after 4 steps")
    assert "step <b>4</b>" in w._step_label.value
    # drag back in time: the panels show snapshot 0 again, and following stops
    w._w_snapshot.value = 0
    assert w.snapshot == 0 and not w.follow
    np.testing.assert_array_equal(np.array(w._filters.get_array()), filters0)
    assert w._curves["loss"][2].get_xdata()[0] == 0
    assert hook_count(net) == 0 and net.training
    w.save("/tmp/issue18_training_monitor.png")
    with pytest.raises(traitlets.TraitError):
        w.snapshot = 5
    w._w_lr.value = 0.5
    assert w.lr == 0.5


def test_training_monitor_step_from_a_loop_of_your_own():
    net = small_cnn(classes=4, width=4)
    w = cw.TrainingMonitor(net, images=torch.rand(2, 3, 16, 16), every=2)
    for loss in (1.5, 1.2, 1.0):
        w.step(loss, 0.5)
    assert w.monitor.snapshots.steps == [0, 2] and w.snapshot == 1
    x, y = w._curves["loss"][0].get_data()
    assert list(y) == [1.5, 1.2, 1.0]
    with pytest.raises(ValueError, match="no training data"):
        w.run()


def test_training_monitor_says_when_the_loss_is_nan():
    class Nan(torch.utils.data.Dataset):
        classes = ["a", "b", "c", "d"]

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((3, 16, 16), float("nan")), 0

    net = small_cnn(classes=4, width=4)
    w = cw.TrainingMonitor(net, Nan(), images=torch.rand(2, 3, 16, 16), every=2, batch_size=4)
    with pytest.warns(RuntimeWarning):
        w.run(wait=True)
    assert "loss became nan" in w.status.value and "stopped" in w.status.value


# ------------------------------------------------------------------ compare explorer
@pytest.fixture
def pair():
    net = Net()
    return wrap(net), wrap(permuted(net, [3, 0, 5, 1, 4, 2]))


def test_compare_explorer_shows_matched_units_and_jumps_on_click(pair):
    a, b = pair
    images = noise_images(4)
    w = cw.CompareExplorer(a, b, images[0], images=images)
    assert w.layer_a == w.comparison.layers_a[0]
    assert w.comparison.layers_a == ["conv1", "conv2"]
    m = w.comparison.matches(w.layer_a, w.layer_b)
    assert w.layer_b == "conv1"  # the most similar layer by CKA
    assert "↔" in w._w_unit.options[0][0]
    # the matched unit of B shows the same map as the unit of A
    w.unit = 2
    w.wait()
    ov_a, ov_b = w._units[0][0], w._units[1][0]
    np.testing.assert_allclose(np.array(ov_a.get_array()), np.array(ov_b.get_array()), rtol=1e-5)
    assert f"B conv1:{m.partner[2]}" in w._unit_axes[1].get_title(loc="left")
    # a click on the CKA cell (row conv2, column conv1) takes that pair
    event = SimpleNamespace(inaxes=w._ax_cka, xdata=0.1, ydata=0.9)
    w._on_click(event)
    w.wait()
    assert (w.layer_a, w.layer_b) == ("conv2", "conv1")
    assert w._w_a.value == "conv2"
    assert w._cell.get_xy() == (-0.5, 0.5)
    with pytest.raises(traitlets.TraitError, match="was not compared"):
        w.layer_b = "fc"
    w.method = "saliency"
    w.wait()
    assert "saliency" in w._attr[0]["title"].get_text()
    assert hook_count(a.module) == 0 and hook_count(b.module) == 0
    w.save("/tmp/issue18_compare_explorer.png")
