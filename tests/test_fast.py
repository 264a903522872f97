"""The speed behind the primitives (engine/fast.py): the twin's tricks give the network's own
numbers, and the twin never runs in place of a module that carries a user's hook."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import fast
from cnnwidgets.engine.attribution import core
from cnnwidgets.engine.hooks import hook_count, restored

from conftest import assert_same_state, snapshot


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.bn = nn.BatchNorm2d(1, eps=1.0)
        with torch.no_grad():
            self.conv.weight.fill_(2.0)
            self.conv.bias.fill_(1.0)
            self.bn.running_mean.fill_(1.0)
            self.bn.running_var.fill_(3.0)
            self.bn.weight.fill_(4.0)
            self.bn.bias.fill_(0.5)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(1)


def test_hand_worked_fold():
    # bn(conv(x)) = 4 · (2x + 1 − 1) / √(3 + 1) + 0.5 = 4x + 0.5
    net = ConvBN().eval()
    twin = fast.twin(net)
    assert twin is not None
    convs = [m for m in twin.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    assert convs[0].weight.item() == pytest.approx(4.0) and convs[0].bias.item() == pytest.approx(0.5)
    x = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]]])
    assert torch.allclose(twin(x), torch.tensor([[0.5, 4.5, -7.5, 12.5]]))
    # the original network is untouched
    assert net.conv.weight.item() == 2.0 and isinstance(net.bn, nn.BatchNorm2d)


def _resnet_with_statistics():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():  # statistics far from (0, 1) so that folding is not an identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def test_resnet_twin_same_function_and_gradient():
    net = _resnet_with_statistics()
    before = snapshot(net)
    x = torch.randn(2, 3, 64, 64)
    with restored(net):
        twin = fast.twin(net)
        assert twin is not None
        assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ya, yb = net(xa), twin(xb)
        (ga,) = torch.autograd.grad(ya[:, 3].sum(), xa)
        (gb,) = torch.autograd.grad(yb[:, 3].sum(), xb)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5)
    assert float((ga - gb).norm() / ga.norm()) < 1e-5
    assert_same_state(net, before)
    assert hook_count(net) == 0


def test_twin_follows_in_place_updates():
    net = ConvBN().eval()
    x = torch.ones(1, 1, 1, 1)
    assert fast.twin(net)(x).item() == pytest.approx(4.5)
    with torch.no_grad():
        net.bn.running_mean.fill_(3.0)  # now 4 · (2 + 1 − 3) / 2 + 0.5 = 0.5
    assert fast.twin(net)(x).item() == pytest.approx(0.5)
    with torch.no_grad():
        net.conv.weight.mul_(2)  # 4 · (4 + 1 − 3) / 2 + 0.5 = 4.5
    assert fast.twin(net)(x).item() == pytest.approx(4.5)
    net.conv.bias.data = torch.tensor([3.0])  # new storage: 4 · (4 + 3 − 3) / 2 + 0.5 = 8.5
    assert fast.twin(net)(x).item() == pytest.approx(8.5)
    net.conv.weight.data.mul_(0.5)  # through .data: no version bump, so say so with forget()
    fast.forget(net)  # 4 · (2 + 3 − 3) / 2 + 0.5 = 4.5
    assert fast.twin(net)(x).item() == pytest.approx(4.5)


class PadConv(nn.Conv2d):
    """A convolution subclass outside torch.nn (as EfficientNet's static 'same' padding)."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_convolution_subclass_is_folded():
    torch.manual_seed(1)
    net = nn.Sequential(PadConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    twin = fast.twin(net)
    assert twin is not None and not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(net(x), twin(x), atol=1e-5)


class StaticSame(nn.Conv2d):
    """EfficientNet's pattern: a ZeroPad2d child applied before a plain convolution."""

    def __init__(self, *args, pad=(1, 1, 1, 1), **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return super().forward(self.static_padding(x))


class DynamicSame(nn.Conv2d):
    """TF 'same' padding computed from the input size (stride 2: odd and even sizes differ)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(1)  # a decoy: right for odd sizes only

    def forward(self, x):
        h = x.shape[-1]
        total = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
        return super().forward(F.pad(x, (total // 2, total - total // 2) * 2))


@pytest.mark.parametrize("conv, plain", [
    (StaticSame(3, 4, 3), True),
    (StaticSame(3, 4, 3, padding=1, pad=(2, 2, 2, 2)), True),  # both paddings add up
    (StaticSame(3, 4, 3, stride=2, pad=(0, 1, 0, 1)), False),  # asymmetric: kept
    (DynamicSame(3, 4, 3, stride=2), False),
    (PadConv(3, 4, 3), False),  # pads in forward (no child): left as it is
])
def test_symmetric_static_padding_goes_into_the_convolution(conv, plain):
    torch.manual_seed(2)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    twin = fast.twin(net)
    convs = [m for m in twin.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and (type(convs[0]) is nn.Conv2d) == plain
    if plain:
        left, right, top, bottom = conv.static_padding.padding
        assert convs[0].padding == (conv.padding[0] + top, conv.padding[1] + left)
    for size in (9, 10, 224):  # the same function at any input size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.allclose(net(x), twin(x), rtol=1e-5, atol=1e-5)


class Untraceable(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return y.flatten(1)


class SharedOutput(ConvBN):
    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y) + y).flatten(1)  # the conv output is also used beside the batch norm


def test_falls_back_to_the_original():
    # None: the network runs itself
    assert fast.twin(Untraceable().eval()) is None
    assert fast.twin(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Flatten()).eval()) is None
    assert fast.twin(SharedOutput().eval()) is None  # folding would change the other use
    assert fast.twin(ConvBN().train()) is None  # batch statistics: not an affine map


def test_attribution_through_the_twin_matches_the_original(monkeypatch):
    model = cw.Model(_resnet_with_statistics(), input_size=(64, 64), labels=[str(i) for i in range(10)])
    image = cw.sample_image("cat")
    for method, kw in [("saliency", {}), ("integrated_gradients", {"steps": 4}),
                       ("guided_backprop", {}), ("deconvnet", {}),
                       ("score_cam", {"layer": "layer4", "progress": False})]:
        quick = cw.attribute(model, image, method, target=3, **kw).raw
        with monkeypatch.context() as m:
            m.setattr(fast, "twin", lambda module: None)
            slow = cw.attribute(model, image, method, target=3, **kw).raw
        assert np.linalg.norm(quick - slow) / np.linalg.norm(slow) < 1e-5, method
    with restored(model.module):
        assert fast.twin(model.module) is not None  # the twin did run


# ----------------------------------------------------------------- the linear head
class Stem(nn.Module):
    """conv → BN → ReLU(inplace) → pool → linear: a first layer the input goes into alone."""

    def __init__(self, conv=None, inplace=True):
        super().__init__()
        self.conv = conv or nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.relu(self.bn(self.conv(x))), 1).flatten(1))


class TwiceUsedInput(Stem):
    def forward(self, x):
        return super().forward(x) + x.mean()  # the input is used outside the first layer


class SquaredConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) ** 2  # a "convolution" that is not affine in its input


def _with_statistics(net):
    torch.manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _affine_stem():
    """Stem with a 1×1 convolution 2x + 1 (weight 2, bias 1; its BN folds away) and fc weight 3."""
    net = Stem(nn.Conv2d(1, 1, 1))
    net.bn = nn.BatchNorm2d(1, eps=0.0)
    net.fc = nn.Linear(1, 1)
    with torch.no_grad():
        net.conv.weight.fill_(2.0)
        net.conv.bias.fill_(1.0)
        net.fc.weight.fill_(3.0)
    return net.eval()


def test_head_hand_worked():
    # one 1×1 convolution, weight 2 and bias 1, BN folded away, then ReLU: the score is
    # fc.weight · mean(relu(2x + 1)); where 2x + 1 > 0 the gradient is 2 · 3 / (H·W) = 1.5,
    # where 2x + 1 < 0 it is 0
    net = _affine_stem()
    twin = fast.twin(net)
    head = fast._head_of(twin)
    assert head is not None and head.act is net.relu and head.pool is None
    assert not any(n.target == "relu" for n in twin.graph.nodes)  # taken into the head
    assert head.fresh is False  # nothing after the head works in place
    x = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]]]).repeat(5, 1, 1, 1)
    with head.capture() as box:
        s = twin(x)[:, 0]
    assert len(box) == 1 and box[0].value.is_leaf and box[0].indices is None
    assert torch.equal(box[0].value[0, 0], torch.tensor([[1.0, 3.0], [0.0, 7.0]]))  # relu(2x+1)
    (g,) = torch.autograd.grad(s.sum(), box[0].value)
    total = head.add(None, box[0], g)  # at the convolution's output, summed over 5 inputs
    assert torch.allclose(total, 5 * torch.tensor([[[[0.75, 0.75], [0.0, 0.75]]]]))
    gx = head.transpose(total, x.shape)  # × conv weight 2
    assert torch.allclose(gx, 5 * torch.tensor([[[[1.5, 1.5], [0.0, 1.5]]]]))
    assert torch.allclose(twin(x), net(x))  # outside capture: the network as it was


class PoolStem(Stem):
    """ResNet's stem: conv → BN → ReLU → 3×3 max-pool, stride 2."""

    def __init__(self, conv=None, high=False):
        super().__init__(conv)
        self.relu = nn.ReLU6(inplace=True) if high else nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        y = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1) + y[:, :, :2, :2].mean((2, 3)))


def test_head_takes_relu_and_pooling():
    net = _with_statistics(PoolStem())
    head = fast._head_of(fast.twin(net))
    assert head.act is net.relu and head.pool is net.pool
    twin = fast.twin(net)
    x = torch.randn(3, 3, 16, 16)
    with head.capture() as box:
        twin(x)
    assert box[0].value.shape == (3, 4, 4, 4) and box[0].shape == (3, 4, 8, 8)
    assert box[0].indices is not None


@pytest.mark.parametrize("kind", ["conv", "pad-conv", "pool", "pool-relu6"])
def test_head_sum_equals_sum_of_input_gradients(kind):
    torch.manual_seed(2)
    conv = PadConv(3, 4, 3, stride=2) if kind == "pad-conv" else nn.Conv2d(3, 4, 7, 2, 3)
    net = _with_statistics(PoolStem(conv, high=kind == "pool-relu6") if "pool" in kind
                           else Stem(conv))
    if kind == "pool-relu6":
        with torch.no_grad():  # values above 6 too, where ReLU6 passes no gradient
            net.conv.weight.mul_(20)
    twin = fast.twin(net)
    head = fast._head_of(twin)
    assert head is not None
    x = torch.randn(6, 3, 17, 17)
    w = torch.rand(6)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((net(xr)[:, 1] * w).sum(), xr)  # row i: wᵢ ∂sᵢ/∂xᵢ
    expected = g.sum(0, keepdim=True)
    total = None
    for part in (slice(0, 2), slice(2, 6)):  # two batches, weighted, added up
        with head.capture() as box:
            s = twin(x[part])[:, 1]
        assert len(box) == 1
        (gz,) = torch.autograd.grad(s.sum(), box[0].value)
        total = head.add(total, box[0], gz, w[part])
    got = head.transpose(total, x.shape)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_no_head_where_the_input_is_not_only_a_convolution():
    assert fast._head_of(fast.twin(_with_statistics(TwiceUsedInput()))) is None
    squared = _with_statistics(Stem(SquaredConv(3, 4, 3, padding=1)))
    assert fast.twin(squared) is not None  # still folded ...
    assert fast._head_of(fast.twin(squared)) is None  # ... but its first layer is not affine
    assert not fast._head_of(fast.twin(_with_statistics(Stem(inplace=False)))).fresh


def test_head_capture_is_per_thread():
    import threading

    net = _with_statistics(Stem())
    twin = fast.twin(net)
    head = fast._head_of(twin)
    x = torch.randn(2, 3, 9, 9)
    other = {}

    def run():  # a forward pass on another thread while the main thread captures
        other["y"] = twin(x)

    with head.capture() as box:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert box == [] and torch.allclose(other["y"], net(x), atol=1e-5)
    with head.capture() as box:
        twin(x)
    assert len(box) == 1
    assert torch.allclose(twin(x), net(x), atol=1e-5)  # outside capture: the plain network


def test_grad_sum_matches_per_input_gradients(monkeypatch):
    # SmoothGrad and Integrated Gradients through the head == without it
    model = cw.Model(_resnet_with_statistics(), input_size=(64, 64), labels=[str(i) for i in range(10)])
    image = cw.sample_image("cat")
    assert fast._head_of(fast.twin(model.module)) is not None
    for method, kw in [("smoothgrad", {"n_samples": 5, "batch_size": 2}),
                       ("integrated_gradients", {"steps": 5, "batch_size": 3})]:
        quick = cw.attribute(model, image, method, target=3, **kw).raw
        with monkeypatch.context() as m:
            m.setattr(fast, "ENABLED", fast.ENABLED - {"head"})
            slow = cw.attribute(model, image, method, target=3, **kw).raw
        assert np.linalg.norm(quick - slow) / np.linalg.norm(slow) < 1e-5, method


def test_batch_sum_any_layout():
    t = torch.randn(5, 3, 7, 9)
    w = torch.rand(5)
    for u in (t, t.contiguous(memory_format=torch.channels_last), t[:, :, ::2]):
        assert fast.batch_sum(u).shape == (1, *u.shape[1:])
        assert torch.allclose(fast.batch_sum(u), u.sum(0, keepdim=True), atol=1e-5)
        assert torch.allclose(fast.batch_sum(u, w), (u * w.view(-1, 1, 1, 1)).sum(0, keepdim=True),
                              atol=1e-5)


class PackNet(nn.Module):
    """conv → BN → ReLU, conv → BN → ReLU6, a conv without BN or activation, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8), \
            nn.ReLU6()
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        return self.fc(self.c3(x).mean((2, 3)))


def _pack_net():
    torch.manual_seed(3)
    net = PackNet().eval()
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        net.c2.weight.mul_(8.0)  # values above 6: the ReLU6 clips
    return net


@pytest.mark.skipif(fast._PACK_OPS is None, reason="this torch has no oneDNN operators")
def test_packed_convolutions_compute_the_same_without_gradients():
    net = _pack_net()
    # net.c1 is the head's convolution (the input's only user); the other two are packed,
    # c2 with its ReLU6 fused in
    twin = fast.twin(net)
    packed = [m for m in twin.modules() if isinstance(m, fast.Packed)]
    assert len(packed) == 2
    assert [type(p.act).__name__ for p in packed] == ["ReLU6", "NoneType"]
    assert packed[1].conv is net.c3  # not folded: the network's own module, shared
    for n, layout in ((1, torch.contiguous_format), (5, torch.channels_last)):
        x = torch.randn(n, 3, 12, 12).contiguous(memory_format=layout)
        with torch.no_grad():
            assert torch.allclose(twin(x), net(x), rtol=1e-5, atol=1e-5)
        assert all(p._packed is not None for p in packed)  # the fast path ran
    # a weight changed in place (an optimiser step) is seen: the packed copy is redone
    with torch.no_grad():
        net.c3.weight.mul_(-2.0)
        assert torch.allclose(fast.twin(net)(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(fast._PACK_OPS is None, reason="this torch has no oneDNN operators")
def test_packed_convolutions_gradients_hooks_and_rules():
    """Gradients through packed convolutions equal the network's: plain, and under the guided
    and DeconvNet rules."""
    net = _pack_net()
    twin = fast.twin(net)
    p2, p3 = [m for m in twin.modules() if isinstance(m, fast.Packed)]
    x = torch.randn(2, 3, 12, 12)
    calls = []
    for p in (p2, p3):
        real = p.fast
        p.fast = lambda t, real=real, p=p: calls.append((p is p2, real(t))) or real(t)

    def grads(model):
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(xg)[:, 1].sum(), xg)[0]

    # the folded convolution's weights need no gradient: the packed forward, then autograd's
    # own backward rules (activation mask, convolution backward-data); the network's own c3
    # has weights that require gradients: it runs as a module
    assert torch.allclose(grads(twin), grads(net), rtol=1e-4, atol=1e-6)
    assert calls == [(True, True), (False, False)]
    # inside input_only (how attribution runs) c3 takes the packed path too
    calls.clear()
    with core.input_only(net):
        assert torch.allclose(grads(twin), grads(net), rtol=1e-4, atol=1e-6)
    assert calls == [(True, True), (False, True)]
    # a ReLU rule applies to the fused activation too (packed forward, the rule's backward)
    from cnnwidgets.engine.relu_rules import relu_rule
    plain = grads(net)
    for rule in ("guided", "deconvnet"):
        calls.clear()
        with core.input_only(net):
            with relu_rule(rule) as mode:
                on_twin = grads(twin)
            with relu_rule(rule) as mode_net:
                on_net = grads(net)
        assert calls[0] == (True, True) and mode.calls == mode_net.calls == 2
        assert torch.allclose(on_twin, on_net, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(on_net, plain, rtol=1e-2, atol=1e-4)  # the rule mattered
    assert hook_count(net) == 0


# ------------------------------------------------- in-place activations
class InPlaceAfterConv(nn.Module):
    """A convolution with no ReLU after it, then an in-place activation (torchvision's
    EfficientNet: Conv → BN → SiLU(inplace=True))."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3)
        self.c1 = nn.Conv2d(4, 4, 3, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.act = nn.SiLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.b1(self.c1(self.c0(x)))).mean((2, 3)))


def test_in_place_activation_after_a_packed_convolution_keeps_gradients():
    # the packed convolution used to keep its output for a backward pass that never reads it,
    # and autograd refused the gradient once SiLU(inplace=True) had changed that output
    net = _with_statistics(InPlaceAfterConv())
    twin = fast.twin(net)
    x = torch.randn(2, 3, 10, 10)
    with core.input_only(net):
        g = [torch.autograd.grad(m(xg)[:, 0].sum(), xg)[0]
             for m, xg in ((twin, x.clone().requires_grad_(True)),
                           (net, x.clone().requires_grad_(True)))]
    assert torch.allclose(g[0], g[1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the user's hooks
OFF = {"channel": 5}  # the channel the user's hook zeroes (the user may change it)


class ChannelOff(nn.Module):
    """What the user's hook below does, built into the network."""

    def forward(self, t):
        return channel_off(t)


def channel_off(t):
    keep = torch.ones(t.shape[1], dtype=t.dtype, device=t.device)
    keep[OFF["channel"]] = 0
    return t * keep.view(1, -1, 1, 1)


def test_a_user_hook_is_part_of_the_network():
    """A forward hook on layer3 that zeroes a channel: every method explains the network with
    the hook's change (as the same network with the change built in), and the hook sees real
    tensors, once per forward pass — never a torch.fx Proxy at tracing time (which also froze
    the hook's effect into a traced twin)."""
    import copy

    net = _resnet_with_statistics()
    built_in = copy.deepcopy(net)
    built_in.layer3 = nn.Sequential(built_in.layer3, ChannelOff())
    labels = [str(i) for i in range(10)]
    hooked, reference = (cw.Model(m, input_size=(64, 64), labels=labels) for m in (net, built_in))
    image = cw.sample_image("cat")
    seen = []
    handle = net.layer3.register_forward_hook(lambda m, a, out: seen.append(out) or channel_off(out))
    # (method, parameters, images the network sees: the hook's batch sizes add up to it)
    cases = [("saliency", {}, 1), ("smoothgrad", {"n_samples": 4, "batch_size": 2}, 4),
             ("integrated_gradients", {"steps": 4, "batch_size": 2}, 4),
             ("occlusion", {"window": 32, "stride": 32, "batch_size": 2}, 4 + 1),
             ("score_cam", {"layer": "layer4"}, None)]
    try:
        hooked.layer_info()  # the layer index's dry run: one pass, before counting
        seen.clear()
        for i, (method, kw, images) in enumerate(cases):
            OFF["channel"] = (5, 7)[i % 2]  # the hook changes between calls
            got = cw.attribute(hooked, image, method, target=3, progress=False, **kw)
            want = cw.attribute(reference, image, method, target=3, progress=False, **kw)
            np.testing.assert_allclose(got.raw, want.raw, rtol=1e-4,
                                       atol=1e-5 * np.abs(want.raw).max(), err_msg=method)
            assert seen and all(type(t) is torch.Tensor for t in seen), method
            if images is not None:
                assert sum(t.shape[0] for t in seen) == images, method
            seen.clear()
        heat = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
        curves = [cw.metrics.deletion(m, image, heat, target=3, steps=4, batch_size=5)
                  for m in (hooked, reference)]
        np.testing.assert_allclose(curves[0].scores, curves[1].scores, rtol=1e-4, atol=1e-7)
        assert [t.shape[0] for t in seen] == [5]  # 4 steps + the image itself, one pass
    finally:
        handle.remove()
        OFF["channel"] = 5
    assert hook_count(net) == 0


def test_which_hooks_keep_the_twin_from_running():
    import threading

    from cnnwidgets.engine.hooks import this_thread

    net = _resnet_with_statistics()
    assert fast.twin(net) is not None
    calls = []

    def hook(m, a, out):
        calls.append(type(out))

    # anyone's hook at any depth, or for every module: the network runs itself, untraced
    fresh = _resnet_with_statistics()
    for module in (fresh.layer3, fresh.layer3[0].conv1, fresh):
        h = module.register_forward_hook(hook)
        try:
            assert fast.twin(fresh) is None and calls == []
        finally:
            h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert fast.twin(net) is None
    finally:
        h.remove()
    assert calls == []
    # cnnwidgets' own hooks answer only the thread that registered them: another thread's
    # leave this thread's twin running; this thread's own (a layer tap) must fire
    registered, done = threading.Event(), threading.Event()

    def other():
        handle = net.layer3.register_forward_hook(this_thread(hook))
        registered.set()
        done.wait(60)
        handle.remove()

    t = threading.Thread(target=other)
    t.start()
    try:
        registered.wait(60)
        assert hook_count(net) == 1 and fast.twin(net) is not None
        with core.tap(net, "layer3"):
            assert fast.twin(net) is None
            net(torch.zeros(1, 3, 32, 32))
    finally:
        done.set()
        t.join()
    assert fast.twin(net) is not None and calls == []


# ------------------------------------------------------------------ the split at a layer
class Crossing(nn.Module):
    """conv1 → relu → conv2, plus a residual from conv1's output that crosses conv2, then a
    mean and ``view(batch of the input, -1)`` (EfficientNet's head reads the batch size off
    the input: a batch of one does not broadcast through it)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 1)  # reads the red channel only
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:, 0, 0, 0] = torch.tensor([1.0, -1.0])
            self.conv1.bias.copy_(torch.tensor([0.0, 1.0]))
            self.conv2.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(self.relu(a)) + a
        return self.fc(b.mean((2, 3)).view(x.size(0), -1))


def test_split_hand_worked():
    # x = 1 everywhere (1×1×2×2): a = (1, 0); replacing conv2's output by v: b = v + a,
    # scores = fc(mean(b)) = (m0, m0 + 2·m1) with m = mean(v) + (1, 0)
    net = Crossing().eval()
    model = cw.Model(net, mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(2, 2),
                     labels=["p", "q"])
    x = torch.ones(1, 3, 2, 2)
    values = torch.stack([torch.full((2, 2, 2), 3.0), torch.zeros(2, 2, 2)])
    values[1, 1] = 5.0
    with restored(net):
        got = fast.scores_from_layer(model, "conv2", x, values)
    # copy 0: m = (4, 3) → (4, 10); copy 1: m = (1, 5) → (1, 11)
    torch.testing.assert_close(got, torch.tensor([[4.0, 10.0], [1.0, 11.0]]))
    # the network itself cannot broadcast a batch of one through view(x.size(0), -1)
    with pytest.raises(RuntimeError), core.tap(net, "conv2", replace=lambda t: values):
        net(x)


@pytest.mark.parametrize("arch, layers", [
    ("resnet18", ["layer4", "avgpool:input", "layer3.1.conv1", "layer2"]),
    ("efficientnet_lite0", [None, "_blocks.10._project_conv", "_bn1"]),
])
def test_split_gives_the_networks_own_scores(arch, layers):
    """From any layer: the copies' scores equal the whole network run on every copy with the
    layer's value replaced (residual branches crossing the layer included)."""
    import torchvision

    if arch == "resnet18":
        torch.manual_seed(0)
        model = cw.Model(torchvision.models.resnet18(weights=None), input_size=(64, 64))
    else:
        model = cw.load_model(arch)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, *model.input_size, generator=gen)
    for layer in layers:
        layer = layer or core.default_layer(model)
        with restored(model.module), torch.no_grad():
            with core.tap(model.module, layer) as box:
                model.scores(x)
            a = box["value"]
            values = a.expand(3, *a.shape[1:]).clone()
            values[0, 0] = 0
            values[1] *= 2
            got = fast.scores_from_layer(model, layer, x, values)
            with core.tap(model.module, layer, replace=lambda t: values):
                want = model.scores(x.expand(3, *x.shape[1:]))
        assert got is not None, layer
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert hook_count(model.module) == 0


def test_no_split_for_a_hooked_network_or_a_layer_run_twice():
    net = Crossing().eval()
    model = cw.Model(net, mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(2, 2))
    x, values = torch.ones(1, 3, 2, 2), torch.zeros(2, 2, 2, 2)
    handle = net.conv2.register_forward_hook(lambda *a: None)
    try:
        with restored(net):
            assert fast.scores_from_layer(model, "conv2", x, values) is None
    finally:
        handle.remove()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x)).flatten(1)

    twice = cw.Model(Twice().eval(), mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(2, 2))
    with restored(twice.module):
        assert fast.scores_from_layer(twice, "conv", x, torch.zeros(2, 3, 2, 2)) is None


def test_ablation_cam_is_the_same_with_and_without_the_split(monkeypatch):
    model = cw.load_model("efficientnet_lite0")
    image = cw.sample_image("cat")
    layer = "_blocks.10._project_conv"  # 112 channels: 112 copies
    with_split = cw.attribute(model, image, "ablation_cam", layer=layer, batch_size=56)
    monkeypatch.setattr(fast, "ENABLED", fast.ENABLED - {"suffix"})
    calls = []
    real = core.Context.logits
    monkeypatch.setattr(core.Context, "logits",
                        lambda self, batch: calls.append(batch.shape[0]) or real(self, batch))
    without = cw.attribute(model, image, "ablation_cam", layer=layer, batch_size=56)
    assert calls[-1] == 56  # the whole network ran on every copy
    np.testing.assert_allclose(with_split.raw, without.raw, rtol=1e-4,
                               atol=1e-4 * float(np.abs(without.raw).max()))
