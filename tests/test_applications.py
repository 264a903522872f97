"""cw.attack, cw.layer_drift, cw.ablate and cw.prune_curve on tiny hand-set networks, and the
attacks' agreement with torchattacks."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import hook_count
from cnnwidgets.engine.dissection import DissectionResult

from conftest import assert_same_state, snapshot, tiny_model

P = 128 / 255  # the grey level of the hand-worked image (just above 0.5)


def grey(size=8, value=128):
    return np.full((size, size, 3), value, dtype=np.uint8)


# --------------------------------------------------------------------------- FGSM by hand
def test_fgsm_targeted_step_worked_by_hand():
    """TinyNet on a uniform grey image p = 128/255 (every conv window positive, channel 1 = p −
    0.5 > 0): pooled m0 = Σ relu(window sums)/49, m1 = Σ relu(x[0,i,j] − 0.5)/49 over i, j ≤ 6,
    logits z = (m0, m1, m0 − m1). Towards class 1, the ascended loss is −CE(z, 1), whose gradient
    is −(s0 + s2)·∂m0 + (1 − s1 + s2)·∂m1 (s = softmax(z)). ∂m0/∂x[c,i,j] = n(i)n(j)/49 with
    n = 1 on the border rows / columns 0 and 7, else 2; ∂m1/∂x[0,i,j] = 1/49 for i, j ≤ 6.
    At red (0, 0): (−(s0+s2) + 1 − s1 + s2)/49 = s2/49 > 0; at red (0, j), 1 ≤ j ≤ 6:
    (−2(s0+s2) + 1 − s1 + s2)/49 = −s0/49 < 0; elsewhere more negative still, and green /
    blue only feel −(s0+s2)·∂m0 < 0. So the FGSM step raises red (0, 0) by ε and lowers
    every other value by ε."""
    model = tiny_model()
    eps = 4 / 255
    adv = cw.attack(model, grey(), "fgsm", epsilon=eps, target=1)
    expected = np.full((8, 8, 3), P - eps, dtype=np.float64)
    expected[0, 0, 0] = P + eps
    np.testing.assert_allclose(adv.image, expected, atol=1e-6)
    np.testing.assert_allclose(adv.perturbation, expected - P, atol=1e-6)
    assert adv.target == 1 and adv.source == 0  # clean top-1: z0 = 12p > z2 = 11p + 0.5
    assert adv.steps == 1 and adv.step_size == pytest.approx(eps)
    assert adv.linf == pytest.approx(eps, abs=1e-6)
    assert adv.l2 == pytest.approx(eps * math.sqrt(8 * 8 * 3), rel=1e-5)
    # afterwards only red (0, 0) stays above 0.5: m1 = (p + ε − 0.5)/49, far below m0
    assert adv.after[0][0] != 1 and not adv.success
    assert [i for i, _, _ in adv.before][:1] == [0]


def test_fgsm_untargeted_lowers_every_value():
    """Away from class 0: the gradient of CE(z, 0) is −s1·∂m0 + (s1 − s2)·∂m1, negative
    everywhere (s1 < s2 since z1 = p − 0.5 < z2), so every value drops by ε; then channel 1
    dies (124/255 < 0.5), z = (12p′, 0, 12p′) and the top-1 tie goes to class 0: no success."""
    model = tiny_model()
    adv = cw.attack(model, grey(), "fgsm", epsilon=4 / 255)
    np.testing.assert_allclose(adv.image, np.full((8, 8, 3), P - 4 / 255), atol=1e-6)
    assert adv.target is None and adv.source == 0 and not adv.success


def test_epsilon_zero_changes_nothing_and_clipping_to_unit_range():
    model = tiny_model()
    adv = cw.attack(model, grey(), "pgd", epsilon=0.0, steps=3)
    np.testing.assert_array_equal(adv.image, adv.original)
    white = cw.attack(model, grey(value=255), "fgsm", epsilon=0.5, target=1)
    assert white.image.max() <= 1.0 and white.image.min() >= 0.5 - 1e-6


def test_adversarial_is_an_exact_image(tiny):
    adv = cw.attack(tiny, grey(), "pgd", epsilon=3 / 255, steps=4, seed=3)
    x, display = tiny.prepare(adv)
    np.testing.assert_array_equal(display, adv.image)  # not resized, not rounded to 8 bits
    torch.testing.assert_close(x, tiny.normalize(torch.from_numpy(adv.image).permute(2, 0, 1)[None]))
    probs = dict((i, p) for i, _, p in tiny.predict(adv, k=3))
    assert probs[adv.after[0][0]] == pytest.approx(adv.after[0][2], abs=1e-6)
    np.testing.assert_array_equal(tiny.prepare(adv.clean)[1], adv.original)
    with pytest.raises(ValueError, match="input is"):
        tiny_model(input_size=(9, 9)).prepare(adv)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cw.Pixels(np.full((8, 8, 3), 2.0))


def test_pgd_stays_in_the_ball_and_is_seeded(tiny):
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    # small steps: the end still depends on the random start (big ones all reach the ball's edge)
    kw = dict(epsilon=8 / 255, steps=3, step_size=1 / 255)
    a = cw.attack(tiny, img, "pgd", seed=1, **kw)
    b = cw.attack(tiny, img, "pgd", seed=1, **kw)
    c = cw.attack(tiny, img, "pgd", seed=2, **kw)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert np.abs(a.perturbation).max() <= 8 / 255 + 1e-6
    assert a.image.min() >= 0 and a.image.max() <= 1 and len(a.losses) == 3
    big = cw.attack(tiny, img, "pgd", epsilon=8 / 255, steps=5)
    assert big.step_size == pytest.approx(2.5 * (8 / 255) / 5)  # Madry et al.'s default
    assert np.abs(big.perturbation).max() == pytest.approx(8 / 255, abs=1e-6)


def test_sample_variants_are_seeded_and_varied():
    a = cw.datasets.sample_variants(6, seed=3)
    b = cw.datasets.sample_variants(6, seed=3)
    assert len(a) == 6 and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) == 6
    assert cw.datasets.sample_variants(1, seed=4)[0].tobytes() != a[0].tobytes()


# --------------------------------------------------------------------------- torchattacks
class SmallNet(nn.Module):
    """conv-BN-ReLU ×2, global pool, linear to 10 classes; random weights from a seed."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def small():
    return cw.Model(SmallNet().eval(), input_size=(16, 16), crop=1.0,
                    labels=[f"class {i}" for i in range(10)])


class Normalised(nn.Module):
    """The network on pixels in [0, 1]: the model's normalisation, then the network."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.net = model.module

    def forward(self, x):
        return self.net(self.model.normalize(x))


def _peer(small, kind, **kwargs):
    torchattacks = pytest.importorskip("torchattacks")
    return getattr(torchattacks, kind)(Normalised(small), **kwargs)


@pytest.mark.parametrize("target", [None, 7])
def test_fgsm_agrees_with_torchattacks(small, target):
    img = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ours = cw.attack(small, img, "fgsm", epsilon=6 / 255, target=target)
    x = torch.from_numpy(ours.original).permute(2, 0, 1)[None].contiguous()  # empty_like keeps strides
    atk = _peer(small, "FGSM", eps=6 / 255)
    label = ours.source
    if target is not None:
        atk.set_mode_targeted_by_label(quiet=True)
        label = target
    theirs = atk(x, torch.tensor([label]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours.image, theirs, atol=1e-6, rtol=0)
    assert np.abs(ours.perturbation).max() > 0


@pytest.mark.parametrize("target", [None, 2])
def test_pgd_agrees_with_torchattacks_given_the_same_start(small, target):
    img = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    eps, alpha, steps, seed = 8 / 255, 2 / 255, 7, 11
    ours = cw.attack(small, img, "pgd", epsilon=eps, steps=steps, step_size=alpha,
                     target=target, seed=seed)
    x = torch.from_numpy(ours.original).permute(2, 0, 1)[None].contiguous()  # empty_like keeps strides
    atk = _peer(small, "PGD", eps=eps, alpha=alpha, steps=steps, random_start=True)
    label = ours.source
    if target is not None:
        atk.set_mode_targeted_by_label(quiet=True)
        label = target
    torch.manual_seed(seed)  # torchattacks draws its start from the global generator
    theirs = atk(x, torch.tensor([label]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours.image, theirs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- errors, state
@pytest.mark.parametrize("kwargs, error, match", [
    ({"epsilon": -0.01}, ValueError, "epsilon"),
    ({"epsilon": 1.5}, ValueError, "epsilon"),
    ({"epsilon": float("nan")}, ValueError, "epsilon"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.5}, ValueError, "steps"),
    ({"method": "cw"}, ValueError, "unknown method 'cw'.*'fgsm', 'pgd'"),
    ({"step_size": 0.0}, ValueError, "step_size"),
    ({"epsilon": "4/255"}, TypeError, "epsilon"),
    ({"target": 9}, ValueError, "target 9 is out of range; the model has 3 classes"),
    ({"cancel": 3}, TypeError, "cancel"),
])
def test_bad_attack_arguments(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        cw.attack(tiny, grey(), **kwargs)


def test_attack_restores_the_model_after_success_error_and_cancel(tiny):
    net = tiny.module.train()
    before, hooks = snapshot(net), hook_count(net)
    cw.attack(tiny, grey(), "pgd", steps=2)
    assert_same_state(net, before)
    assert hook_count(net) == hooks
    with pytest.raises(ValueError):
        cw.attack(tiny, grey(), target="no such label")
    assert_same_state(net, before)
    stop = threading.Event()
    stop.set()
    with pytest.raises(cw.Cancelled):
        cw.attack(tiny, grey(), "pgd", steps=3, cancel=stop)
    calls = []
    with pytest.raises(cw.Cancelled):
        cw.attack(tiny, grey(), "pgd", steps=5, cancel=lambda: len(calls) >= 2,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5)]
    assert_same_state(net, before)
    assert hook_count(net) == hooks and net.training


# --------------------------------------------------------------------------- drift
def test_layer_drift_by_hand(tiny):
    """Grey p vs grey p − ε on TinyNet's conv: channel 0 (window sums 12p) moves by 12ε at
    each of 49 positions, channel 1 (p − 0.5) by ε: ‖ΔA‖/‖A‖ = √(144 + 1)ε / √(144p² + (p −
    0.5)²)."""
    eps = 4 / 255
    drift = cw.layer_drift(tiny, cw.Pixels(np.full((8, 8, 3), P)),
                           cw.Pixels(np.full((8, 8, 3), P - eps)), layers=["conv"])
    base = math.sqrt(144 * P**2 + (P - 0.5) ** 2)
    assert drift.relative[0] == pytest.approx(math.sqrt(145) * eps / base, rel=1e-5)
    np.testing.assert_allclose(drift.channels["conv"], [12 * eps / base, eps / base], rtol=1e-5)
    assert drift.top_channels("conv", 1) == [0]
    assert cw.layer_drift(tiny, grey(), grey()).relative.tolist() == [0.0]
    with pytest.raises(ValueError, match="not a feature map"):
        cw.layer_drift(tiny, grey(), grey(), layers=["fc"])


# --------------------------------------------------------------------------- ablation
def test_ablation_zeroes_exactly_the_named_channels(tiny):
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    intact = tiny.activations(img, ["conv", "relu"])  # cached: the block must not reuse it
    net = tiny.module
    hooks = hook_count(net)
    with cw.ablate(tiny, {"conv": [1]}):
        inside = tiny.activations(img, ["conv", "relu"])
        x, _ = tiny.prepare(img)
        logits = net(x)[0].detach()
    assert hook_count(net) == hooks
    assert torch.equal(inside["conv"][1], torch.zeros_like(intact["conv"][1]))
    assert torch.equal(inside["conv"][0], intact["conv"][0])
    assert torch.equal(inside["relu"][0], intact["relu"][0])
    m0 = intact["relu"][0].mean()
    torch.testing.assert_close(logits, torch.stack([m0, torch.tensor(0.0), m0]))
    after = tiny.activations(img, "conv")
    assert torch.equal(after, intact["conv"])  # the network is whole again
    with cw.ablate(tiny, {"conv": 0, "relu": []}):
        assert torch.equal(tiny.activations(img, "relu")[0], torch.zeros(7, 7))


def test_ablation_hooks_go_after_an_error(tiny):
    hooks = hook_count(tiny.module)
    with pytest.raises(RuntimeError, match="inside"):
        with cw.ablate(tiny, {"conv": [0, 1]}):
            assert hook_count(tiny.module) == hooks + 1
            raise RuntimeError("inside")
    assert hook_count(tiny.module) == hooks


@pytest.mark.parametrize("units, error, match", [
    ({"conv": [2]}, ValueError, "unit 2 is out of range.*2 channels"),
    ({"conv": [-1]}, ValueError, "out of range"),
    ({"fc": [0]}, ValueError, "not a C×h×w feature map"),
    ({"nope": [0]}, ValueError, "no layer 'nope'"),
    ({"conv": "0"}, TypeError, "channel index"),
    ({"conv": [0.5]}, ValueError, "whole number"),
    ([("conv", 0)], TypeError, "dict"),
])
def test_bad_ablations(tiny, units, error, match):
    hooks = hook_count(tiny.module)
    with pytest.raises(error, match=match):
        with cw.ablate(tiny, units):
            pass
    assert hook_count(tiny.module) == hooks


# --------------------------------------------------------------------------- prune curve
class KnownUnits(nn.Module):
    """1×1 conv 3→4 (no bias) → ReLU → global pool → linear 4→2, every unit known:

    unit 0 = r (L1 1), unit 1 = 2g (L1 2), unit 2 = 3b (L1 3), unit 3 = relu(−2r − 2g) (L1 4,
    dead on every image); class 0 = u0 + u1, class 1 = u2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(
                [[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [-2, -2, 0]]).view(4, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0]]))

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def known():
    return cw.Model(KnownUnits(), input_size=(4, 4), crop=1.0, mean=(0, 0, 0), std=(1, 1, 1),
                    labels=["left", "right"])


def colour(r, g, b):
    return cw.Pixels(torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1).expand(3, 4, 4))


def sig(t):
    return 1 / (1 + math.exp(-t))


FRACTIONS = [0, 0.25, 0.5, 0.75, 1.0]
# image 1 (1, 0, 1): z = (1, 3), top-1 right; image 2 (1, 1, 0.2): z = (3, 0.6), top-1 left


def test_prune_curve_weight_l1_worked_by_hand():
    """Weight-L1 order 0, 1, 2, 3. Image 1 keeps 'right' while u2 lives: (0, 3) at 1 and 2 units
    off, then (0, 0), a tie that argmax gives to 'left'. Image 2: (2, 0.6) ✓, (0, 0.6) ✗,
    then (0, 0) → 'left' ✓ twice."""
    model = known()
    images = [colour(1, 0, 1), colour(1, 1, 0.2)]
    curve = cw.prune_curve(model, images, "conv", "weight_l1", FRACTIONS)
    assert curve.order.tolist() == [0, 1, 2, 3]
    assert curve.units_off.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(curve.agreement, [1, 1, 0.5, 0.5, 0.5])
    p1, p2 = sig(2), sig(2.4)  # the intact top-1 probabilities
    drops = [0,
             ((p1 - sig(3)) + (p2 - sig(1.4))) / 2,
             ((p1 - sig(3)) + (p2 - sig(-0.6))) / 2,
             ((p1 - 0.5) + (p2 - 0.5)) / 2,
             ((p1 - 0.5) + (p2 - 0.5)) / 2]
    np.testing.assert_allclose(curve.prob_drop, drops, atol=1e-6)
    assert curve.top1.tolist() == [1, 0] and curve.n_images == 2 and curve.channels == 4
    assert curve.off(0.5) == [0, 1]


def test_prune_curve_activation_switches_the_dead_unit_off_first():
    """Mean activations: u0 = 1, u1 = 1, u2 = 1.8, u3 = 0 → order 3, 0, 1, 2: a quarter off
    (the dead unit) changes nothing."""
    model = known()
    images = [colour(1, 0, 1), colour(1, 1, 0.2)]
    curve = cw.prune_curve(model, images, "conv", "activation", [0.25, 0.5])
    assert curve.order.tolist() == [3, 0, 1, 2]
    np.testing.assert_allclose(curve.agreement, [1, 1])
    np.testing.assert_allclose(curve.prob_drop[0], 0, atol=1e-7)
    # u0 off as well: image 2 (2, 0.6) keeps 'left' with p = σ(1.4)
    assert curve.prob_drop[1] == pytest.approx(((sig(2) - sig(3)) + (sig(2.4) - sig(1.4))) / 2,
                                               abs=1e-6)  # float32 network


def test_prune_curve_random_and_concepts():
    model = known()
    images = [colour(1, 0, 1)]
    a = cw.prune_curve(model, images, "conv", "random", [0.5], seed=4)
    b = cw.prune_curve(model, images, "conv", "random", [0.5], seed=4)
    assert sorted(a.order.tolist()) == [0, 1, 2, 3] and a.order.tolist() == b.order.tolist()
    orders = {tuple(cw.prune_curve(model, images, "conv", "random", [0], seed=s).order)
              for s in range(6)}
    assert len(orders) > 1
    iou = np.array([[0.30, 0.00], [0.00, 0.20], [0.10, 0.05], [0.05, 0.00]], np.float32)
    result = DissectionResult(["conv"], ["red", "stripes"], {"red": "color", "stripes": "texture"},
                              {"conv": {"iou": iou, "threshold": np.zeros(4, np.float32)}},
                              quantile=0.005, iou_threshold=0.04, n_images=1)
    red = cw.prune_curve(model, images, "conv", "red", [0.25], dissection=result)
    assert red.order.tolist() == [0, 2, 3, 1]
    # image 1 without u0 (the best 'red' unit): (0, 3), still 'right'
    assert red.agreement.tolist() == [1.0]
    texture = cw.prune_curve(model, images, "conv", "texture", [0.25], dissection=result)
    assert texture.order.tolist() == [1, 2, 0, 3]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"fractions": [0.5, 1.5]}, ValueError, "fraction"),
    ({"fractions": [-0.1]}, ValueError, "fraction"),
    ({"fractions": []}, ValueError, "empty"),
    ({"criterion": "loudness"}, ValueError, "unknown criterion 'loudness'"),
    ({"criterion": "red"}, ValueError, "dissection"),
    ({"layer": "fc"}, ValueError, "not a C×h×w feature map"),
    ({"images": []}, ValueError, "empty"),
])
def test_bad_prune_curves(kwargs, error, match):
    model = known()
    args = {"images": [colour(1, 0, 1)], "layer": "conv", "criterion": "weight_l1",
            "fractions": [0.5], **kwargs}
    hooks = hook_count(model.module)
    with pytest.raises(error, match=match):
        cw.prune_curve(model, **args)
    assert hook_count(model.module) == hooks


def test_prune_curve_restores_the_model_and_cancels():
    model = known()
    net = model.module.train()
    before, hooks = snapshot(net), hook_count(net)
    cw.prune_curve(model, [colour(1, 0, 1)], "conv", "activation", [0.5])
    assert_same_state(net, before)
    with pytest.raises(cw.Cancelled):
        cw.prune_curve(model, [colour(1, 0, 1)], "conv", "random", [0.5, 1], cancel=lambda: True)
    assert_same_state(net, before)
    assert hook_count(net) == hooks


def test_methods_inside_an_ablation_see_the_ablated_network(tiny):
    """With both conv channels off, every class score is 0 whatever the input: the saliency is
    zero inside the block (the fast paths step aside) and not after it."""
    img = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with cw.ablate(tiny, {"conv": [0, 1]}):
        inside = cw.attribute(tiny, img, "saliency", target=0)
        assert [p for _, _, p in tiny.predict(img, k=3)] == pytest.approx([1 / 3] * 3)
    after = cw.attribute(tiny, img, "saliency", target=0)
    assert np.abs(inside.raw).max() == 0 and np.abs(after.raw).max() > 0


def test_an_ablation_holds_for_its_own_thread_only(tiny):
    img = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x, _ = tiny.prepare(img)
    seen = {}

    def other():
        with torch.no_grad():
            seen["other"] = tiny.module(x)

    with cw.ablate(tiny, {"conv": [0, 1]}), torch.no_grad():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        seen["own"] = tiny.module(x)
    with torch.no_grad():
        intact = tiny.module(x)
    assert torch.equal(seen["own"], torch.zeros_like(intact))
    assert torch.equal(seen["other"], intact)
