"""Feature visualisation, inversion and DeconvNet projection on tiny fixed-weight models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.engine.optvis import (FFTParam, PixelParam, color_matrix, decorrelate, invert_steps,
                                      optimize)
from cnnwidgets.engine.optvis import objectives as O


class Tiny(nn.Module):
    """conv 3→6 (3×3) → ReLU → conv 6→4 (3×3, stride 2) → ReLU6 → GAP → linear 4→3."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        x = self.act(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def tiny_model(size=16):
    return cw.Model(Tiny(), input_size=(size, size), labels=["ant", "bee", "cow"], crop=1.0,
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tiny")


def smooth_image(size=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (xx * a + yy * b) + c)
                    for a, b, c in rng.uniform(0.2, 1.0, (3, 3))], -1)
    return (img * 255).round().astype(np.uint8)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- parameterisations
def test_fft_param_round_trips():
    g = torch.Generator().manual_seed(1)
    p = FFTParam(batch=2, size=(12, 10), generator=g)
    img = torch.randn(2, 3, 12, 10, generator=g)
    p.set_raw(img)
    assert torch.allclose(p.raw(), img, atol=1e-5)


def test_fft_scale_is_one_over_frequency():
    p = FFTParam(size=(8, 8))
    # rfft2 frequencies of an 8×8 image: (fy, fx) = (0, 1/8) has |f| = 1/8 → scale 8;
    # (1/8, 1/8) → |f| = √2/8 → scale 8/√2; DC is clamped to 1/max(h, w) → scale 8.
    assert p.scale[0, 1].item() == pytest.approx(8.0)
    assert p.scale[1, 1].item() == pytest.approx(8 / 2 ** 0.5)
    assert p.scale[0, 0].item() == pytest.approx(8.0)
    assert p.scale[4, 4].item() == pytest.approx(1 / (0.5 * 2 ** 0.5))


def test_decorrelation_matrix_as_specified():
    m = color_matrix()
    # column norms of Lucid's sqrt matrix: |(.26,.27,.27)| = √.2134 = .46195 (the largest),
    # |(.09,0,-.09)| = .12728, |(.02,-.05,.03)| = .06164 → M = sqrt / .46195
    assert m[0, 0].item() == pytest.approx(0.26 / 0.461952, rel=1e-4)
    assert m[2, 1].item() == pytest.approx(-0.09 / 0.461952, rel=1e-4)
    assert m.norm(dim=0).max().item() == pytest.approx(1.0)
    # a pixel (1, 0, 0) becomes the first column; (0, 1, 0) the second
    t = torch.zeros(1, 3, 1, 2)
    t[0, 0, 0, 0] = 1.0
    t[0, 1, 0, 1] = 1.0
    out = decorrelate(t)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.26, 0.27, 0.27]) / 0.461952, atol=1e-5)
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([0.09, 0.0, -0.09]) / 0.461952, atol=1e-5)
    # the parameterisation's output is sigmoid(M · raw)
    p = PixelParam(size=(1, 2), decorrelated=True)
    with torch.no_grad():
        p.pixels.copy_(t)
    assert torch.allclose(p()[0, :, 0, 0], torch.sigmoid(out[0, :, 0, 0]), atol=1e-6)
    p.decorrelated = False
    assert torch.allclose(p()[0, :, 0, 0], torch.sigmoid(t[0, :, 0, 0]), atol=1e-6)


# ---------------------------------------------------------------- objectives
OBJECTIVES = {
    "channel": (lambda: O.channel("conv2", 1), 1),
    "neuron": (lambda: O.neuron("conv2", 2), 1),
    "direction": (lambda: O.direction("conv1", [1.0, -1.0, 0.5, 0.0, 0.0, 1.0]), 1),
    "class_logit": (lambda: O.class_logit("bee"), 1),
    "diversity": (lambda: O.diversity("conv1"), 3),
    "composite": (lambda: O.channel("conv1", 0) + 0.5 * O.class_logit(2) - O.neuron("conv2", 0) * 0.1, 1),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_loss_goes_down(name):
    model = tiny_model()
    make, batch = OBJECTIVES[name]
    steps = list(optimize(model, make(), steps=12, size=16, batch=batch, param="pixel",
                          transforms=False, lr=0.1, seed=0))
    history = steps[-1].history
    assert len(history) == 12
    assert history[-1] < history[0] - 1e-3, history


def test_objective_algebra():
    acts = {"l": torch.arange(8.0).view(1, 2, 2, 2), O.LOGITS: torch.tensor([[1.0, 5.0, 2.0]])}
    a = O.channel("l", 1)  # −mean(4, 5, 6, 7) = −5.5
    b = O.class_logit(1)  # −5
    assert a(acts).item() == pytest.approx(-5.5)
    assert (a + 0.5 * b)(acts).item() == pytest.approx(-8.0)
    assert (2 * a - b)(acts).item() == pytest.approx(-6.0)
    assert (a / 2)(acts).item() == pytest.approx(-2.75)
    assert sum([a, b])(acts).item() == pytest.approx(-10.5)
    assert set((a + b).layers) == {"l", O.LOGITS}
    # neuron: centre of the 2×2 map is (1, 1) → channel 0 value 3
    assert O.neuron("l", 0)(acts).item() == pytest.approx(-3.0)
    # direction (1, 0) vs vectors (0,4), (1,5), (2,6), (3,7): cosines 0, 1/√26, 2/√40, 3/√58
    cos = np.mean([0, 1 / 26 ** 0.5, 2 / 40 ** 0.5, 3 / 58 ** 0.5])
    assert O.direction("l", [1.0, 0.0])(acts).item() == pytest.approx(-cos, rel=1e-5)


def test_diversity_hand_worked():
    # two images, one channel: Gram matrices are 1×1 (positive) → cosine 1 between them:
    # Σ_{i≠j} cos / N = 2 / 2 = 1. Orthogonal 2-channel Grams → 0.
    acts = {"l": torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])}
    assert O.diversity("l")(acts).item() == pytest.approx(1.0)
    a = torch.zeros(2, 2, 1, 2)
    a[0, 0] = 1.0  # Gram [[2, 0], [0, 0]]
    a[1, 1] = 1.0  # Gram [[0, 0], [0, 2]]
    assert O.diversity("l")({"l": a}).item() == pytest.approx(0.0)


def test_parse_specs():
    model = tiny_model()
    assert O.parse("conv2:3", model).layers == ("conv2",)
    assert O.parse(2, model).layers == (O.LOGITS,)
    assert O.parse("bee", model).layers == (O.LOGITS,)
    with pytest.raises(ValueError, match="channel number"):
        O.parse("conv2:x", model)
    with pytest.raises(ValueError, match="add a channel"):
        O.parse("conv2", model)
    with pytest.raises(ValueError, match="no class label"):
        cw.visualize(model, "zebra", steps=1, size=16, progress=False)
    with pytest.raises(cw.LayerNotFoundError):
        cw.visualize(model, "conv9:0", steps=1, size=16, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        cw.visualize(model, "conv2:7", steps=1, size=16, progress=False)


# ---------------------------------------------------------------- visualize
def test_visualize_result_and_seed():
    model = tiny_model()
    a = cw.visualize(model, "conv2:1", steps=6, size=20, seed=3, progress=False)
    b = cw.visualize(model, "conv2:1", steps=6, size=20, seed=3, progress=False)
    c = cw.visualize(model, "conv2:1", steps=6, size=20, seed=4, progress=False)
    assert isinstance(a, cw.Visualization)
    assert a.image.shape == (20, 20, 3) and a.image.dtype == np.float32
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert len(a.history) == 6
    np.testing.assert_array_equal(a.image, b.image)
    assert a.history == b.history
    assert not np.array_equal(a.image, c.image)
    grid = cw.visualize(model, sum(O.channel("conv2", i, batch=i) for i in range(3)), steps=2,
                        size=16, batch=3, progress=False)
    assert grid.images.shape == (3, 16, 16, 3)


# ---------------------------------------------------------------- inversion
def test_invert_first_layer_reconstructs_input():
    model = tiny_model()
    image = smooth_image()
    target = model.prepare(image)[1]
    res = cw.invert(model, image, "conv1", steps=150, lambda_tv=0.0, lambda_alpha=1e-4,
                    progress=False)
    assert res.image.shape == target.shape
    err = np.abs(res.image - target).mean()
    start = np.abs(0.5 - target).mean()
    assert err < 0.02, (err, start)
    assert res.history[-1] < 0.01 * res.history[0]


def test_invert_seed_and_tv_depth():
    model = tiny_model()
    a = cw.invert(model, smooth_image(), "conv2", steps=5, seed=1, progress=False)
    b = cw.invert(model, smooth_image(), "conv2", steps=5, seed=1, progress=False)
    np.testing.assert_array_equal(a.image, b.image)
    from cnnwidgets.engine.optvis.core import tv_weight

    assert tv_weight(model, "conv2") > tv_weight(model, "conv1")


# ---------------------------------------------------------------- DeconvNet
class DeconvTiny(nn.Module):
    """1×1 conv 3→1 with weights (1, 1, 1) → ReLU → 2×2 conv 1→2 (no bias) → GAP head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(1, 2, 2, bias=False)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv2.weight.copy_(torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]],
                                                  [[[-1.0, 1.0], [1.0, -1.0]]]]))

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))).mean((2, 3))


def test_deconv_matches_hand_worked_projection():
    model = cw.Model(DeconvTiny(), input_size=(8, 8), crop=1.0, mean=(0, 0, 0), std=(1, 1, 1),
                     labels=["a", "b"])
    # an 8×8 grey image (the smallest cw.load_image takes), zero except its top-left 3×3:
    # grey levels (0, 51, 102, 153, 204, 255) / 255 = 0, .2, .4, .6, .8, 1.0, same in R, G, B.
    # conv1 sums the 3 channels → u = 3·img:
    #   img = [[.2, 0, .4],      u = [[.6, 0, 1.2],
    #          [.6, .2, 0],           [1.8, .6, 0],
    #          [1., .8, .4]]          [3.0, 2.4, 1.2]]   (ReLU keeps it: all ≥ 0)
    # conv2 channel 0, kernel [[1, −2], [3, .5]] at each 2×2 window of u:
    #   (0,0): .6 − 0 + 5.4 + .3 = 6.3      (0,1): 0 − 2.4 + 1.8 + 0 = −.6
    #   (1,0): 1.8 − 1.2 + 9.0 + 1.2 = 10.8 (1,1): .6 − 0 + 7.2 + .6 = 8.4
    # windows touching the zero border give at most (1,2): 1.2·3 = 3.6, so the strongest is
    # (1, 0) with 10.8, then 8.4, 6.3. Backward from that activation (value 10.8) through conv2
    # places 10.8·kernel on rows 1–2, cols 0–1 of u: [[10.8, −21.6], [32.4, 5.4]];
    # the DeconvNet ReLU rule zeroes the negative −21.6 (a plain gradient would keep it, since
    # u > 0 there); conv1 (weights 1) copies the result to R, G and B.
    levels = np.zeros((8, 8), dtype=np.uint8)
    levels[:3, :3] = [[51, 0, 102], [153, 51, 0], [255, 204, 102]]
    image = np.repeat(levels[..., None], 3, -1)
    proj = cw.deconv(model, image, "conv2", channel=0, top_k=3)
    expected = np.zeros((8, 8), dtype=np.float32)
    expected[1:3, 0:2] = [[10.8, 0], [32.4, 5.4]]
    np.testing.assert_allclose(proj.raw, np.repeat(expected[..., None], 3, -1), atol=1e-4)
    assert proj.position[:2] == (1, 0) and proj.position[2] == pytest.approx(10.8, abs=1e-4)
    np.testing.assert_allclose(proj.positions[:, 2], [10.8, 8.4, 6.3], atol=1e-4)
    assert proj.box == (0, 1, 2, 3)
    # shown as an image: 0.5 + raw / (2·32.4)
    assert proj.shape == (8, 8, 3)
    np.testing.assert_allclose(np.asarray(proj)[2, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(proj)[1, 0], 0.5 + 10.8 / 64.8, atol=1e-6)
    # channel=None picks the channel with the largest maximum: channel 1's kernel
    # [[−1, 1], [1, −1]] peaks at window (0, 1): 0 + 1.2 + .6 − 0 = 1.8 < 10.8 → channel 0
    assert cw.deconv(model, image, "conv2").channel == 0
    assert hook_count(model.module) == 0


# ---------------------------------------------------------------- model left alone
def _run_all(model, image):
    cw.visualize(model, "conv2:0", steps=2, size=16, progress=False)
    cw.visualize(model, "ant", steps=2, size=16, progress=False)
    cw.invert(model, image, "conv2", steps=2, progress=False)
    cw.deconv(model, image, "conv2", channel=1)


def test_model_unchanged_and_no_hooks():
    model = tiny_model()
    module = model.module
    module.train()
    module.conv1.bias.requires_grad_(False)
    before = state(module)
    _run_all(model, smooth_image())
    assert hook_count(module) == 0
    assert module.training and module.conv2.training
    assert not module.conv1.bias.requires_grad and module.conv1.weight.requires_grad
    assert all(p.grad is None for p in module.parameters())
    after = state(module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_unchanged_after_exception():
    model = tiny_model()
    module = model.module
    before = state(module)

    def boom(acts, m):
        raise RuntimeError("boom")

    bad = O.Objective(boom, ["conv2"], "boom")
    with pytest.raises(RuntimeError, match="boom"):
        cw.visualize(model, bad, steps=2, size=16, progress=False)
    with pytest.raises(ValueError):
        cw.deconv(model, smooth_image(), "conv2", channel=9)
    # a generator stopped half-way leaves nothing behind either
    gen = invert_steps(model, smooth_image(), "conv2", steps=10)
    next(gen)
    assert hook_count(module) == 0
    gen.close()
    assert hook_count(module) == 0
    assert all(p.requires_grad for p in module.parameters())
    assert all(p.grad is None for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in state(module).items())


# ---------------------------------------------------------------- efficientnet_lite0
@pytest.fixture(scope="module")
def lite0():
    return cw.load_model("efficientnet_lite0")


def test_lite0_early_channel_gives_a_pattern(lite0):
    # the stem's channels are colour / edge detectors: the optimised image drives the channel
    # far above what a grey image or the photo gives, with visible structure (not flat grey)
    v = cw.visualize(lite0, "_conv_stem:3", steps=24, size=64, progress=False)
    x = lite0.normalize(torch.from_numpy(v.image).permute(2, 0, 1)[None])
    grey = lite0.normalize(torch.full_like(x, 0.5))
    with torch.no_grad():
        stem = lite0.module._conv_stem
        act = stem(x)[0, 3].mean().item()
        act_grey = stem(grey)[0, 3].mean().item()
    assert act > act_grey + 0.5, (act, act_grey)
    assert v.image.std((0, 1)).mean() > 0.05
    assert hook_count(lite0.module) == 0


def test_lite0_deconv_shapes(lite0):
    cat = cw.sample_image("cat")
    proj = cw.deconv(lite0, cat, "_blocks.3", top_k=4)
    assert proj.shape == (224, 224, 3)
    assert proj.positions.shape == (4, 3)
    assert np.all(np.diff(proj.positions[:, 2]) <= 0)
    x0, y0, x1, y1 = proj.box
    # a mid-level unit sees a patch, not the whole image
    assert (x1 - x0) < 224 and (y1 - y0) < 224
    assert hook_count(lite0.module) == 0
