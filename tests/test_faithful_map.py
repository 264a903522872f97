"""The engine's map is the method's own heat (scaled, never clipped); metrics rank and take
maxima on it; the percentile clipping of pixel-level maps is the render layer's display choice.

The model here is linear, so its input gradient is its weight and every expected value below is
read off the weights: logit 0 = Σ W[0, i, j]·x[0, i, j] (channels 1 and 2 carry no weight).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.render.attribution import FINE_PERCENTILE, draw_attribution, shown_heat

SIZE = 16  # 256 pixels: the old 99.5th-percentile clip tied the two hottest at 1.0


class Linear(nn.Module):
    def __init__(self, w0: np.ndarray):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, groups=3, bias=False)  # the identity: a CNN is wrapped
        self.fc = nn.Linear(3 * SIZE * SIZE, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.zero_()
            self.fc.weight[0, : SIZE * SIZE] = torch.as_tensor(w0, dtype=torch.float32).reshape(-1)
            self.fc.weight[1] = 0.01

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def linear_model(w0) -> cw.Model:
    return cw.Model(Linear(w0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop=1.0,
                    input_size=(SIZE, SIZE), labels=["zero", "one"])


def weights_hottest_at(row: int, col: int, seed: int = 0) -> np.ndarray:
    """Distinct positive weights in (0, 1) with the largest, 2.0, at (row, col) and the second
    largest, 1.9, at the top-left pixel (first in raster order)."""
    w = np.random.default_rng(seed).permutation(SIZE * SIZE).reshape(SIZE, SIZE) + 1.0
    w = w / (SIZE * SIZE + 1)
    w[0, 0] = 1.9
    w[row, col] = 2.0
    return w


WHITE = np.ones((SIZE, SIZE, 3), dtype=np.float32)


@pytest.mark.parametrize("row, col", [(15, 15), (9, 4), (0, 7), (12, 0)])
def test_pointing_game_reports_the_single_hottest_pixel(row, col):
    model = linear_model(weights_hottest_at(row, col))
    a = cw.attribute(model, WHITE, "saliency", target=0)
    assert a.fine
    # saliency = |∂logit0/∂x| = |W|, largest over channels = W[0]: one maximum, at (row, col)
    assert np.count_nonzero(a.map == a.map.max()) == 1
    assert a.map.max() == 1.0
    np.testing.assert_allclose(a.map, weights_hottest_at(row, col) / 2.0, rtol=1e-6)
    result = cw.metrics.pointing_game(a, (col, row, col + 1, row + 1), tolerance=0)
    assert result.point == (row, col) and result.hit


def test_pixel_level_pointing_game_equals_the_raw_maximum_on_the_cat(lite0, cat):
    a = cw.attribute(lite0, cat, "saliency")
    by_hand = np.unravel_index(int(np.argmax(np.abs(a.raw).max(0))), a.raw.shape[1:])
    r, c = (int(v) for v in by_hand)
    box = (c, r, c + 1, r + 1)  # a one-pixel object at the raw gradient's maximum
    result = cw.metrics.pointing_game(a, box, tolerance=0)
    assert result.point == (r, c) and result.hit


def test_deletion_removes_pixels_in_the_order_of_the_methods_heat():
    w0 = weights_hottest_at(15, 15, seed=1)
    model = linear_model(w0)
    a = cw.attribute(model, WHITE, "saliency", target=0)
    n = SIZE * SIZE
    curve = cw.metrics.deletion(model, WHITE, a, target=0, steps=n, baseline="zeros",
                                score="logit", batch_size=64, progress=False)
    # on a white image (x = 1), deleting pixel p lowers logit 0 by W[0, p]: after k steps the
    # logit is the total minus the k largest weights, taken in the order of |W| (= the heat)
    removed = np.concatenate([[0.0], np.cumsum(np.sort(w0.ravel())[::-1])])
    np.testing.assert_allclose(curve.scores, w0.sum() - removed, rtol=1e-5, atol=1e-5)


def test_render_clips_a_pixel_level_map_for_display_only():
    w0 = weights_hottest_at(15, 15)
    model = linear_model(w0)
    a = cw.attribute(model, WHITE, "saliency", target=0)
    before = a.map.copy()
    shown = shown_heat(a.map, fine=True)
    # the display copy: divided by the 99.5th percentile of the magnitude (the k-th smallest,
    # k = ⌈0.995·n⌉), clipped — the two hottest pixels tie at 1 there, and only there
    flat = np.sort(np.abs(a.map).ravel())
    scale = flat[math.ceil(FINE_PERCENTILE / 100 * flat.size) - 1]
    np.testing.assert_allclose(shown, np.clip(a.map / scale, -1, 1), rtol=1e-6)
    assert np.count_nonzero(shown == 1.0) == 2
    np.testing.assert_array_equal(shown_heat(a.map, fine=False), a.map)

    from matplotlib.figure import Figure

    ax = Figure().subplots()
    artists = draw_attribution(ax, a.map, a.image, fine=True)
    np.testing.assert_allclose(np.asarray(artists["overlay"].get_array()), shown, rtol=1e-6)
    np.testing.assert_array_equal(a.map, before)  # drawing never changes the engine's numbers
    a.plot(ax=Figure().subplots())
    np.testing.assert_array_equal(a.map, before)
