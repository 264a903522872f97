"""``attribution.raw`` agrees with Captum and pytorch-grad-cam on torchvision ResNet-18 and
VGG-11 (random weights, fixed seed, 48 px input to keep CI fast), and on the default model,
EfficientNet-Lite0 with its ImageNet weights, at 224 px and its default layer (the end of this
file). Every comparison bounds both the relative L2 error and the largest error relative to the
largest reference value: an L2 norm over 150,528 values hides one wrong border row."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import fast
from cnnwidgets.engine.hooks import restored
from cnnwidgets.engine.attribution import default_layer

captum = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.ablation_layer import AblationLayer  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SIZE = 48
TARGET = 7
# layer for gradient CAMs, layer with few channels for Score-CAM / Ablation-CAM (one forward each)
LAYERS = {"resnet18": ("layer3", "layer1"), "vgg11": ("features.14", "features.1")}


@pytest.fixture(scope="module", params=["resnet18", "vgg11"])
def net(request):
    import torchvision

    torch.manual_seed(0)
    module = getattr(torchvision.models, request.param)(weights=None).eval()
    model = cw.Model(module, input_size=(SIZE, SIZE), name=request.param)
    x, _ = model.prepare(cw.sample_image("cat"))
    return request.param, model, x


TOL = 1e-4  # float32 rounding, both measures


def errors(ours, theirs) -> tuple[float, float]:
    """``(relative L2 error, max-abs error / max |reference|)`` of ``ours`` against ``theirs``."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours - theirs)
    return (float(np.linalg.norm(diff) / max(np.linalg.norm(theirs), 1e-30)),
            float(diff.max() / max(np.abs(theirs).max(), 1e-30)))


def assert_agrees(ours, theirs, what: str = "", tol=(TOL, TOL)) -> None:
    """Both error measures of :func:`errors` below their tolerances (relative L2, max-abs /
    max); the message gives both, and ``pytest -s`` prints them."""
    assert np.abs(np.asarray(theirs)).max() > 0, f"{what}: the reference is all zero"
    l2, peak = errors(ours, theirs)
    print(f"{what}: relative L2 {l2:.1e}, max-abs / max {peak:.1e}")
    assert l2 < tol[0] and peak < tol[1], (
        f"{what}: relative L2 error {l2:.2e} (tolerance {tol[0]:g}), max-abs error / "
        f"max |reference| {peak:.2e} (tolerance {tol[1]:g})")


def same_sign(mine, projection):
    """A principal component's sign is arbitrary: ``projection`` or ``-projection``, whichever
    is nearer ``mine``."""
    projection = np.asarray(projection)
    flip = errors(mine, -projection)[0] < errors(mine, projection)[0]
    return -projection if flip else projection


def ours(model, method, **kw):
    return cw.attribute(model, cw.sample_image("cat"), method, target=TARGET, **kw).raw


# --------------------------------------------------------------------------- Captum
def test_saliency_and_gradient_x_input(net):
    name, model, x = net
    theirs = captum.Saliency(model.module).attribute(x.clone(), target=TARGET)[0].numpy()
    assert_agrees(ours(model, "saliency"), theirs, name)
    theirs = captum.InputXGradient(model.module).attribute(x.clone().requires_grad_(), target=TARGET)
    assert_agrees(ours(model, "gradient_x_input"), theirs[0].detach().numpy(), name)


def test_integrated_gradients(net):
    name, model, x = net
    ig = captum.IntegratedGradients(model.module)
    theirs = ig.attribute(x.clone(), baselines=0.0, target=TARGET, n_steps=6,
                          method="gausslegendre")[0].detach().numpy()
    mine = ours(model, "integrated_gradients", steps=6, baseline="zeros", batch_size=4)
    assert_agrees(mine, theirs, name)


def test_guided_backprop_and_deconvnet(net):
    name, model, x = net
    theirs = captum.GuidedBackprop(model.module).attribute(x.clone(), target=TARGET)[0].detach().numpy()
    assert_agrees(ours(model, "guided_backprop"), theirs, name)
    theirs = captum.Deconvolution(model.module).attribute(x.clone(), target=TARGET)[0].detach().numpy()
    assert_agrees(ours(model, "deconvnet"), theirs, name)


def test_grad_cam_vs_captum_layer_grad_cam(net):
    name, model, x = net
    layer = LAYERS[name][0]
    module = dict(model.module.named_modules())[layer]
    theirs = captum.LayerGradCam(model.module, module).attribute(
        x.clone(), target=TARGET, relu_attributions=True)[0, 0].detach().numpy()
    assert_agrees(ours(model, "grad_cam", layer=layer), theirs, name)


def test_guided_grad_cam_vs_captum(net):
    # ours: one forward pass, two backward passes with different ReLU rules; Captum: guided
    # backprop and layer Grad-CAM as two separate passes
    name, model, x = net
    layer = LAYERS[name][0]
    module = dict(model.module.named_modules())[layer]
    theirs = captum.GuidedGradCam(model.module, module).attribute(
        x.clone(), target=TARGET, interpolate_mode="bilinear")[0].detach().numpy()
    assert np.abs(theirs).max() > 0
    assert_agrees(ours(model, "guided_grad_cam", layer=layer), theirs, name)


def test_occlusion(net):
    name, model, x = net
    theirs = captum.Occlusion(model.module).attribute(
        x.clone(), sliding_window_shapes=(3, 20, 20), strides=(3, 12, 12), baselines=0.0,
        target=TARGET)[0].detach().numpy()
    mine = ours(model, "occlusion", window=20, stride=12, baseline="zeros", batch_size=20)
    assert_agrees(mine, theirs, name)


# --------------------------------------------------------------------------- pytorch-grad-cam
def pgc_raw(cls, net, layer, x, target=TARGET, **kw):
    """pytorch-grad-cam's map before its min-max scaling and resizing (its own steps:
    forward with hooks, backward, get_cam_image, then ReLU) for ``net``'s ``layer`` (a name
    or the module itself)."""
    module = dict(net.named_modules())[layer] if isinstance(layer, str) else layer
    cam = cls(model=net, target_layers=[module], **kw)
    try:
        targets = [ClassifierOutputTarget(target)]
        # as its __call__: the input requires grad (the parameters may not)
        outputs = cam.activations_and_grads(x.clone().requires_grad_(cam.uses_gradients))
        if cam.uses_gradients:
            net.zero_grad()
            targets[0](outputs[0]).backward(retain_graph=True)
        (acts,) = [a.numpy() for a in cam.activations_and_grads.activations]  # the layer ran once
        grads = (cam.activations_and_grads.gradients[0].numpy()
                 if cam.activations_and_grads.gradients else None)
        raw = cam.get_cam_image(x.clone(), module, targets, acts, grads, False)[0]
    finally:
        cam.activations_and_grads.release()
    net.zero_grad(set_to_none=True)
    return raw


@pytest.mark.parametrize("method,cls", [("grad_cam_pp", "GradCAMPlusPlus"),
                                        ("xgrad_cam", "XGradCAM"), ("layer_cam", "LayerCAM"),
                                        ("grad_cam", "GradCAM")])
def test_gradient_cams(net, method, cls):
    name, model, x = net
    layer = LAYERS[name][0]
    theirs = np.maximum(pgc_raw(getattr(pgc, cls), model.module, layer, x), 0)
    assert_agrees(ours(model, method, layer=layer), theirs, name)


@pytest.mark.parametrize("method,cls", [("score_cam", "ScoreCAM"), ("ablation_cam", "AblationCAM")])
def test_perturbation_cams(net, method, cls):
    name, model, x = net
    layer = LAYERS[name][1]
    theirs = np.maximum(pgc_raw(getattr(pgc, cls), model.module, layer, x), 0)
    assert_agrees(ours(model, method, layer=layer, batch_size=32), theirs, name)


def test_eigen_cam(net):
    name, model, x = net
    layer = LAYERS[name][0]
    theirs = pgc_raw(pgc.EigenCAM, model.module, layer, x)
    mine = ours(model, "eigen_cam", layer=layer)
    assert_agrees(mine, same_sign(mine, theirs), name)


# --------------------------------------------------------------------------- EfficientNet-Lite0
# The default model with its ImageNet weights, at 224 px and its default CAM layer (the input of
# the global pooling: its last ReLU6 module is shared with the stem, so no module outputs that
# tensor alone), for two targets. Ours runs the gradient and perturbation methods on the folded
# twin (cnnwidgets.engine.fast): batch norms folded, the static "same" padding made the
# convolution's own where it is symmetric, convolutions + ReLU6 packed for oneDNN with their own
# backward pass (ReLU rules included), the stem with its ReLU6 as a Head (Integrated Gradients
# adds the gradients up at its output and takes them through it once). The peers run the
# network as written. Layer-tapped passes (the gradient CAMs, guided Grad-CAM, Ablation-CAM)
# run the network as written on both sides.
#
# ReLU6 under guided backprop / DeconvNet: Captum overrides the backward pass of ``nn.ReLU``
# modules only, so on the unchanged network (``nn.ReLU6`` is not an ``nn.ReLU``) its
# GuidedBackprop and Deconvolution return the plain gradient — a difference by design, not an
# error of either side. The peer therefore runs a copy with every ReLU6 module replaced by
# ``ReLU6Rule``: the same function, an ``nn.ReLU`` subclass, so that Captum applies its rule
# there too. Its rule is relu(grad_input) for guided backprop, where grad_input = 1[0 < f < 6]·R
# is autograd's ReLU6 backward, and relu(R) for DeconvNet: the rules of
# cnnwidgets.engine.relu_rules. Likewise pytorch-grad-cam's Ablation-CAM sets an ablated
# channel to min(A) − 1e7 where the layer has negative values (its own choice, as its source
# says), the paper and ours to 0: the peer gets an ablation layer that sets it to 0.
#
# The plain input gradient (saliency, gradient × input, Integrated Gradients) of this network
# is discontinuous at ReLU6's kinks, and a few of its 6.2 million units sit within float32
# rounding of a kink on the cat photo (in float64, 3 within 1e-6 of 0 or 6): two correct
# float32 computations differ where one of them lands on the other side of one. The plain
# gradient adds large terms of both signs, so one flipped unit shows: Captum's float32 saliency
# is 4.0e-3 (relative L2) / 1.4e-2 (max-abs / max) off its float64 one for the top-1 and
# 1.2e-2 / 5.0e-2 for OTHER_CLASS (classes 1, 281, 728: up to 6.9e-3 / 3.6e-2); nudging the
# input by 1e-7 in float64 moves the top-1 saliency by 1.2e-4 / 6.8e-4. (Guided backprop and
# DeconvNet add non-negative terms: ~1e-6.) So every input-gradient method is compared with
# Captum on a float64 copy of the network, and the plain-gradient ones twice: ours on that
# float64 network (the folded twin and its Head; packing is float32-only) to TOL, and ours on
# the default float32 model (the packed path) to KINKS — a bound on float32 rounding at the
# kinks (the largest seen above, with room for another CPU's rounding), not on a difference
# between methods. Ours in float32 measured at most 1.4e-3 / 6.6e-3 (Integrated Gradients,
# top-1).
#
# Kept lean for CI (2 cores): IG with 4 steps, occlusion with 9 windows, Score-CAM and
# Ablation-CAM at the first block's output (16 channels at 112 px) instead of the default
# layer's 1,280 channels (a full forward pass per channel on each side: minutes on 2 cores).
# Eigen-CAM does not depend on the target: it is compared once.
FEW_CHANNELS = "_blocks.0._bn2"
OTHER_CLASS = 207  # golden retriever: a class the cat photo does not show
KINKS = (3e-2, 1.5e-1)  # relative L2, max-abs / max: float32 noise of the plain gradient
IG_STEPS = 4


class Model64(cw.Model):
    """A float64 network: its prepared input is float64 (``cw.Model`` prepares float32), and so
    is the input of its own dry runs."""

    def prepare(self, image):
        x, display = super().prepare(image)
        return x.double(), display

    def scores(self, x):
        return super().scores(x.double())


class ReLU6Rule(nn.ReLU):
    """ReLU6 as an ``nn.ReLU`` subclass (see above); the same forward pass: hardtanh(x, 0, 6)."""

    def forward(self, x):
        return F.hardtanh(x, 0.0, 6.0)


class ZeroAblation(AblationLayer):
    """pytorch-grad-cam's ablation layer with the paper's rule: an ablated channel is 0."""

    def __call__(self, x):
        out = self.activations
        for i in range(out.size(0)):
            out[i, self.indices[i]] = 0
        return out


def relu6_as_relu(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.ReLU6`` replaced by a :class:`ReLU6Rule`."""
    peer = copy.deepcopy(module).eval()
    for parent in list(peer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU6:
                setattr(parent, name, ReLU6Rule())
    assert not any(type(m) is nn.ReLU6 for m in peer.modules())
    return peer


@pytest.fixture(scope="module")
def lite(lite0):
    assert default_layer(lite0) == "_avg_pooling:input"
    # the gradient methods must take the folded, packed path (else this tests nothing of it)
    with restored(lite0.module):
        twin = fast.twin(lite0.module)
    assert twin is not None and fast._head_of(twin) is not None
    if fast._PACK_OPS is not None:
        # every convolution but those with uneven "same" padding (the stem, which is the Head,
        # and the stride-2 ones), most of them with their ReLU6 fused
        packed = [m for m in twin.modules() if isinstance(m, fast.Packed)]
        convs = [m for m in lite0.module.modules() if isinstance(m, nn.Conv2d)]
        uneven = [c for c in convs for z in c.children() if isinstance(z, nn.ZeroPad2d)
                  and (z.padding[0] != z.padding[1] or z.padding[2] != z.padding[3])]
        assert 0 < len(uneven) < len(convs) / 4
        assert len(packed) == len(convs) - len(uneven)
        assert sum(type(m.act) is nn.ReLU6 for m in packed) > len(packed) / 2
    x, _ = lite0.prepare(cw.sample_image("cat"))
    assert x.shape[-2:] == (224, 224)
    peer = relu6_as_relu(lite0.module)
    with torch.no_grad():
        logits = peer(x)[0]
        assert torch.equal(logits, lite0.module(x)[0])  # the same function
    # pytorch-grad-cam hooks a module's output: an identity in front of the pooling outputs
    # the default layer's tensor
    pool = peer._avg_pooling
    peer._avg_pooling = nn.Sequential(nn.Identity(), pool)
    m64 = copy.deepcopy(lite0.module).double()
    model64 = Model64(m64, labels=lite0.labels, input_size=lite0.input_size, mean=lite0.mean,
                      std=lite0.std, crop=lite0.crop, name="efficientnet_lite0 (float64)")
    assert torch.equal(model64.prepare(cw.sample_image("cat"))[0], x.double())
    return dict(model=lite0, model64=model64, x=x, peer=peer, peer64=relu6_as_relu(m64),
                pool=pool, tap=peer._avg_pooling[0], top1=int(logits.argmax()))


@pytest.fixture(params=["top-1", "other"])
def lt(request, lite):
    """``lite`` with ``target``: the top-1 class, then OTHER_CLASS."""
    return dict(lite, target=lite["top1"] if request.param == "top-1" else OTHER_CLASS)


def attr(model, method, target, **kw):
    return cw.attribute(model, cw.sample_image("cat"), method, target=target, **kw).raw


def test_lite0_plain_gradients(lt):
    model, model64, target = lt["model"], lt["model64"], lt["target"]
    peer, x = lt["peer64"], lt["x"].double()
    ig = dict(steps=IG_STEPS, baseline="zeros", batch_size=IG_STEPS)
    refs = [
        ("saliency", {}, captum.Saliency(peer).attribute(x.clone(), target=target)),
        ("gradient_x_input", {}, captum.InputXGradient(peer).attribute(
            x.clone().requires_grad_(), target=target)),
        ("integrated_gradients", ig, captum.IntegratedGradients(peer).attribute(
            x.clone(), baselines=0.0, target=target, n_steps=IG_STEPS, method="gausslegendre")),
    ]
    for method, kw, theirs in refs:
        theirs = theirs[0].detach().numpy()
        assert_agrees(attr(model64, method, target, **kw), theirs, f"{method} {target} float64")
        assert_agrees(attr(model, method, target, **kw), theirs, f"{method} {target}", KINKS)


def test_lite0_guided_backprop_and_deconvnet(lt):
    model, peer, x, target = lt["model"], lt["peer64"], lt["x"].double(), lt["target"]
    theirs = captum.GuidedBackprop(peer).attribute(x.clone(), target=target)[0].numpy()
    assert_agrees(attr(model, "guided_backprop", target), theirs, f"guided_backprop {target}")
    theirs = captum.Deconvolution(peer).attribute(x.clone(), target=target)[0].numpy()
    assert_agrees(attr(model, "deconvnet", target), theirs, f"deconvnet {target}")


def test_lite0_occlusion(lt):
    model, x, peer, target = lt["model"], lt["x"], lt["peer"], lt["target"]
    theirs = captum.Occlusion(peer).attribute(
        x.clone(), sliding_window_shapes=(3, 96, 96), strides=(3, 64, 64), baselines=0.0,
        target=target, perturbations_per_eval=9)[0].numpy()
    mine = attr(model, "occlusion", target, window=96, stride=64, baseline="zeros", batch_size=9)
    assert_agrees(mine, theirs, f"occlusion {target}")


def test_lite0_captum_grad_cams(lt):
    model, x, peer, pool, target = lt["model"], lt["x"], lt["peer"], lt["pool"], lt["target"]
    theirs = captum.LayerGradCam(peer, pool).attribute(
        x.clone(), target=target, attribute_to_layer_input=True,
        relu_attributions=True)[0, 0].detach().numpy()
    assert_agrees(attr(model, "grad_cam", target), theirs, f"grad_cam (Captum) {target}")
    theirs = captum.GuidedGradCam(peer, pool).attribute(
        x.clone(), target=target, interpolate_mode="bilinear",
        attribute_to_layer_input=True)[0].detach().numpy()
    assert_agrees(attr(model, "guided_grad_cam", target), theirs, f"guided_grad_cam {target}")


def test_lite0_pgc_grad_cams(lt):
    model, x, peer, tap, target = lt["model"], lt["x"], lt["peer"], lt["tap"], lt["target"]
    for method, cls in [("grad_cam", pgc.GradCAM), ("grad_cam_pp", pgc.GradCAMPlusPlus),
                        ("xgrad_cam", pgc.XGradCAM), ("layer_cam", pgc.LayerCAM)]:
        theirs = np.maximum(pgc_raw(cls, peer, tap, x, target), 0)
        assert_agrees(attr(model, method, target), theirs, f"{method} {target}")


def test_lite0_eigen_cam(lite):
    mine = attr(lite["model"], "eigen_cam", lite["top1"])
    theirs = pgc_raw(pgc.EigenCAM, lite["peer"], lite["tap"], lite["x"], lite["top1"])
    assert_agrees(mine, same_sign(mine, theirs), "eigen_cam")


def test_lite0_score_and_ablation_cam(lt):
    model, x, peer, target = lt["model"], lt["x"], lt["peer"], lt["target"]
    theirs = np.maximum(pgc_raw(pgc.ScoreCAM, peer, FEW_CHANNELS, x, target), 0)
    assert_agrees(attr(model, "score_cam", target, layer=FEW_CHANNELS), theirs,
                  f"score_cam {target}")
    theirs = np.maximum(pgc_raw(pgc.AblationCAM, peer, FEW_CHANNELS, x, target,
                                ablation_layer=ZeroAblation()), 0)
    assert_agrees(attr(model, "ablation_cam", target, layer=FEW_CHANNELS), theirs,
                  f"ablation_cam {target}")
