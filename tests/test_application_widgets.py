"""AttackExplorer and PruningExplorer: set a traitlet or a control, check the artists changed."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import traitlets
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.dissection import DissectionResult
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.render.applications import amplified


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def model():
    return cw.Model(Net().eval(), input_size=(24, 24), crop=1.0,
                    labels=["ant", "bee", "cat", "dog", "eel"])


def picture(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def data(artists):
    return np.asarray(artists["image"].get_array())


def test_attack_explorer_reacts_to_its_controls(model):
    hooks = hook_count(model.module)
    w = cw.AttackExplorer(model, picture(), background=False)
    adv = w.result
    assert adv is not None and adv.method == "fgsm" and adv.epsilon == pytest.approx(4 / 255)
    np.testing.assert_allclose(data(w._adversarial), adv.image)
    np.testing.assert_allclose(data(w._perturbation), amplified(adv.perturbation, adv.epsilon))
    assert w._topk.get_text().startswith("clean\n" + adv.before[0][1])
    x, y = w._drift_art["line"].get_data()
    assert len(x) == 2 and np.allclose(y, w.drift.relative)  # conv1, conv2
    assert w.layer == w.drift.most_moved()
    assert w.layer in w.ax_channels.get_title()

    w.epsilon_slider.value = 8.0  # the slider is in grey levels
    assert w.epsilon == pytest.approx(8 / 255) and w.result.epsilon == pytest.approx(8 / 255)
    assert np.abs(w.result.perturbation).max() > 4 / 255
    w.attack = "pgd"
    assert w.attack_box.value == "pgd" and w.result.method == "pgd"
    w.target_box.value = 3
    assert w.result.target == 3 and "dog" in w._topk.get_text()
    w.method = "saliency"
    assert "saliency" in w._attr[1]["title"].get_text()
    # a click on the drift curve chooses a layer; its channels are shown clean vs adversarial
    w._on_click(SimpleNamespace(inaxes=w.ax_drift, xdata=0.1, ydata=0.0))
    assert w.layer == "conv1" and "conv1" in w.ax_channels.get_title()
    assert np.asarray(w._channel_art["image"].get_array()).shape[0] == 2 * 24 + 1
    with pytest.raises(traitlets.TraitError):
        w.epsilon = 1.5
    with pytest.raises(traitlets.TraitError):
        w.target = 9
    assert w.errors.last_error is None
    assert hook_count(model.module) == hooks


def test_attack_explorer_epsilon_zero_changes_nothing(model):
    w = cw.AttackExplorer(model, picture(1), epsilon=0.0, background=False)
    np.testing.assert_array_equal(w.result.image, w.result.original)
    assert np.allclose(data(w._perturbation), 0.5)


@pytest.fixture(scope="module")
def dissection():
    iou = np.zeros((12, 2), np.float32)
    iou[[2, 5, 7], 0] = [0.2, 0.1, 0.06]  # three "red" detectors
    iou[4, 1] = 0.3  # one "stripes" detector
    return DissectionResult(["conv2"], ["red", "stripes"], {"red": "color", "stripes": "texture"},
                            {"conv2": {"iou": iou, "threshold": np.zeros(12, np.float32)}},
                            quantile=0.005, iou_threshold=0.04, n_images=4)


def test_pruning_explorer_reacts_to_its_controls(model, dissection):
    hooks = hook_count(model.module)
    images = [picture(s) for s in range(4)]
    w = cw.PruningExplorer(model, images, dissection, fractions=(0, 0.5, 1), background=False)
    assert w.layer == "conv2"
    assert set(w.curves) == {("conv2", c) for c in ("weight_l1", "activation", "random")}
    assert w.concept_list.options[0] == ("red (3)", "red") or tuple(w.concept_list.labels) == ("red (3)", "stripes (1)")
    lines = w._curve_art["lines"]
    np.testing.assert_allclose(lines["weight_l1"].get_ydata(),
                               w.curves[("conv2", "weight_l1")].agreement)
    np.testing.assert_allclose(w._curve_art["drops"]["weight_l1"].get_ydata(),
                               w.curves[("conv2", "weight_l1")].prob_drop)
    assert "3 units off" in w._panels[1]["title"].get_text()  # round(0.25 · 12)
    w.fraction_slider.value = 1.0
    assert "12 units off" in w._panels[1]["title"].get_text()
    np.testing.assert_allclose(w._curve_art["cursor"].get_xdata(), [1.0, 1.0])
    w.concept_list.value = "red"  # a click on a concept switches its detectors off first
    assert w.criterion == "red" and w.curves[("conv2", "red")].order[:3].tolist() == [2, 5, 7]
    assert lines["red"].get_visible() and lines["red"].get_linewidth() > 2
    w.fraction = 0.25
    assert "3 units off" in w._panels[1]["title"].get_text()
    w.index_slider.value = 2
    assert w.errors.last_error is None
    with pytest.raises(traitlets.TraitError):
        w.criterion = "loudness"
    with pytest.raises(traitlets.TraitError):
        w.fraction = -0.5
    assert hook_count(model.module) == hooks


def test_pruning_explorer_without_dissection_lists_conv_layers(model):
    w = cw.PruningExplorer(model, [picture(0), picture(1)], fractions=(0, 1), background=False)
    assert w.layer_box.options == ("conv1", "conv2") and w.concept_list.layout.display == "none"
    w.layer = "conv1"
    assert ("conv1", "activation") in w.curves and "conv1" in w.ax_curves.get_title()
