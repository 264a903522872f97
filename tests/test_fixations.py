"""CNN Fixations: one hand-worked tiny network per rule, structure tests on torchvision
architectures (random weights, small inputs), the offline EfficientNet-Lite0 on the cat, and
the no-hook / model-unchanged guarantees."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.fixations import (
    Fixations,
    UnsupportedOperationError,
    backtrack,
    fixation_attribution,
    gaussian_blur,
    outlier_mask,
)
from cnnwidgets.engine.hooks import hook_count


def _set(module: nn.Module, **weights):
    with torch.no_grad():
        for name, value in weights.items():
            getattr(module, name).copy_(torch.tensor(value, dtype=torch.float32))
    return module


def _trace(f: Fixations, name: str) -> list:
    return sorted(map(tuple, f.trace[name].tolist()))


# ----------------------------------------------------------------------------- hand-worked rules
class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = _set(nn.Linear(3, 2, bias=False), weight=[[1, 1, -1], [0, -1, 0]])
        self.fc2 = _set(nn.Linear(2, 2, bias=False), weight=[[1, 1], [-1, 1]])

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_linear_keeps_positive_contributions():
    # x = [1, -2, 3]; h = fc1(x) = [1 - 2 - 3, 0 + 2 + 0] = [-4, 2]
    x = torch.tensor([[1.0, -2.0, 3.0]])
    net = TwoLinear()
    # class 0: contributions h * [1, 1] = [-4, 2] -> keep hidden {1};
    # hidden 1: x * [0, -1, 0] = [0, 2, 0] -> keep input {1}
    f = backtrack(net, x, 0)
    assert list(f.trace) == ["fc2", "fc1", "input"]
    assert _trace(f, "fc2") == [(0, 0, 0)]
    assert _trace(f, "fc1") == [(1, 0, 0)]
    assert _trace(f, "input") == [(1, 0, 0)]
    # class 1: contributions h * [-1, 1] = [4, 2] -> keep hidden {0, 1};
    # hidden 0: x * [1, 1, -1] = [1, -2, -3] -> {0}; hidden 1 -> {1}; union {0, 1}
    f = backtrack(net, x, 1)
    assert _trace(f, "fc1") == [(0, 0, 0), (1, 0, 0)]
    assert _trace(f, "input") == [(0, 0, 0), (1, 0, 0)]


class FlatLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = _set(nn.Linear(8, 1, bias=False), weight=[[1, 1, 1, -1, 0, 1, 0, 2]])

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def test_linear_on_flattened_map_takes_argmax():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 5.0], [0.0, 2.0]]]])
    # contributions x.flatten() * w = [1, 2, 3, -4, 0, 5, 0, 4] -> argmax 5 = (c=1, h=0, w=1)
    # (the positive-contribution rule would keep six inputs instead)
    f = backtrack(FlatLinear(), x, 0)
    assert _trace(f, "input") == [(1, 0, 1)]
    assert f.all_points.tolist() == [[0, 1]]


class Gap(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = _set(nn.Linear(2, 1, bias=False), weight=[[1, 1]])

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def test_global_average_pool_is_vector_then_argmax_of_map():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]], [[-1.0, -1.0], [-1.0, -5.0]]]])
    # pooled = [1.5, -2]; contributions [1.5, -2] -> keep channel 0 only (vector rule);
    # channel 0's map argmax is 3 at (1, 0)
    f = backtrack(Gap(), x, 0)
    assert _trace(f, "pool") == [(0, 0, 0)]
    assert _trace(f, "input") == [(0, 1, 0)]


class StridedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _set(nn.Conv2d(2, 1, 3, stride=2, padding=1, bias=False),
                         weight=np.ones((1, 2, 3, 3)))
        self.fc = _set(nn.Linear(4, 1, bias=False), weight=[[0, 1, 0, 0]])

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _strided_input():
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 1, 3] = 2.0  # channel 0 inside window of output (0, 1): sum 2
    x[0, 1, 0, 1] = 1.0  # channel 1: 1 + 1.5 = 2.5 -> channel 1 wins
    x[0, 1, 1, 2] = 1.5
    x[0, 0, 3, 0] = 9.0  # outside that window: must not matter
    return x


@pytest.mark.parametrize("position, expected", [("centre", (1, 0, 2)), ("argmax", (1, 1, 2)),
                                                ("auto", (1, 1, 2))])
def test_conv_with_stride_and_padding(position, expected):
    # conv output (0, 1) = 2 + 2.5 = 4.5 (other outputs are multiplied by 0 in fc, so the
    # flattened-map argmax picks index 1 = (0, 0, 1)).
    # window of output (0, 1): rows 2*0 - 1 + {0,1,2} = {-1 (padding), 0, 1},
    #                          cols 2*1 - 1 + {0,1,2} = {1, 2, 3}
    # per-channel window sums: ch0 = 2, ch1 = 1 + 1.5 = 2.5 -> channel 1
    # centre = (2*0 - 1 + 1, 2*1 - 1 + 1) = (0, 2); argmax of ch1's contribution: (1, 2)
    # "auto" uses the argmax for this stride-2 convolution.
    f = backtrack(StridedConv(), _strided_input(), 0, position=position)
    assert _trace(f, "conv") == [(0, 0, 1)]
    assert _trace(f, "input") == [expected]


class PaddedCorner(nn.Module):
    """3×3 convolution of ones, padding 1, 2 → 1 channels; the class reads its output (0, 0)."""

    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv = _set(nn.Conv2d(2, 1, 3, padding=1, bias=False, padding_mode=padding_mode),
                         weight=np.ones((1, 2, 3, 3)))
        self.fc = _set(nn.Linear(9, 1, bias=False), weight=[[1, 0, 0, 0, 0, 0, 0, 0, 0]])

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _corner_input():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 0, 0] = 1.0  # channel 0: the corner pixel, beside the padding on two sides
    x[0, 1, 1, 1] = 1.5  # channel 1: inside the window, away from the padding
    return x


@pytest.mark.parametrize("position", ["centre", "argmax"])
def test_conv_padding_counts_as_zero(position):
    # output (0, 0): window rows and cols {−1, 0, 1}; five of its nine taps are padding.
    # Zero padding: channel 0 sums to 1 (the corner, once), channel 1 to 1.5 → channel 1.
    # Were the padded taps read from the nearest pixel (clamped / replicated), the corner
    # would also fill (−1, −1), (−1, 0) and (0, −1): 4 > 1.5 → channel 0.
    # centre of the window: (0, 0); channel 1's largest contribution: (1, 1).
    f = backtrack(PaddedCorner(), _corner_input(), 0, position=position)
    assert _trace(f, "conv") == [(0, 0, 0)]
    assert _trace(f, "input") == [(1, 0, 0) if position == "centre" else (1, 1, 1)]


def test_conv_with_replicate_padding_reads_the_replicated_border():
    # padding_mode="replicate" makes the forward pass itself read the corner four times: the
    # rule follows the forward pass, channel 0 (4 > 1.5) wins; the centre is (0, 0)
    net = PaddedCorner("replicate")
    with torch.no_grad():
        assert net.conv(_corner_input())[0, 0, 0, 0].item() == pytest.approx(5.5)
    f = backtrack(net, _corner_input(), 0, position="centre")
    assert _trace(f, "input") == [(0, 0, 0)]


class StaticSameCorner(nn.Module):
    """EfficientNet's TensorFlow-style "same" convolution: 3×3 of ones, stride 2, on a 4×4
    input; its ``static_padding`` pads one row below and one column right, (0, 1, 0, 1).
    The class reads output (1, 1)."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

        self.conv = Conv2dStaticSamePadding(2, 1, 3, stride=2, image_size=4, bias=False)
        assert tuple(self.conv.static_padding.padding) == (0, 1, 0, 1)
        _set(self.conv, weight=np.ones((1, 2, 3, 3)))
        self.fc = _set(nn.Linear(4, 1, bias=False), weight=[[0, 0, 0, 1]])

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("position", ["centre", "argmax"])
def test_static_same_padding_counts_as_zero(position):
    # output (1, 1): window rows and cols {2, 3, 4}; row 4 and column 4 are the padding.
    # channel 0: the corner (3, 3), beside the padding, sums to 1 once; channel 1: 1.5 at
    # (2, 2) → channel 1. Padding read as the nearest pixel would count the corner at
    # (3, 4), (4, 3) and (4, 4) too: 4 > 1.5 → channel 0.
    # centre: (2·1 − 0 + 1, same) = (3, 3); channel 1's largest contribution: (2, 2).
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 3, 3] = 1.0
    x[0, 1, 2, 2] = 1.5
    f = backtrack(StaticSameCorner(), x, 0, position=position)
    assert _trace(f, "conv") == [(0, 1, 1)]
    assert _trace(f, "input") == [(1, 3, 3) if position == "centre" else (1, 2, 2)]


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _set(nn.Conv2d(4, 2, 3, groups=2, bias=False), weight=np.ones((2, 2, 3, 3)))
        self.fc = _set(nn.Linear(2, 1, bias=False), weight=[[0, 1]])

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_grouped_conv_scores_only_the_group_channels():
    x = torch.zeros(1, 4, 3, 3)
    x[0, 0] = 100.0  # group 0: would win if all channels were compared
    x[0, 2, 0, 0] = 1.0  # group 1: channel 2 sums to 1
    x[0, 3, 2, 2] = 2.0  # channel 3 sums to 2 -> wins
    # conv out = [900 + 0, 1 + 2] ; fc contributions [0, 3] -> keep output channel 1 (group 1)
    # group 1 = input channels {2, 3}; argmax channel 3; centre of the 3x3 window = (1, 1)
    f = backtrack(GroupedConv(), x, 0, position="centre")
    assert _trace(f, "conv") == [(1, 0, 0)]
    assert _trace(f, "input") == [(3, 1, 1)]
    # argmax position of channel 3's contribution inside the window: (2, 2)
    f = backtrack(GroupedConv(), x, 0, position="argmax")
    assert _trace(f, "input") == [(3, 2, 2)]


class Pool(nn.Module):
    def __init__(self, pool, n, w):
        super().__init__()
        self.pool = pool
        self.fc = _set(nn.Linear(n, 1, bias=False), weight=[w])

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


def test_max_pool_moves_to_window_argmax():
    x = torch.arange(16.0).view(1, 1, 4, 4).neg()
    x[0, 0, 3, 2] = 9.0
    # 2x2/2 pool; fc picks output (1, 1) whose window is rows 2-3, cols 2-3 -> max 9 at (3, 2)
    f = backtrack(Pool(nn.MaxPool2d(2, 2), 4, [0, 0, 0, 1]), x, 0)
    assert _trace(f, "pool") == [(0, 1, 1)]
    assert _trace(f, "input") == [(0, 3, 2)]


def test_max_pool_ceil_mode_partial_window():
    x = torch.ones(1, 1, 5, 5)
    x[0, 0, 4, 4] = -1.0
    # ceil_mode gives a 3x3 output; output (2, 2) covers rows 4-5, cols 4-5 of which only (4, 4)
    # exists. fc weight -1 on it: contribution (-1)(-1) = 1 > 0 = the other contributions.
    w = [0] * 8 + [-1]
    f = backtrack(Pool(nn.MaxPool2d(2, 2, ceil_mode=True), 9, w), x, 0)
    assert _trace(f, "pool") == [(0, 2, 2)]
    assert _trace(f, "input") == [(0, 4, 4)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[2.0]]]])
        self.b = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[-1.0]]]])
        self.fc = _set(nn.Linear(4, 2, bias=False), weight=[[1, -1, 0, 0], [1, 0, 0, 0]])

    def forward(self, x):
        return self.fc((self.a(x) + self.b(x)).flatten(1))


def test_residual_add_follows_larger_summand():
    x = torch.tensor([[[[1.0, -3.0], [0.0, 0.0]]]])
    # a = 2x = [[2, -6], [0, 0]], b = -x = [[-1, 3], [0, 0]], sum = [[1, -3], [0, 0]]
    # class 0: contributions [1, 3, 0, 0] -> point (0, 0, 1); a = -6 < b = 3 -> branch b
    f = backtrack(Residual(), x, 0)
    assert "a" not in f.trace and _trace(f, "b") == [(0, 0, 1)]
    assert _trace(f, "input") == [(0, 0, 1)]
    # class 1: contributions [1, 0, 0, 0] -> point (0, 0, 0); a = 2 > b = -1 -> branch a
    f = backtrack(Residual(), x, 1)
    assert "b" not in f.trace and _trace(f, "a") == [(0, 0, 0)]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = _set(nn.Conv2d(1, 2, 1, bias=False), weight=[[[[1.0]]], [[[2.0]]]])
        self.q = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[3.0]]]])
        w = np.zeros((2, 12))
        w[0, 2 * 4 + 1 * 2 + 1] = 1.0  # class 0: channel 2 (= q's channel 0) at (1, 1)
        w[1, 1 * 4 + 0 * 2 + 0] = 1.0  # class 1: channel 1 (= p's channel 1) at (0, 0)
        self.fc = _set(nn.Linear(12, 2, bias=False), weight=w)

    def forward(self, x):
        return self.fc(torch.cat([self.p(x), self.q(x)], 1).flatten(1))


def test_concat_channel_selects_branch():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # all positive: the picked contribution wins
    f = backtrack(Concat(), x, 0)
    assert "p" not in f.trace and _trace(f, "q") == [(0, 1, 1)]
    assert _trace(f, "input") == [(0, 1, 1)]
    f = backtrack(Concat(), x, 1)
    assert "q" not in f.trace and _trace(f, "p") == [(1, 0, 0)]
    assert _trace(f, "input") == [(0, 0, 0)]


class Gated(nn.Module):
    """Squeeze-excitation: the point passes through the gate to the gated map."""

    def __init__(self):
        super().__init__()
        self.conv = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[1.0]]]])
        self.se = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[1.0]]]])
        self.fc = _set(nn.Linear(4, 1, bias=False), weight=[[0, 0, 1, 0]])

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.se(nn.functional.adaptive_avg_pool2d(y, 1)))
        return self.fc((gate * y).flatten(1))


def test_squeeze_excitation_gate_passes_point_through():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f = backtrack(Gated(), x, 0)
    assert _trace(f, "conv") == [(0, 1, 0)]
    assert "se" not in f.trace
    assert _trace(f, "input") == [(0, 1, 0)]


def test_unsupported_operation_is_named():
    class Sine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.sin(self.conv(x)).flatten(1))

    with pytest.raises(UnsupportedOperationError, match="sin"):
        backtrack(Sine(), torch.ones(1, 1, 2, 2), 0)


# ----------------------------------------------------------------------------- points to heatmap
def test_outlier_removal_by_hand():
    # 10x10 image: diagonal 14.14, radius 1.414. 21 points: 20 in a 2x10 block, 1 far away.
    block = [(r, c) for r in range(2) for c in range(10)]
    pts = np.array(block + [(9, 9)])
    keep = outlier_mask(pts, (10, 10))
    # block points have >= 2 neighbours (incl. themselves) within 1.414 > 5% of 21 = 1.05;
    # the lone point has only itself (1, not > 1.05)
    assert keep[:-1].all() and not keep[-1]


def test_heatmap_box_and_mask():
    f = Fixations(all_points=np.array([[10, 20], [30, 40], [60, 5]]),
                  keep=np.array([True, True, False]), trace={}, shapes={}, target=0,
                  label="x", image_size=(64, 64))
    assert f.points.tolist() == [[10, 20], [30, 40]]
    assert f.box() == (20, 10, 40, 30)  # (x0, y0, x1, y1) from (row, col) points
    assert f.with_outlier_removal(False).box() == (5, 10, 40, 60)
    h = f.heatmap(sigma=3)
    assert h.shape == (64, 64) and h.dtype == np.float32
    assert h.max() == pytest.approx(1.0)
    assert h[10, 20] == pytest.approx(1.0) and h[60, 5] < 1e-6  # outlier not blurred in
    # default sigma: 20 px at 224 px, scaled: 64 px -> 20 * 64 / 224
    assert f.default_sigma() == pytest.approx(20 * 64 / 224)


def test_gaussian_blur_keeps_mass_and_peak():
    img = np.zeros((41, 41))
    img[20, 20] = 1.0
    out = gaussian_blur(img, 2.0)
    assert out.sum() == pytest.approx(1.0, abs=1e-9)
    assert out[20, 20] == pytest.approx(1 / (2 * np.pi * 4), rel=0.02)  # 2-D Gaussian peak
    assert out[20, 22] == pytest.approx(out[20, 20] * np.exp(-0.5), rel=1e-6)


# ----------------------------------------------------------------------------- architectures
ARCHS = [
    ("alexnet", 64), ("vgg16", 64), ("resnet18", 64), ("resnet50", 64), ("densenet121", 64),
    ("googlenet", 64), ("mobilenet_v2", 64), ("mobilenet_v3_small", 64),
    ("mobilenet_v3_large", 64), ("efficientnet_b0", 64),  # stochastic depth in every block
    ("convnext_tiny", 64), ("shufflenet_v2_x0_5", 64),  # channels-last blocks; chunk + shuffle
]


def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [m.training for m in module.modules()],
            [p.requires_grad for p in module.parameters()])


def _assert_unchanged(module, snap):
    state, training, requires = snap
    now = module.state_dict()
    assert all(torch.equal(state[k], now[k]) for k in state)
    assert [m.training for m in module.modules()] == training
    assert [p.requires_grad for p in module.parameters()] == requires


def _check_structure(model, image):
    module = model.module
    module.train()  # fixations must run in eval mode and put the flag back
    first = next(module.parameters())
    first.requires_grad_(False)
    hooks = hook_count(module)
    snap = _snapshot(module)
    f = cw.fixations(model, image)
    _assert_unchanged(module, snap)
    assert hook_count(module) == hooks
    h, w = model.input_size
    assert f.image_size == (h, w)
    assert len(f.all_points) > 0
    assert ((f.all_points >= 0) & (f.all_points < [h, w])).all()
    names = list(f.trace)
    assert names[-1] == "input" and f.shapes["input"] == (3, h, w)
    assert f.trace[names[0]].tolist() == [[f.target, 0, 0]]  # the class neuron first
    # output -> input: the traced layers come in reverse order of the forward pass
    forward = model.layers("all")  # forward (hook) order of the modules
    position = [forward.index(n) for n in names if n in forward]
    assert len(position) >= 0.8 * len(names) - 2
    assert position == sorted(position, reverse=True) and len(set(position)) == len(position)
    assert f.shapes[names[-2]][1:] != (1, 1)  # the layer before the input is a map
    for n, pts in f.trace.items():  # every traced point lies on its layer's grid
        c, hh, ww = f.shapes[n]
        assert ((pts >= 0) & (pts < [c, hh, ww])).all(), n
    assert f.heatmap().shape == (h, w)
    return f


@pytest.mark.parametrize("name, size", ARCHS, ids=[a for a, _ in ARCHS])
def test_torchvision_structure(name, size):
    torch.manual_seed(0)
    kwargs = {"init_weights": True, "aux_logits": False} if name == "googlenet" else {}
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    model = cw.Model(net, input_size=size, labels=[f"c{i}" for i in range(1000)])
    f = _check_structure(model, cw.sample_image("coffee"))
    assert f.label == f"c{f.target}"


@pytest.fixture(scope="module")
def lite0():
    return cw.load_model("efficientnet_lite0")


def test_efficientnet_lite0_structure(lite0):
    _check_structure(lite0, cw.sample_image("rocket"))
    lite0.module.eval()


CAT_CLASSES = range(281, 286)  # ImageNet's domestic cats: tabby … Egyptian cat


def uniform_grid(size) -> np.ndarray:
    """One point at the centre of every pixel: points spread uniformly over the image."""
    h, w = size
    rows, cols = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], 1)


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_efficientnet_lite0_points_fall_on_the_cat(lite0, corner):
    """The cat's face (the network's 224 crop of the photo) shrunk to 128×128 in one corner of
    a grey 256×256 canvas: the preprocessing keeps the canvas' centre 224 crop, so the cat
    covers a known 128×128 square of the network input. The fixations must land on it far
    more often than points spread uniformly over the image would, and follow it when it
    moves to the opposite corner."""
    from PIL import Image

    crop = lite0.prepare(cw.sample_image("cat"))[1]
    cat = Image.fromarray((crop * 255).astype(np.uint8)).resize((128, 128), Image.BILINEAR)
    top = 16 if corner == "top-left" else 112  # canvas position of the cat
    canvas = np.full((256, 256, 3), 128, np.uint8)
    canvas[top:top + 128, top:top + 128] = np.asarray(cat)
    lo = top - 16  # the cat's square in network-input pixels: [lo, lo + 128)
    assert lite0.prepare(Image.fromarray(canvas))[1].shape == (224, 224, 3)

    f = cw.fixations(lite0, Image.fromarray(canvas))
    assert f.target in CAT_CLASSES  # the top-1 class is a cat

    def on_cat(pts):
        return (pts >= lo).all(1) & (pts < lo + 128).all(1)

    pts = f.points
    n = len(pts)
    uniform = on_cat(uniform_grid(f.image_size)).mean()
    assert uniform == pytest.approx(128 ** 2 / 224 ** 2)  # a third of the image
    # n uniformly spread points would put a fraction q ± √(q(1 − q)/n) on the cat; the
    # fixations must beat q by four of those standard errors
    assert on_cat(pts).mean() > uniform + 4 * np.sqrt(uniform * (1 - uniform) / n)
    # they follow the cat: their centroid, the box's centre and the heatmap's peak lie in it
    assert on_cat(pts.mean(0, keepdims=True))[0]
    x0, y0, x1, y1 = f.box()
    assert on_cat(np.array([[(y0 + y1) / 2, (x0 + x1) / 2]]))[0]
    peak = np.unravel_index(np.argmax(f.heatmap()), f.image_size)
    assert on_cat(np.array([peak]))[0]


def test_no_hook_and_unchanged_after_exception():
    class Sine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.sin(self.bn(self.conv(x))).mean((2, 3)))

    net = Sine().train()
    model = cw.Model(net, input_size=32, labels=["a", "b"])
    snap = _snapshot(net)
    with pytest.raises(UnsupportedOperationError, match="sin"):
        cw.fixations(model, cw.sample_image("cat"))
    _assert_unchanged(net, snap)  # BN running stats untouched, train flag back
    assert hook_count(net) == 0


def test_targets_and_attribution(lite0):
    img = cw.sample_image("cat")
    f = cw.fixations(lite0, img, target="tabby")
    assert f.target == lite0.labels.index("tabby") and f.label == "tabby"
    heat, raw = fixation_attribution(lite0, img, target=281, sigma=10)
    assert heat.shape == raw.shape == (224, 224) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0)
    assert set(np.unique(raw)) <= {0.0, 1.0} and raw.sum() == len(f.points)
    with pytest.raises(ValueError, match="no class label"):
        cw.fixations(lite0, img, target="not a class")


# ----------------------------------------------------------------------------- widget
def test_fixation_explorer_updates_artists(lite0):
    import traitlets

    img = cw.sample_image("cat")
    w = cw.FixationExplorer(lite0, img, background=False)
    assert w.errors.last_error is None
    r = w.result
    assert w.target == r.target == lite0.predict(img, 1)[0][0]
    assert w.layer == r.layers()[0] and w.layer_slider.max == len(r.trace) - 1
    pts = w._fix_art["points"].get_offsets()
    assert len(pts) == len(r.points) and np.array_equal(pts[:, ::-1], r.points)
    assert w._fix_art["box"].get_visible()

    # walking the backtrack: the slider sets the layer and the layer panel shows its grid
    grid0 = np.ma.getdata(w._layer_art["grid"].get_array()).copy()
    w.layer_slider.value = len(r.trace) - 2  # the layer just above the pixels
    assert w.layer == r.layers()[-2]
    grid1 = w._layer_art["grid"].get_array()
    c, h, wd = r.shapes[w.layer]
    assert grid1.shape == (h, wd) and grid1.shape != grid0.shape
    assert np.nansum(np.ma.getdata(grid1)) == len(r.trace[w.layer])
    w.layer = r.layers()[3]
    assert w.layer_slider.value == 3

    heat0 = np.asarray(w._heat_art["heat"].get_array()).copy()
    w.sigma = 5.0
    assert w.sigma_slider.value == 5.0
    assert not np.allclose(np.asarray(w._heat_art["heat"].get_array()), heat0)

    n_kept = len(w._fix_art["points"].get_offsets())
    w.outlier_removal = False
    assert len(w._fix_art["points"].get_offsets()) == len(r.all_points) >= n_kept
    assert len(w._fix_art["outliers"].get_offsets()) == 0
    w.box_box.value = False
    assert not w.show_box and not w._fix_art["box"].get_visible()

    # the target selector recomputes
    w.target_select.value = lite0.labels.index("tabby")
    assert w.result.target == lite0.labels.index("tabby")
    assert w.layer in w.result.trace

    with pytest.raises(traitlets.TraitError, match="sigma"):
        w.sigma = -1.0
    with pytest.raises(traitlets.TraitError, match="not a layer"):
        w.layer = "no.such.layer"
    with pytest.raises(traitlets.TraitError, match="not a class"):
        w.target = 5000
    assert hook_count(lite0.module) == 0


def test_indexing_and_pretrained_googlenet_transform_input():
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _set(nn.Conv2d(1, 1, 1, bias=False), weight=[[[[1.0]]]])

        def forward(self, x):
            y = torch.cat([x[:, 2:3] * 2.0, x[:, 0:1]], 1)  # channels (2, 0) of x
            return self.conv(y[:, 1:2, ::2]).flatten(1)

    x = torch.arange(3 * 4 * 2, dtype=torch.float32).view(1, 3, 4, 2)
    # output = x[0, 0, ::2, :] flattened = [0, 1, 4, 5]; class 3 -> conv point (0, 1, 1)
    # -> y[:, 1:2, ::2] row 1 = y row 2 -> y channel 1 -> cat branch 2 (x[:, 0:1]) -> x (0, 2, 1)
    f = backtrack(Pick(), x, 3)
    assert _trace(f, "conv") == [(0, 1, 1)]
    assert _trace(f, "input") == [(0, 2, 1)]
    # torchvision's GoogLeNet with transform_input=True (as its pretrained weights use)
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=False,
                                       transform_input=True)
    f = backtrack(net, torch.rand(1, 3, 64, 64))
    assert len(f.all_points) > 0


def test_untraceable_model_gets_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y * 2
            return y.mean((2, 3))

    net = Branchy()
    with pytest.raises(UnsupportedOperationError, match="torch.fx.*leaf_modules"):
        backtrack(net, torch.ones(1, 3, 8, 8))
    assert hook_count(net) == 0 and net.training


def test_fixations_is_an_attribution_method(lite0, cat):
    assert "fixations" in cw.methods()
    before = hook_count(lite0.module)
    a = cw.attribute(lite0, cat, "fixations", sigma=10.0)
    f = cw.fixations(lite0, cat)
    assert a.method == "fixations" and a.target == f.target
    np.testing.assert_array_equal(np.asarray(a.raw), f.mask())  # raw: the kept points
    heat = f.heatmap(10.0)  # σ given for 224 px, and lite0's input is 224 px
    expected = (heat - heat.min()) / (heat.max() - heat.min())  # the map is min–max scaled
    np.testing.assert_allclose(a.map, expected, atol=1e-5)
    assert hook_count(lite0.module) == before
    with pytest.raises(ValueError, match="sigma"):
        cw.attribute(lite0, cat, "fixations", sigma=0.0)


class ChannelsLast(nn.Module):
    """ConvNeXt's pattern: permute to N×H×W×C, a linear layer over the channels, permute back."""

    def __init__(self):
        super().__init__()
        self.lin = _set(nn.Linear(2, 2, bias=False), weight=[[1, 1], [0, 2]])
        self.fc = _set(nn.Linear(6, 1, bias=False), weight=[[0, 0, 0, 0, 0, 1]])

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        z = self.lin(y)
        return self.fc(z.permute(0, 3, 1, 2).flatten(1))


def test_permute_and_linear_over_channels():
    # x: 2 channels × 1 × 3, c0 = [1, 5, 2], c1 = [4, -1, 3]; z = lin over channels at each
    # position = (c0 + c1, 2·c1); back to channels first: [[5, 4, 5], [8, -2, 6]]. fc reads
    # only (c=1, w=2) = 6 → that point of z, i.e. (h=0, w=2, c=1) channels-last; there the
    # inputs (2, 3) against weight row [0, 2] contribute (0, 6): input channel 1 → x (1, 0, 2)
    x = torch.tensor([[[[1.0, 5.0, 2.0]], [[4.0, -1.0, 3.0]]]])
    f = backtrack(ChannelsLast(), x, 0)
    assert _trace(f, "lin") == [(1, 0, 2)]  # recorded as (channel, row, col)
    assert _trace(f, "input") == [(1, 0, 2)]


class Shuffle(nn.Module):
    """ShuffleNet's pattern: chunk into two branches, concatenate, shuffle the channels."""

    def __init__(self):
        super().__init__()
        self.conv = _set(nn.Conv2d(2, 2, 1, bias=False), weight=[[[[1.0]], [[0.0]]],
                                                                    [[[0.0]], [[1.0]]]])
        self.fc = _set(nn.Linear(4, 1, bias=False), weight=[[0, 1, 0, 0]])

    def forward(self, x):
        a, b = x.chunk(2, dim=1)  # 2 channels each
        y = torch.cat([a, self.conv(b)], dim=1)  # 4 channels
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(y.mean((2, 3)))


def test_chunk_and_channel_shuffle():
    # shuffle of 4 channels in 2 groups: output channel 1 = input channel 2 (the first channel
    # of the conv branch); fc keeps channel 1 → conv output channel 0 → (identity weights)
    # its input channel 0 = chunk b's channel 0 = x's channel 2
    x = torch.rand(1, 4, 2, 2) + 0.5
    f = backtrack(Shuffle(), x, 0)
    assert {c for c, _, _ in _trace(f, "conv")} == {0}
    assert {c for c, _, _ in _trace(f, "input")} == {2}
