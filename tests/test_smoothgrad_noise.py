"""SmoothGrad's noise scale: σ = noise · (max − min) of the network's input (ALGORITHMS.md,
Smilkov et al. 2017, as Captum's NoiseTunnel is usually called), checked through the mean of
the gradient on a network whose gradient is known.

The network (``Cube``): an identity 1×1 convolution, then class 0 = Σ z³/3 and class 1 = 0.
The gradient of class 0 is x² at every input value, so SmoothGrad's mean over noisy copies
x + σε (ε ~ N(0, 1)) has the expectation

    E[(x + σε)²] = x² + σ²,

and the mean over all pixels of ``raw − x²`` estimates σ² alone. Each of its terms
2xσε + σ²(ε² − 1) has variance 4x²σ² + 2σ⁴, so over n samples of P values its standard
error is at most √((4·max x²·σ² + 2σ⁴) / (n·P)); the tests allow five of those
(0.029 for the full-range image, σ = 0.4; 0.007 for the half-range one, σ = 0.2), while an
unscaled σ (0.1 in both) gives σ² = 0.01 instead of 0.16 and 0.04.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw

MEAN, STD = 0.5, 0.25  # network input = (pixel − 0.5) / 0.25: black → −2, white → +2
N = 400


class Cube(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x):
        z = self.conv(x)
        y0 = (z ** 3).sum(dim=(1, 2, 3)) / 3
        return torch.stack([y0, torch.zeros_like(y0)], 1)


def cube_model():
    return cw.Model(Cube(), input_size=(8, 8), mean=(MEAN,) * 3, std=(STD,) * 3, crop=1.0,
                    labels=["cube", "zero"])


def ramp(low: int, high: int) -> np.ndarray:
    """8×8×3 uint8 image whose 192 values run evenly from ``low`` to ``high`` (both present)."""
    return np.linspace(low, high, 192).round().astype(np.uint8).reshape(8, 8, 3)


def x_of(model, image) -> np.ndarray:
    return model.prepare(image)[0][0].numpy().astype(np.float64)


@pytest.mark.parametrize("low, high", [(0, 255), (64, 191)])
def test_smoothgrad_noise_is_a_fraction_of_the_input_range(low, high):
    model = cube_model()
    image = ramp(low, high)
    x = x_of(model, image)
    # network input range: (high − low) / 255 / 0.25 — 4 for the full ramp, 1.99 for the half
    span = (high - low) / 255 / STD
    assert x.max() - x.min() == pytest.approx(span, rel=1e-5)
    sigma = 0.1 * span  # noise = 0.1
    a = cw.attribute(model, image, "smoothgrad", target=0, n_samples=N, noise=0.1,
                     batch_size=100, seed=0)
    assert a.raw.shape == (3, 8, 8)
    offset = float((a.raw - x ** 2).mean())
    bound = np.sqrt((4 * (x ** 2).max() * sigma ** 2 + 2 * sigma ** 4) / (N * x.size))
    assert abs(offset - sigma ** 2) < 5 * bound


def test_smoothgrad_without_noise_is_the_gradient():
    model = cube_model()
    image = ramp(0, 255)
    a = cw.attribute(model, image, "smoothgrad", target=0, n_samples=2, noise=0.0)
    np.testing.assert_allclose(a.raw, x_of(model, image) ** 2, rtol=1e-5, atol=1e-6)


def test_smoothgrad_agrees_with_captum_noise_tunnel():
    """Captum's NoiseTunnel takes an absolute σ (``stdevs``); given 0.15 · (max − min), as the
    benchmark passes it, both estimate x² + σ² on this network. Their noise differs (different
    generators), so the comparison is of the pixel means: each has a standard error below
    0.01 at σ = 0.6 (variance per term ≤ 4·4·0.36 + 2·0.13 ≈ 6.0 over 76,800 terms), the two
    must agree within 0.05, and an unscaled σ on our side (0.15: σ² = 0.0225 instead of 0.36)
    would be off by 0.34."""
    captum = pytest.importorskip("captum.attr")
    model = cube_model()
    image = ramp(0, 255)
    x = model.prepare(image)[0]
    sigma = 0.15 * float(x.max() - x.min())
    assert sigma == pytest.approx(0.6, rel=1e-5)
    torch.manual_seed(0)
    theirs = captum.NoiseTunnel(captum.Saliency(model.module)).attribute(
        x.clone(), nt_type="smoothgrad", nt_samples=N, stdevs=sigma, target=0, abs=False)
    theirs = theirs[0].detach().numpy().astype(np.float64)
    ours = cw.attribute(model, image, "smoothgrad", target=0, n_samples=N, batch_size=100).raw
    x2 = x[0].numpy().astype(np.float64) ** 2
    assert float((theirs - x2).mean()) == pytest.approx(sigma ** 2, abs=0.05)
    assert float(ours.mean()) == pytest.approx(float(theirs.mean()), abs=0.05)
