"""cw.compare: linear CKA and unit matching, on hand-worked numbers and hand-set networks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.compare import linear_cka, match_units, unit_correlation
from cnnwidgets.engine.hooks import hook_count


# ------------------------------------------------------------------ linear CKA
def test_cka_one_feature_by_hand():
    # x = (1, 2, 3) centres to (-1, 0, 1); y = (1, 0, 2) centres to (0, -1, 1).
    # One feature each: CKA = (x·y)² / (|x|² |y|²) = 1² / (2 · 2) = 0.25
    assert linear_cka([[1.0], [2.0], [3.0]], [[1.0], [0.0], [2.0]]) == pytest.approx(0.25)


def test_cka_two_features_by_hand():
    # X is centred already; Y is its first column.
    # XᵀX = [[2, 1], [1, 2]] → ‖·‖_F = √10;  YᵀY = [[2]] → 2;  YᵀX = [2, 1] → ‖·‖²_F = 5
    # CKA = 5 / (2 √10)
    x = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
    y = [[1.0], [0.0], [-1.0]]
    assert linear_cka(x, y) == pytest.approx(5 / (2 * math.sqrt(10)))
    assert linear_cka(y, x) == pytest.approx(5 / (2 * math.sqrt(10)))  # symmetric


def test_cka_with_itself_an_orthogonal_transform_and_a_scaling_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.5 * x + 2.0) == pytest.approx(1.0, abs=1e-12)  # scale and shift


def test_cka_of_unrelated_representations_is_small():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) < 0.1
    # and a non-orthogonal map (stretching one direction) is not 1
    assert linear_cka(x, x * torch.tensor([10.0, 1, 1, 1], dtype=torch.float64)) < 0.9


def test_cka_needs_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(np.zeros((3, 2)), np.zeros((4, 2)))


# ------------------------------------------------------------------ unit correlation
def test_unit_correlation_by_hand():
    # a = (1, 2, 3): b0 = 2a correlates 1; b1 = (1, 0, 2) correlates (−1·0 + 0 + 1·1)/(√2 √2) = 0.5;
    # b2 is constant: NaN, never a partner
    a = torch.tensor([[1.0], [2.0], [3.0]])
    b = torch.tensor([[2.0, 1.0, 5.0], [4.0, 0.0, 5.0], [6.0, 2.0, 5.0]])
    corr = unit_correlation(a, b)
    assert corr[0, 0] == pytest.approx(1.0)
    assert corr[0, 1] == pytest.approx(0.5)
    assert math.isnan(corr[0, 2])


def test_constant_unit_of_a_has_no_partner():
    a = torch.zeros(2, 2, 3, 3)
    a[:, 1] = torch.arange(18.0).reshape(2, 3, 3)  # unit 0 constant, unit 1 varies
    b = a.clone()
    m = match_units(a, b, "x", "y")
    assert m.partner.tolist() == [-1, 1]
    assert math.isnan(m.score[0]) and m.score[1] == pytest.approx(1.0)
    assert m.order().tolist() == [1, 0]


# ------------------------------------------------------------------ networks
class Net(nn.Module):
    """conv(3→6, k3) → ReLU → 2×2 average pool → conv(6→4, k1) → GAP → linear(4→3)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(self.gap(self.conv2(x)).flatten(1))


def permuted(net: Net, perm) -> Net:
    """The same function with conv1's output channels reordered: new channel j = old perm[j]."""
    other = Net()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other.conv1.weight.copy_(net.conv1.weight[perm])
        other.conv1.bias.copy_(net.conv1.bias[perm])
        other.conv2.weight.copy_(net.conv2.weight[:, perm])
    return other


def wrap(net, size=16):
    return cw.Model(net, input_size=(size, size), mean=(0, 0, 0), std=(1, 1, 1), crop=1.0,
                    labels=["a", "b", "c"])


def noise_images(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def smooth_images(n=4, size=32, seed=0):
    """Random 4×4 colour fields upsampled: images that look alike at any resolution."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                       .resize((size, size), Image.Resampling.BILINEAR)) for _ in range(n)]


def test_matching_recovers_a_permutation_of_channels():
    net = Net()
    perm = [3, 0, 5, 1, 4, 2]
    a, b = wrap(net), wrap(permuted(net, perm))
    images = noise_images()
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    assert torch.allclose(a.module(x), b.module(x), atol=1e-5)  # the same function
    result = cw.compare(a, b, images, ["conv1", "conv2"], ["conv1", "conv2"])
    m = result.matches("conv1", "conv1")
    # unit i of A is unit j of B where perm[j] = i
    assert m.partner.tolist() == np.argsort(perm).tolist()
    np.testing.assert_allclose(m.score, 1.0, atol=1e-5)
    assert m.grid == (16, 16)
    assert result.cka.shape == (2, 2)
    assert result.cka[0, 0] == pytest.approx(1.0, abs=1e-9)  # a permutation is orthogonal
    assert result.cka[1, 1] == pytest.approx(1.0, abs=1e-9)
    assert result.best_layer("conv1") == "conv1"
    assert result.matches("conv1").layer_b == "conv1"  # the best layer by default


def test_layers_of_different_grids_are_matched_on_the_larger_grid():
    net = Net()
    a, b = wrap(net), wrap(Net(seed=1))
    result = cw.compare(a, b, noise_images(3), ["conv1"], ["conv2"])
    m = result.matches("conv1", "conv2")
    assert m.grid == (16, 16)  # conv1 is 16×16, conv2 8×8: upsampled to 16×16
    assert m.partner.shape == (6,) and m.score.shape == (6,)
    assert ((m.partner >= 0) & (m.partner < 4)).all()
    assert (np.abs(m.score) <= 1 + 1e-6).all()
    assert result.matches("conv1", "conv2").grid == (16, 16)


def test_max_grid_caps_the_common_grid():
    net = Net()
    result = cw.compare(wrap(net), wrap(net), noise_images(3), ["conv1"], ["conv1"], max_grid=5)
    assert result.matches("conv1", "conv1").grid == (5, 5)
    # the same network: every unit still matches itself
    assert result.matches("conv1", "conv1").partner.tolist() == list(range(6))


def test_compare_leaves_no_hook_and_restores_flags():
    net_a, net_b = Net(), Net(seed=2)
    net_a.train()
    net_b.eval()
    net_b.conv2.weight.requires_grad_(False)
    cw.compare(wrap(net_a), wrap(net_b), noise_images(3), ["conv1"], ["conv2"])
    assert hook_count(net_a) == 0 and hook_count(net_b) == 0
    assert all(m.training for m in net_a.modules())
    assert not any(m.training for m in net_b.modules())
    assert net_b.conv2.weight.requires_grad is False and net_b.conv1.weight.requires_grad


def test_unknown_layer_names_the_network_and_suggests():
    a, b = wrap(Net()), wrap(Net())
    with pytest.raises(cw.LayerNotFoundError, match=r"network B.*'conv2'"):
        cw.compare(a, b, noise_images(2), ["conv1"], ["conv_2"])
    with pytest.raises(cw.LayerNotFoundError, match="network A"):
        cw.compare(a, b, noise_images(2), ["nope"], ["conv1"])
    with pytest.raises(cw.LayerNotFoundError, match="was not compared"):
        cw.compare(a, b, noise_images(2), ["conv1"], ["conv1"]).matches("conv2")
    assert hook_count(a.module) == 0


def test_mismatched_input_sizes_are_resized_and_said():
    net = Net()
    a, b = wrap(net, 16), wrap(net, 24)
    images = smooth_images(6)
    with pytest.warns(UserWarning, match="different input sizes"):
        result = cw.compare(a, b, images, ["conv1"], ["conv1"], max_grid=32)
    assert result.input_sizes == ((16, 16), (24, 24))
    assert any("16×16" in n and "24×24" in n for n in result.notes)
    m = result.matches("conv1", "conv1")
    assert m.grid == (24, 24)
    # the same weights seeing the same view: every unit is matched with itself, strongly
    assert m.partner.tolist() == list(range(6))
    assert (m.score > 0.8).all()


def test_too_few_images_and_bad_images():
    a = wrap(Net())
    with pytest.raises(ValueError, match="at least two images"):
        cw.compare(a, a, noise_images(1), ["conv1"], ["conv1"])
    with pytest.raises(TypeError, match="list of images"):
        cw.compare(a, a, 42, ["conv1"], ["conv1"])


def test_default_images_are_the_photos_and_their_mirrors_plus_a_new_image():
    from cnnwidgets.engine.compare import default_images

    photos = [cw.sample_image(n) for n in cw.sample_images()]
    images = default_images()
    assert len(images) == 2 * len(photos)
    first = np.asarray(images[len(photos)])
    np.testing.assert_array_equal(first, np.asarray(photos[0])[:, ::-1])  # mirrored
    assert len(default_images(cw.sample_image("cat"))) == 2 * len(photos)  # not twice
    assert len(default_images(noise_images(1, 32)[0])) == 2 * len(photos) + 1


def test_no_hook_stays_after_a_network_raises():
    from test_engine import Boom

    net_a, net_b = Net(), Net(seed=2)
    net_b.pool = nn.Sequential(Boom(), nn.AvgPool2d(2))
    net_b.pool[0].armed = True
    net_b.train()
    b = wrap(net_b)
    net_b.pool[0].armed = False
    b.layers()  # the layer index from a pass that runs
    net_b.pool[0].armed = True
    with pytest.raises(RuntimeError, match="boom"):
        cw.compare(wrap(net_a), b, noise_images(2), ["conv1"], ["conv1"])
    assert hook_count(net_a) == 0 and hook_count(net_b) == 0
    assert all(m.training for m in net_b.modules())
