"""Attribution methods on a tiny fixed-weight model, values worked out by hand.

The network (``Tiny``): a 1×1 convolution 3 → 2 channels with weights
    z0 = R + G + B,   z1 = R − G       (no bias)
then a ReLU-like activation, global average pooling and a linear layer 2 → 2 with
    y0 = p0 + 2·p1,   y1 = 3·p0 − p1   (no bias).
The input (2×2 pixels, identity normalisation) is
    R = [[1, 2], [0, 1]],  G = [[0, 1], [1, 0]],  B = [[1, 0], [0, 2]]
so z0 = [[2, 3], [1, 3]], z1 = [[1, 1], [−1, 1]] and after the ReLU
    A0 = [[2, 3], [1, 3]],  A1 = [[1, 1], [0, 1]];  p = (9/4, 3/4);  y = (3.75, 6.0).
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.attribution import Cancelled, Param, get_method, register, relu_rule, unregister
from cnnwidgets.engine.attribution.perturbation import rise_masks, window_starts
from cnnwidgets.engine.hooks import hook_count

X = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])
A0 = np.array([[2.0, 3.0], [1.0, 3.0]])
A1 = np.array([[1.0, 1.0], [0.0, 1.0]])

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(0.0, 6.0),
    "torch.relu": lambda: Lambda(torch.relu),
    "F.relu6": lambda: Lambda(F.relu6),
    "clamp": lambda: Lambda(lambda t: t.clamp(0, 6)),
    "clamp_min": lambda: Lambda(lambda t: t.clamp_min(0)),
}


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Boom(nn.Module):
    """Global average pooling that raises when armed (to test clean-up after errors)."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return F.adaptive_avg_pool2d(x, 1)


class Tiny(nn.Module):
    def __init__(self, activation="relu"):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.pool = Boom()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def tiny(activation="relu"):
    return cw.Model(Tiny(activation), transform=lambda pil: X.clone(), labels=["zero", "one"],
                    input_size=(2, 2), mean=(0, 0, 0), std=(1, 1, 1))


IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)  # ignored by the fixed transform


def run(method, target=1, model=None, **params):
    return cw.attribute(model or tiny(), IMAGE, method, target=target, **params)


# --------------------------------------------------------------------------- the model itself
def test_tiny_model_matches_the_docstring():
    with torch.no_grad():
        y = tiny().module(X[None])[0]
    assert torch.allclose(y, torch.tensor([3.75, 6.0]))


# --------------------------------------------------------------------------- gradient methods
# target 0: ∂y0/∂A0 = 1/4, ∂y0/∂A1 = 2/4 everywhere; through the ReLU (z1 < 0 at (1, 0)):
#   ∂/∂R = 1/4 + 1/2·1[z1>0] = [[.75, .75], [.25, .75]]
#   ∂/∂G = 1/4 − 1/2·1[z1>0] = [[−.25, −.25], [.25, −.25]],   ∂/∂B = 1/4
GRAD0 = np.array([[[0.75, 0.75], [0.25, 0.75]], [[-0.25, -0.25], [0.25, -0.25]],
                  [[0.25, 0.25], [0.25, 0.25]]])
# target 1: ∂y1/∂A0 = 3/4, ∂y1/∂A1 = −1/4:
#   ∂/∂R = 3/4 − 1/4·1[z1>0] = [[.5, .5], [.75, .5]],  ∂/∂G = 3/4 + 1/4·1[z1>0] = [[1, 1], [.75, 1]]
GRAD1 = np.array([[[0.5, 0.5], [0.75, 0.5]], [[1.0, 1.0], [0.75, 1.0]],
                  [[0.75, 0.75], [0.75, 0.75]]])


def test_saliency():
    a = run("saliency", target=0)
    np.testing.assert_allclose(a.raw, np.abs(GRAD0), atol=1e-6)
    # map: largest over channels = [[.75, .75], [.25, .75]], divided by its maximum (.75)
    np.testing.assert_allclose(a.map, [[1, 1], [1 / 3, 1]], atol=1e-6)
    assert a.target == 0 and a.label == "zero" and a.layer is None and a.score == pytest.approx(3.75)


def test_gradient_x_input():
    a = run("gradient_x_input", target=0)
    np.testing.assert_allclose(a.raw, X.numpy() * GRAD0, atol=1e-6)
    # summed over channels: [[.75+0+.25, 1.5−.25+0], [0+.25+0, .75+0+.5]] = [[1, 1.25], [.25, 1.25]]
    np.testing.assert_allclose(a.map, np.array([[1, 1.25], [0.25, 1.25]]) / 1.25, atol=1e-6)
    assert a.signed


def test_target_none_is_top1_and_labels_work():
    assert run("saliency", target=None).target == 1  # y1 = 6 > y0 = 3.75
    assert run("saliency", target="zero").target == 0


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_right"])
def test_integrated_gradients_on_a_piecewise_linear_path(rule):
    # from the zero baseline, the path α·X keeps every sign of z for α > 0, so the gradient is
    # constant on the path and IG = X · ∂y/∂X; it sums to y0(X) − y0(0) = 3.75 (completeness).
    # riemann_trapezoid (Captum's definition): weights 1/steps with both ends halved, so they sum
    # to 1 − 1/8, and the α = 0 end (weight 1/16) sees relu'(0) = 0: a factor 1 − 1/8 − 1/16.
    a = run("integrated_gradients", target=0, baseline="zeros", steps=8, rule=rule)
    expected = X.numpy() * GRAD0
    if rule == "riemann_trapezoid":
        expected = expected * (1 - 1 / 8 - 1 / 16)
    np.testing.assert_allclose(a.raw, expected, atol=1e-6)
    if rule != "riemann_trapezoid":
        assert a.raw.sum() == pytest.approx(3.75, abs=1e-5)


def test_integrated_gradients_batching_does_not_change_the_result():
    a = run("integrated_gradients", target=0, steps=7, batch_size=2)
    b = run("integrated_gradients", target=0, steps=7, batch_size=7)
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-6)


def test_smoothgrad():
    # no noise: the mean of identical gradients is the gradient
    a = run("smoothgrad", target=0, n_samples=3, noise=0.0, batch_size=2)
    np.testing.assert_allclose(a.raw, GRAD0, atol=1e-6)
    b = run("smoothgrad", target=0, n_samples=6, noise=0.5, batch_size=4, seed=3)
    c = run("smoothgrad", target=0, n_samples=6, noise=0.5, batch_size=6, seed=3)
    assert not np.allclose(b.raw, GRAD0)  # the noise is applied…
    np.testing.assert_allclose(b.raw, c.raw, atol=1e-6)  # …reproducibly, whatever the batching


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_guided_backprop_and_deconvnet_apply_to_every_relu_like_unit(activation):
    model = tiny(activation)
    # target 1, guided: the negative signal −1/4 into A1 is stopped, so only A0 (3/4) reaches
    # the input: ∂/∂R = ∂/∂G = ∂/∂B = 3/4 everywhere (the plain gradient is GRAD1)
    np.testing.assert_allclose(run("guided_backprop", 1, model).raw, np.full((3, 2, 2), 0.75), atol=1e-6)
    # target 0, guided: every signal is positive, so it equals the plain gradient
    np.testing.assert_allclose(run("guided_backprop", 0, model).raw, GRAD0, atol=1e-6)
    # target 0, DeconvNet: the 1/2 into A1 also passes where z1 < 0:
    #   ∂/∂R = 1/4 + 1/2 = 3/4, ∂/∂G = 1/4 − 1/2 = −1/4, ∂/∂B = 1/4, everywhere
    expected = np.stack([np.full((2, 2), 0.75), np.full((2, 2), -0.25), np.full((2, 2), 0.25)])
    np.testing.assert_allclose(run("deconvnet", 0, model).raw, expected, atol=1e-6)
    # target 1, DeconvNet: relu(−1/4) = 0 into A1, 3/4 into A0 → 3/4 everywhere
    np.testing.assert_allclose(run("deconvnet", 1, model).raw, np.full((3, 2, 2), 0.75), atol=1e-6)


# The same network on an input whose activations pass ReLU6's cap of 6:
#   R = [[4, 8], [1, 2]],  G = [[0, 1], [4, 0]],  B = [[3, 0], [0, −5]]
#   z0 = R + G + B = [[7, 9], [5, −3]]  → A0 = [[6, 6], [5, 0]],  inside (0, 6): [[0, 0], [1, 0]]
#   z1 = R − G     = [[4, 7], [−3, 2]]  → A1 = [[4, 6], [0, 2]],  inside (0, 6): [[1, 0], [0, 1]]
#   p = (17/4, 12/4), y = (p0 + 2·p1, 3·p0 − p1) = (10.25, 9.75)
# A capped unit (z > 6) passes no gradient, as one below 0 (ALGORITHMS.md, relu_rules):
#   plain   1[0 < f < 6]·R,   guided 1[0 < f < 6]·1[R > 0]·R,   DeconvNet relu(R) (no mask).
X6 = torch.tensor([[[4.0, 8.0], [1.0, 2.0]], [[0.0, 1.0], [4.0, 0.0]], [[3.0, 0.0], [0.0, -5.0]]])
INSIDE0 = np.array([[0.0, 0.0], [1.0, 0.0]])
INSIDE1 = np.array([[1.0, 0.0], [0.0, 1.0]])
CAPPED = ["relu6", "hardtanh", "F.relu6", "clamp"]


def tiny6(activation):
    return cw.Model(Tiny(activation), transform=lambda pil: X6.clone(), labels=["zero", "one"],
                    input_size=(2, 2), mean=(0, 0, 0), std=(1, 1, 1))


def from_z(g0, g1):
    """Input gradient (∂/∂R, ∂/∂G, ∂/∂B) from the gradients at z0 = R+G+B and z1 = R−G."""
    return np.stack([g0 + g1, g0 - g1, g0])


@pytest.mark.parametrize("activation", CAPPED)
def test_guided_backprop_and_deconvnet_at_the_relu6_cap(activation):
    model = tiny6(activation)
    with torch.no_grad():
        assert torch.allclose(model.module(X6[None])[0], torch.tensor([10.25, 9.75]))
    # target 1: ∂y1/∂A = (3/4, −1/4) at every position.
    # plain: z0 passes at (1, 0) only (7 and 9 are capped, −3 is cut), z1 at (0, 0) and (1, 1)
    plain1 = from_z(0.75 * INSIDE0, -0.25 * INSIDE1)
    np.testing.assert_allclose(run("saliency", 1, model).raw, np.abs(plain1), atol=1e-6)
    # guided: −1/4 into A1 is stopped everywhere, 3/4 into A0 passes at (1, 0) only — not at
    # the capped (0, 0) and (0, 1), where a rule without the cap would let it through
    guided1 = from_z(0.75 * INSIDE0, 0 * INSIDE1)
    np.testing.assert_allclose(run("guided_backprop", 1, model).raw, guided1, atol=1e-6)
    # target 0: ∂y0/∂A = (1/4, 1/2), all positive: guided = plain, the cap still applies
    guided0 = from_z(0.25 * INSIDE0, 0.5 * INSIDE1)
    np.testing.assert_allclose(run("guided_backprop", 0, model).raw, guided0, atol=1e-6)
    # DeconvNet ignores the forward pass: relu(1/4), relu(1/2) reach every position, capped
    # or cut alike: ∂/∂R = 3/4, ∂/∂G = −1/4, ∂/∂B = 1/4 everywhere
    deconv0 = from_z(np.full((2, 2), 0.25), np.full((2, 2), 0.5))
    np.testing.assert_allclose(run("deconvnet", 0, model).raw, deconv0, atol=1e-6)
    # target 1: relu(−1/4) = 0 into A1, 3/4 into A0, capped positions included
    np.testing.assert_allclose(run("deconvnet", 1, model).raw, np.full((3, 2, 2), 0.75), atol=1e-6)
    # guided Grad-CAM at the cap: guided1 × Grad-CAM, whose weights are the mean gradient at
    # A, (3/4, −1/4) (the cap zeroes ∂A/∂z, not ∂y/∂A) → relu(.75·A0 − .25·A1)
    #   = [[4.5 − 1, 4.5 − 1.5], [3.75 − 0, 0 − .5 → 0]] = [[3.5, 3], [3.75, 0]]
    cam = np.array([[3.5, 3.0], [3.75, 0.0]])
    np.testing.assert_allclose(run("grad_cam", 1, model).raw, cam, atol=1e-6)
    np.testing.assert_allclose(run("guided_grad_cam", 1, model).raw, guided1 * cam, atol=1e-6)


def test_a_rule_patching_only_nn_relu_returns_the_plain_gradient_on_relu6():
    """Why we differ from Captum: its GuidedBackprop hooks nn.ReLU modules only, so on a ReLU6
    network (like EfficientNet-Lite) it silently returns the plain gradient."""
    captum = pytest.importorskip("captum.attr")
    model = tiny("relu6")
    x = X[None].clone().requires_grad_(True)
    theirs = captum.GuidedBackprop(model.module).attribute(x, target=1)[0].detach().numpy()
    np.testing.assert_allclose(theirs, GRAD1, atol=1e-6)  # = plain gradient
    ours = run("guided_backprop", 1, model).raw
    np.testing.assert_allclose(ours, np.full((3, 2, 2), 0.75), atol=1e-6)
    assert not np.allclose(ours, theirs)
    # with nn.ReLU both agree
    relu = tiny("relu")
    theirs = captum.GuidedBackprop(relu.module).attribute(X[None].clone(), target=1)[0].numpy()
    np.testing.assert_allclose(run("guided_backprop", 1, relu).raw, theirs, atol=1e-6)


def test_relu_rule_context_is_thread_local_and_removed():
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    with relu_rule("deconvnet") as mode:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("y", torch.relu(x)))
        t.start()
        t.join()
        torch.relu(x).sum().backward()
    assert mode.calls == 1  # the other thread's relu was not touched
    assert x.grad.tolist() == [1.0, 1.0]  # deconvnet ignores the forward mask
    x.grad = None
    torch.relu(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0]  # plain again after the context


# --------------------------------------------------------------------------- CAM methods
def test_default_layer_is_the_map_fed_to_global_pooling():
    assert run("grad_cam").layer == "act"


def test_cam():
    # target 1: Σ w_1k A_k = 3·A0 − A1 = [[5, 8], [3, 8]]
    a = run("cam", target=1)
    np.testing.assert_allclose(a.raw, [[5, 8], [3, 8]], atol=1e-6)
    np.testing.assert_allclose(a.map, (np.array([[5, 8], [3, 8]]) - 3) / 5, atol=1e-6)


def test_grad_cam():
    # target 1: weights = mean gradient = (3/4, −1/4): .75·A0 − .25·A1 = [[1.25, 2], [.75, 2]]
    np.testing.assert_allclose(run("grad_cam", 1).raw, [[1.25, 2], [0.75, 2]], atol=1e-6)
    # target 0: (1/4, 1/2): [[1, 1.25], [.25, 1.25]]
    np.testing.assert_allclose(run("grad_cam", 0).raw, [[1, 1.25], [0.25, 1.25]], atol=1e-6)


def test_grad_cam_pp():
    # target 1: g0 = 3/4 with ΣA0 = 9: α0 = g²/(2g² + 9g³) = .5625/(1.125 + 3.796875) = 4/35;
    # weight0 = Σ_ij relu(g)·α0 = 4 · .75 · 4/35 = 12/35; g1 = −1/4 < 0 so weight1 = 0
    np.testing.assert_allclose(run("grad_cam_pp", 1).raw, 12 / 35 * A0, rtol=1e-5)


def test_xgrad_cam():
    # weights Σ_ij g·A_k/ΣA_k: for target 0 = (1/4·9/9, 1/2·3/3) = (1/4, 1/2) → as Grad-CAM
    np.testing.assert_allclose(run("xgrad_cam", 0).raw, [[1, 1.25], [0.25, 1.25]], atol=1e-5)


class SquaredHead(Tiny):
    """Tiny with a non-linear head: the activations are squared before the pooling, so
    y0 = mean(A0²) + 2·mean(A1²), y1 = 3·mean(A0²) − mean(A1²) and ∂y/∂A varies with A."""

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x)) ** 2).flatten(1))


def test_xgrad_cam_differs_from_grad_cam_with_a_non_linear_head():
    model = cw.Model(SquaredHead(), transform=lambda pil: X.clone(), labels=["zero", "one"],
                     input_size=(2, 2), mean=(0, 0, 0), std=(1, 1, 1))
    # target 1: ∂y1/∂A0 = 3·2·A0/4 = 1.5·A0,  ∂y1/∂A1 = −2·A1/4 = −0.5·A1
    #   (ΣA0 = 9, ΣA0² = 23, ΣA1 = ΣA1² = 3)
    # Grad-CAM weights, the mean gradient: (1.5·9/4, −0.5·3/4) = (3.375, −0.375)
    grad = np.maximum(3.375 * A0 - 0.375 * A1, 0)  # [[6.375, 9.75], [3.375, 9.75]]
    # XGrad-CAM weights Σ g·A / ΣA: (1.5·23/9, −0.5·3/3) = (23/6, −1/2)
    xgrad = np.maximum(23 / 6 * A0 - 0.5 * A1, 0)  # [[43/6, 11], [23/6, 11]]
    np.testing.assert_allclose(run("grad_cam", 1, model, layer="act").raw, grad, rtol=1e-5)
    np.testing.assert_allclose(run("xgrad_cam", 1, model, layer="act").raw, xgrad, rtol=1e-5)
    assert not np.allclose(grad, xgrad, rtol=0.05)
    # target 0: ∂y0/∂A0 = 0.5·A0, ∂y0/∂A1 = A1: Grad-CAM (9/8, 3/4), XGrad-CAM (23/18, 1)
    np.testing.assert_allclose(run("grad_cam", 0, model, layer="act").raw,
                               9 / 8 * A0 + 0.75 * A1, rtol=1e-5)
    np.testing.assert_allclose(run("xgrad_cam", 0, model, layer="act").raw,
                               23 / 18 * A0 + A1, rtol=1e-5)


def test_layer_cam():
    # target 1: relu(g) ⊙ A: (3/4)·A0 + 0·A1 = [[1.5, 2.25], [.75, 2.25]]
    np.testing.assert_allclose(run("layer_cam", 1).raw, 0.75 * A0, atol=1e-6)


def test_eigen_cam():
    # pixels as rows [A0, A1]: (2,1), (3,1), (1,0), (3,1); centred on the mean (2.25, .75):
    # (−.25,.25), (.75,.25), (−1.25,−.75), (.75,.25); their scatter matrix [[2.75, 1.25],
    # [1.25, .75]] has top eigenvalue λ = (3.5 + √10.25)/2 with eigenvector ∝ (1.25, λ − 2.75)
    lam = (3.5 + math.sqrt(10.25)) / 2
    v = np.array([1.25, lam - 2.75])
    v /= np.linalg.norm(v)
    centred = np.array([[-0.25, 0.25], [0.75, 0.25], [-1.25, -0.75], [0.75, 0.25]])
    expected = (centred @ v).reshape(2, 2)  # ≈ [[−.117, .784], [−1.452, .784]]
    np.testing.assert_allclose(run("eigen_cam", 1).raw, expected, atol=1e-5)


def test_score_cam():
    # masks (2×2 → 2×2 upsampling is the identity): (A0 − 1)/2 = [[.5, 1], [0, 1]] and
    # A1 = [[1, 1], [0, 1]]. X·M0 gives z0 = [[1, 3], [0, 3]], z1 = [[.5, 1], [0, 1]]:
    # y1 = 3·7/4 − 2.5/4 = 4.625. X·M1 gives z0 = [[2, 3], [0, 3]], z1 = A1: y1 = 3·2 − .75 = 5.25.
    w1 = math.exp(5.25) / (math.exp(4.625) + math.exp(5.25))
    expected = (1 - w1) * A0 + w1 * A1
    np.testing.assert_allclose(run("score_cam", 1, batch_size=1).raw, expected, rtol=1e-5)


def test_score_cam_scores_each_distinct_mask_once():
    model = tiny()
    model.module.fc = nn.Linear(5, 2, bias=False)
    calls = []

    def dup(m, a, o):  # A1 duplicated, A1 scaled and shifted (min-max normalisation makes its
        # mask A1's) and a constant channel: 5 channels, 3 distinct masks
        return torch.cat([o, o[:, 1:2], 2 * o[:, 1:2] + 1, torch.full_like(o[:, :1], 5.0)], 1)

    handles = [model.module.act.register_forward_hook(dup),
               model.module.fc.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))]
    try:
        cw.attribute(model, IMAGE, "score_cam", target=1, batch_size=64)
    finally:
        for h in handles:
            h.remove()
    assert calls[-1] == 3


def test_ablation_cam():
    # y1 = 6. Zero A0: y1 = −.75, weight (6 + .75)/6 = 1.125; zero A1: y1 = 6.75, weight −.125
    # raw = relu(1.125·A0 − .125·A1) = [[2.125, 3.25], [1.125, 3.25]]
    np.testing.assert_allclose(run("ablation_cam", 1, batch_size=1).raw, [[2.125, 3.25], [1.125, 3.25]], atol=1e-5)
    np.testing.assert_allclose(run("ablation_cam", 1, batch_size=2).raw, [[2.125, 3.25], [1.125, 3.25]], atol=1e-5)


def test_guided_grad_cam():
    # guided backprop (3/4 everywhere) × Grad-CAM [[1.25, 2], [.75, 2]] (2×2 → 2×2 is identity)
    expected = 0.75 * np.array([[1.25, 2], [0.75, 2]])
    np.testing.assert_allclose(run("guided_grad_cam", 1).raw, np.stack([expected] * 3), atol=1e-6)


# --------------------------------------------------------------------------- perturbation
def test_occlusion():
    # one pixel zeroed in every channel removes A_k[p] from each sum, so the drop in y1 is
    # (3·A0[p] − A1[p])/4 = [[1.25, 2], [.75, 2]]
    a = run("occlusion", 1, window=1, stride=1, batch_size=3)
    np.testing.assert_allclose(a.raw, np.stack([[[1.25, 2], [0.75, 2]]] * 3), atol=1e-6)
    # one 2×2 window covers everything: y1 drops from 6 to 0
    np.testing.assert_allclose(run("occlusion", 1, window=2, stride=1).raw, np.full((3, 2, 2), 6.0))


def test_window_starts_cover_the_edge_like_captum():
    assert window_starts(5, 2, 2) == [0, 2, 4]  # ceil(3/2) + 1 windows, the last one clipped
    assert window_starts(4, 2, 2) == [0, 2]


def test_rise():
    g = torch.Generator().manual_seed(0)
    masks = rise_masks(50, (8, 8), 2, 0.5, g)
    assert masks.shape == (50, 8, 8) and masks.min() >= 0 and masks.max() <= 1 + 1e-6
    # a model whose class probability never changes (zero classifier: p = 1/2 for both
    # classes) gets Σ_i ½·M_i/(N·p) ≈ ½·E[M]/p = ½ everywhere
    model = tiny()
    with torch.no_grad():
        model.module.fc.weight.zero_()
    a = run("rise", 1, model, n_masks=3000, cells=2, batch_size=500)
    assert a.raw.shape == (2, 2)
    np.testing.assert_allclose(a.raw, 0.5, atol=0.03)


class Halves(nn.Module):
    """8×8 input; logit 0 = 4·mean of the red channel over the left half (columns 0–3),
    logit 1 = 4·mean of the red channel over the right half (columns 4–7)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))

    def forward(self, x):
        red = self.conv(x)[:, 0]
        return 4 * torch.stack([red[:, :, :4].mean((1, 2)), red[:, :, 4:].mean((1, 2))], 1)


def halves():
    """Halves behind mean 0.5 / std 0.5: a white pixel is +1 in the network, black −1."""
    return cw.Model(Halves(), input_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, crop=1.0,
                    labels=["left", "right"])


WHITE = np.full((8, 8, 3), 255, dtype=np.uint8)


@pytest.mark.parametrize("target", [0, 1])
def test_rise_weighs_each_mask_by_the_targets_probability(target):
    """RISE (Petsiuk et al. 2018): Σ_i P_target(I ⊙ M_i) · M_i / (N · p), the masked copies
    showing the black baseline where M_i = 0. On the white image a pixel is +1 and black −1
    in the network, so the copy for mask M is 2M − 1 and the logits are 4·mean(2M − 1) over
    each half: the target's probability is σ(±8·(mean_right(M) − mean_left(M))). The same
    seeded masks (``rise_masks`` draws them as ``rise`` does) give the expected map."""
    n, cells, p, seed = 64, 2, 0.5, 3
    masks = rise_masks(n, (8, 8), cells, p, torch.Generator().manual_seed(seed)).double()
    right_minus_left = masks[:, :, 4:].mean((1, 2)) - masks[:, :, :4].mean((1, 2))
    sign = 1.0 if target == 1 else -1.0
    prob = torch.sigmoid(sign * 8 * right_minus_left)
    expected = (prob[:, None, None] * masks).sum(0) / (n * p)
    a = cw.attribute(halves(), WHITE, "rise", target=target, n_masks=n, cells=cells, p=p,
                     seed=seed, batch_size=16)
    np.testing.assert_allclose(a.raw, expected.numpy(), rtol=1e-5, atol=1e-6)
    # the masks and the target matter: the map is brighter on the target's half
    own, other = (a.raw[:, 4:], a.raw[:, :4]) if target == 1 else (a.raw[:, :4], a.raw[:, 4:])
    assert own.mean() > other.mean()


def test_integrated_gradients_default_black_baseline_is_normalised():
    # the default baseline is a black image as the network sees it: (0 − 0.5)/0.5 = −1, not 0.
    # Halves is linear: IG = (x − x′)·∂y1/∂x = (1 − (−1))·4/32 = 1/4 on the red channel of the
    # right half, 0 elsewhere; it sums to y1(white) − y1(black) = 4 − (−4) = 8
    a = cw.attribute(halves(), WHITE, "integrated_gradients", target=1, steps=4)
    expected = np.zeros((3, 8, 8))
    expected[0, :, 4:] = 0.25
    np.testing.assert_allclose(a.raw, expected, atol=1e-6)
    assert a.raw.sum() == pytest.approx(8.0, rel=1e-5)


def test_rise_is_reproducible_and_batching_invariant():
    a = run("rise", 1, n_masks=40, cells=2, batch_size=7, seed=5)
    b = run("rise", 1, n_masks=40, cells=2, batch_size=40, seed=5)
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-6)


# --------------------------------------------------------------------------- registry, errors
def test_methods_lists_every_issue_method():
    names = set(cw.methods())
    assert {"saliency", "gradient_x_input", "smoothgrad", "integrated_gradients", "guided_backprop",
            "deconvnet", "guided_grad_cam", "cam", "grad_cam", "grad_cam_pp", "xgrad_cam",
            "layer_cam", "score_cam", "ablation_cam", "eigen_cam", "occlusion", "rise"} <= names
    for name in names:
        spec = get_method(name)
        assert spec.help
        for p in spec.params:
            assert p.help and p.validate(p.default) == p.default


def test_outside_registration_is_a_one_liner():
    @register("test_constant", params=[Param("value", float, 1.0, (0.0, 5.0), "the value")], kind="other")
    def constant(ctx, value):
        return torch.full((2, 2), value)

    try:
        assert "test_constant" in cw.methods()
        a = run("test_constant", value=2.0)
        assert a.params == {"value": 2.0} and np.all(a.raw == 2.0)
    finally:
        unregister("test_constant")
    assert "test_constant" not in cw.methods()


def test_clear_errors():
    with pytest.raises(ValueError, match="did you mean 'grad_cam'"):
        run("gradcam")
    with pytest.raises(TypeError, match="did you mean 'steps'"):
        run("integrated_gradients", step=5)
    with pytest.raises(ValueError, match="out of range"):
        run("integrated_gradients", steps=1)
    with pytest.raises(ValueError, match="did you mean 'gausslegendre'"):
        run("integrated_gradients", rule="gauss-legendre")
    with pytest.raises(ValueError, match="does not read a layer"):
        cw.attribute(tiny(), IMAGE, "saliency", layer="act")
    with pytest.raises(ValueError, match="did you mean 'act'"):
        cw.attribute(tiny(), IMAGE, "grad_cam", layer="actt")
    with pytest.raises(ValueError, match="no class label"):
        run("saliency", target="ones")


# --------------------------------------------------------------------------- clean-up
def snapshot(module):
    return ([m.training for m in module.modules()], [p.requires_grad for p in module.parameters()],
            [p.detach().clone() for p in module.parameters()])


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert hook_count(module) == 0
    assert not torch._C._is_torch_function_mode_enabled()


FAST = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 3},
        "rise": {"n_masks": 4, "cells": 2}, "occlusion": {"window": 1, "stride": 1}}


@pytest.mark.parametrize("method", sorted(set(cw.methods()) - {"fixations"}))
def test_no_hook_left_and_model_unchanged_after_success_and_errors(method):
    model = tiny("relu_inplace")
    module = model.module
    module.train()
    module.conv.weight.requires_grad_(False)
    before = snapshot(module)
    run(method, 1, model, **FAST.get(method, {}))
    assert_unchanged(module, before)
    module.pool.armed = True  # the forward pass raises inside the method's hooks
    with pytest.raises(RuntimeError, match="boom"):
        run(method, 1, model, **FAST.get(method, {}))
    assert_unchanged(module, before)
    module.pool.armed = False
    stop = threading.Event()
    stop.set()
    params = FAST.get(method, {})
    if get_method(method).kind == "perturbation" or "batch_size" in get_method(method).defaults:
        with pytest.raises(Cancelled):
            cw.attribute(model, IMAGE, method, target=1, cancel=stop, **params)
        assert_unchanged(module, before)


def test_cancel_stops_between_batches_and_progress_callback_reports():
    seen = []
    stop = threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done >= 4:
            stop.set()

    with pytest.raises(Cancelled, match="cancelled"):
        run("rise", 1, n_masks=10, cells=2, batch_size=2, cancel=stop, progress=progress)
    assert seen == [(2, 10), (4, 10)]


def test_plot_draws_the_map(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    a = run("grad_cam", 1)
    artists = a.plot()
    np.testing.assert_allclose(artists["overlay"].get_array(), a.map)
    artists["overlay"].figure.savefig(tmp_path / "a.png")


def test_engine_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, cnnwidgets as cw; cw.methods(); "
            "assert 'matplotlib' not in sys.modules and 'ipywidgets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_automatic_progress_bar_shows_only_for_slow_runs(monkeypatch, capsys):
    """progress=None: a batched run that lasts past PROGRESS_DELAY shows a bar (even with two
    batches: SmoothGrad's 25 samples are 2 batches, seconds on a slow machine); a quick one
    prints nothing; progress=False never shows one."""
    import time

    from cnnwidgets.engine.attribution import core

    monkeypatch.setattr(core, "PROGRESS_DELAY", 0.2)
    x = torch.zeros(1, 3, 8, 8)

    def run(progress, pause):
        ctx = core.Context(tiny(), x, 0, None, "demo", progress=progress)
        for _ in ctx.batches(4, 2, "demo"):
            time.sleep(pause)
        return capsys.readouterr().err

    assert "demo" in run(None, 0.3)
    assert run(None, 0.0) == ""
    assert run(False, 0.3) == ""


def test_batches_shrink_to_the_memory_available_and_results_do_not_change(monkeypatch):
    """Where memory is short (a 2 GB Binder container), a batched method takes fewer images
    per pass — at most half the available memory at the model's per-image upper bound — and
    returns the same result; with memory to spare the batch size is the one asked for."""
    from cnnwidgets.engine import memory

    model = tiny()
    per_image = model.image_bytes()
    # Tiny at 2×2: conv 2×2×2, ReLU 2×2×2, pool 2×1×1, linear 2 → 4 bytes each
    assert per_image == 4 * (8 + 8 + 2 + 2)
    assert memory.fit_batch(16, per_image, available=10**12) == 16
    assert memory.fit_batch(16, per_image, available=per_image * 6) == 3  # half of 6 images
    assert memory.fit_batch(16, per_image, available=0) == 1
    sizes = []
    real = cw.engine.attribution.core.Context.batches

    def spy(self, total, batch_size, desc=None):
        for a, b in real(self, total, batch_size, desc):
            sizes.append(b - a)
            yield a, b

    monkeypatch.setattr(cw.engine.attribution.core.Context, "batches", spy)
    full = run("smoothgrad", n_samples=12, batch_size=16, progress=False)
    assert sizes == [12]
    sizes.clear()
    monkeypatch.setattr(memory, "available_bytes", lambda: per_image * 8)  # room for 4
    small = run("smoothgrad", n_samples=12, batch_size=16, progress=False)
    assert sizes == [4, 4, 4]
    np.testing.assert_allclose(small.raw, full.raw, rtol=1e-5, atol=1e-6)


def test_available_memory_is_read_from_this_system():
    from cnnwidgets.engine import memory

    import sys

    free = memory.available_bytes()  # Linux: /proc/meminfo and the container's limit
    if not sys.platform.startswith("linux"):
        assert free is None
        return
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    assert free is not None and 0 < free <= total
