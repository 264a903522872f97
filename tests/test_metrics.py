"""cw.metrics: deletion / insertion worked by hand on a linear network, the pointing game, the
rank correlation against scipy, and the randomisation sanity check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.attribution import register, unregister
from cnnwidgets.engine.hooks import hook_count

from conftest import assert_same_state, snapshot


class MeanOfRed(nn.Module):
    """logit 0 = mean of the red channel over the 8×8 image; logit 1 = 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0], [0.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def ramp():
    """8×8 image whose red value at pixel k (reading order) is 4k/255 (exact in uint8)."""
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[..., 0] = (4 * np.arange(64)).reshape(8, 8)
    return image


@pytest.fixture
def linear():
    return cw.Model(MeanOfRed(), input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), crop=1.0,
                    labels=["red", "none"])


def red_sum(ks):
    return sum(4 * k / 255 for k in ks) / 64  # the logit: mean red value


def test_deletion_by_hand(linear):
    heat = (np.arange(64) / 63).reshape(8, 8)  # ranks the pixels as the red values do
    before = snapshot(linear.module)
    c = cw.metrics.deletion(linear, ramp(), heat, target=0, steps=4, baseline="zeros",
                            score="logit")
    # the 16 largest red values go first: what is left is pixels 0…47, then 0…31, 0…15, none
    expected = [red_sum(range(64)), red_sum(range(48)), red_sum(range(32)), red_sum(range(16)), 0.0]
    np.testing.assert_allclose(c.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(c.scores, expected, rtol=1e-5, atol=1e-7)
    trapezoid = 0.25 * (expected[0] / 2 + sum(expected[1:4]) + expected[4] / 2)
    assert c.auc == pytest.approx(trapezoid, rel=1e-5)
    assert c.better == "lower" and c.target == 0 and c.label == "red"
    assert c.images.shape == (5, 8, 8, 3)
    assert_same_state(linear.module, before)
    assert hook_count(linear.module) == 0


def test_insertion_by_hand_and_probability(linear):
    heat = (np.arange(64) / 63).reshape(8, 8)
    c = cw.metrics.insertion(linear, ramp(), heat, target=0, steps=4, baseline="zeros")
    # the 16 largest first: pixels 48…63 are in, then 32…63, 16…63, all; probability = σ(logit)
    logits = [0.0, red_sum(range(48, 64)), red_sum(range(32, 64)), red_sum(range(16, 64)),
              red_sum(range(64))]
    np.testing.assert_allclose(c.scores, [1 / (1 + math.exp(-v)) for v in logits], rtol=1e-5)
    assert c.better == "higher"
    # a reversed map inserts the darkest pixels first: a lower curve
    worse = cw.metrics.insertion(linear, ramp(), heat[::-1, ::-1].copy(), target=0, steps=4,
                                 baseline="zeros")
    assert worse.auc < c.auc


def test_black_baseline_is_black_as_the_network_sees_it():
    """The default "black" substrate is a black image normalised like any input:
    (0 − mean)/std in the network, not 0. With mean 0.5 and std 0.25 a red pixel of 255 is
    +2 and black is −2, so on an all-red image the logit (mean red) after k of 64 pixels are
    blackened is (2·(64 − k) − 2·k)/64 = 2 − k/16: 2, 1, 0, −1, −2 at quarter steps (a 0
    substrate would give 2, 1.5, 1, .5, 0)."""
    model = cw.Model(MeanOfRed(), input_size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3,
                     crop=1.0, labels=["red", "none"])
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    heat = (np.arange(64) / 63).reshape(8, 8)
    c = cw.metrics.deletion(model, red, heat, target=0, steps=4, score="logit")
    assert c.baseline == "black"
    np.testing.assert_allclose(c.scores, [2, 1, 0, -1, -2], atol=1e-5)
    # the fully deleted image, shown as the user sees it, is black
    np.testing.assert_allclose(c.images[-1], 0.0, atol=1e-6)
    c = cw.metrics.insertion(model, red, heat, target=0, steps=4, score="logit", baseline="black")
    np.testing.assert_allclose(c.scores, [-2, -1, 0, 1, 2], atol=1e-5)
    np.testing.assert_allclose(c.images[0], 0.0, atol=1e-6)


def test_curve_from_a_method_name_and_from_an_attribution(linear):
    a = cw.attribute(linear, ramp(), "gradient_x_input", target=0)
    by_object = cw.metrics.deletion(linear, ramp(), a, steps=8)
    by_name = cw.metrics.deletion(linear, ramp(), "gradient_x_input", target=0, steps=8)
    np.testing.assert_allclose(by_object.scores, by_name.scores)
    assert by_object.method == "gradient_x_input" and by_object.target == 0


def test_curve_errors(linear):
    with pytest.raises(ValueError, match="model sees 8×8"):
        cw.metrics.deletion(linear, ramp(), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="baseline must be one of"):
        cw.metrics.deletion(linear, ramp(), np.zeros((8, 8)), baseline="grey")
    with pytest.raises(ValueError, match="only used when attribution is a method name"):
        cw.metrics.deletion(linear, ramp(), np.zeros((8, 8)), steps=2, window=3)
    with pytest.raises(ValueError, match="steps"):
        cw.metrics.insertion(linear, ramp(), np.zeros((8, 8)), steps=0)


def test_curve_can_be_cancelled(linear):
    import threading

    stop = threading.Event()
    stop.set()
    before = snapshot(linear.module)
    with pytest.raises(cw.Cancelled):
        cw.metrics.deletion(linear, ramp(), np.zeros((8, 8)), steps=64, batch_size=4, cancel=stop)
    assert_same_state(linear.module, before)


def test_blur_baseline_keeps_a_constant_image():
    x = torch.full((1, 3, 16, 16), 0.3)
    from cnnwidgets.engine.metrics import _substrate

    model = cw.Model(MeanOfRed(), input_size=(16, 16))
    assert torch.allclose(_substrate(model, x, "blur"), x, atol=1e-6)
    y = torch.zeros(1, 3, 16, 16)
    y[..., 8, 8] = 1.0  # a point spreads out but keeps its mass away from the borders
    blurred = _substrate(model, y, "blur")
    assert blurred[..., 8, 8].max() < 0.05 and blurred.sum() == pytest.approx(3.0, rel=1e-4)


def test_pointing_game_by_hand():
    heat = np.zeros((10, 12), dtype=np.float32)
    heat[3, 5] = 1.0  # maximum at row 3, column 5 (pixel centre x = 5.5, y = 3.5)
    hit = cw.metrics.pointing_game(heat, (4, 2, 7, 4))
    assert hit and hit.point == (3, 5) and hit.distance == 0.0
    far = (10, 2, 12, 4)  # nearest object pixel: row 3, column 10 — 5 px away
    assert cw.metrics.pointing_game(heat, far).distance == 5.0
    assert cw.metrics.pointing_game(heat, far)  # within the default 15 px
    assert not cw.metrics.pointing_game(heat, far, tolerance=4)
    mask = np.zeros((10, 12), dtype=bool)
    mask[8, 1] = True  # 5 rows and 4 columns away: √41
    assert cw.metrics.pointing_game(heat, mask).distance == pytest.approx(math.sqrt(41))
    with pytest.raises(ValueError, match="empty"):
        cw.metrics.pointing_game(heat, (5, 5, 5, 9))


def test_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    assert cw.metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


def test_sanity_check_separates_a_model_blind_map_from_a_real_one():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    model = cw.Model(net, input_size=(64, 64), labels=[str(i) for i in range(10)])
    image = cw.sample_image("cat")
    before = snapshot(net)

    @register("test_blind", kind="other", help="the image's brightness: ignores the network")
    def blind(ctx):
        return ctx.x[0].mean(0)

    try:
        result = cw.metrics.sanity_check(model, image, "test_blind", target=3, stages=3)
    finally:
        unregister("test_blind")
    np.testing.assert_allclose(result.similarity, 1.0)  # the map never changes: no explanation
    assert result.stages[0] == "fc" and result.stages[-1] == "conv1"  # classifier first, then all
    assert len(result.maps) == 4
    assert_same_state(net, before)  # the user's network is never touched
    assert hook_count(net) == 0


def test_sanity_check_finds_guided_backprop_blind_to_the_classifier(lite0, cat):
    # Adebayo et al.'s finding, on the pretrained network: re-initialising the classifier
    # changes the saliency map but leaves guided backprop's as it was
    before = snapshot(lite0.module)
    guided = cw.metrics.sanity_check(lite0, cat, "guided_backprop", stages=3, progress=False)
    plain = cw.metrics.sanity_check(lite0, cat, "saliency", stages=3, progress=False)
    assert guided.stages[0] == plain.stages[0] == "_fc"
    assert guided.similarity[0] > 0.9
    assert plain.similarity[0] < 0.6
    assert plain.similarity[-1] < 0.3 and guided.similarity[-1] < 0.5  # all weights random
    assert_same_state(lite0.module, before)
    fig = guided.plot()
    assert len(fig.axes) == 4
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_curve_plot(linear):
    import matplotlib.pyplot as plt

    c = cw.metrics.deletion(linear, ramp(), np.zeros((8, 8)), steps=4)
    ax = c.plot()
    assert len(ax.figure.axes) == 6  # the curve and five perturbed images
    assert np.allclose(ax.lines[0].get_ydata(), c.scores)
    plt.close(ax.figure)
