"""``attribution.raw`` agrees with Captum and pytorch-grad-cam on torchvision ResNet-18 and
VGG-11 (random weights, fixed seed, 48 px input to keep CI fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cnnwidgets as cw

captum = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
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


def rel_error(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12))


def ours(model, method, **kw):
    return cw.attribute(model, cw.sample_image("cat"), method, target=TARGET, **kw).raw


# --------------------------------------------------------------------------- Captum
def test_saliency_and_gradient_x_input(net):
    _, model, x = net
    theirs = captum.Saliency(model.module).attribute(x.clone(), target=TARGET)[0].numpy()
    assert rel_error(ours(model, "saliency"), theirs) < 1e-4
    theirs = captum.InputXGradient(model.module).attribute(x.clone().requires_grad_(), target=TARGET)
    assert rel_error(ours(model, "gradient_x_input"), theirs[0].detach().numpy()) < 1e-4


def test_integrated_gradients(net):
    _, model, x = net
    ig = captum.IntegratedGradients(model.module)
    theirs = ig.attribute(x.clone(), baselines=0.0, target=TARGET, n_steps=6,
                          method="gausslegendre")[0].detach().numpy()
    mine = ours(model, "integrated_gradients", steps=6, baseline="zeros", batch_size=4)
    assert rel_error(mine, theirs) < 1e-4


def test_guided_backprop_and_deconvnet(net):
    name, model, x = net
    theirs = captum.GuidedBackprop(model.module).attribute(x.clone(), target=TARGET)[0].detach().numpy()
    assert rel_error(ours(model, "guided_backprop"), theirs) < 1e-4
    theirs = captum.Deconvolution(model.module).attribute(x.clone(), target=TARGET)[0].detach().numpy()
    assert rel_error(ours(model, "deconvnet"), theirs) < 1e-4


def test_grad_cam_vs_captum_layer_grad_cam(net):
    name, model, x = net
    layer = LAYERS[name][0]
    module = dict(model.module.named_modules())[layer]
    theirs = captum.LayerGradCam(model.module, module).attribute(
        x.clone(), target=TARGET, relu_attributions=True)[0, 0].detach().numpy()
    assert rel_error(ours(model, "grad_cam", layer=layer), theirs) < 1e-4


def test_guided_grad_cam_vs_captum(net):
    # ours: one forward pass, two backward passes with different ReLU rules; Captum: guided
    # backprop and layer Grad-CAM as two separate passes
    name, model, x = net
    layer = LAYERS[name][0]
    module = dict(model.module.named_modules())[layer]
    theirs = captum.GuidedGradCam(model.module, module).attribute(
        x.clone(), target=TARGET, interpolate_mode="bilinear")[0].detach().numpy()
    assert np.abs(theirs).max() > 0
    assert rel_error(ours(model, "guided_grad_cam", layer=layer), theirs) < 1e-4


def test_occlusion(net):
    _, model, x = net
    theirs = captum.Occlusion(model.module).attribute(
        x.clone(), sliding_window_shapes=(3, 20, 20), strides=(3, 12, 12), baselines=0.0,
        target=TARGET)[0].detach().numpy()
    mine = ours(model, "occlusion", window=20, stride=12, baseline="zeros", batch_size=20)
    assert rel_error(mine, theirs) < 1e-4


# --------------------------------------------------------------------------- pytorch-grad-cam
def pgc_raw(cls, model, layer, x):
    """pytorch-grad-cam's map before its min-max scaling and resizing (its own steps:
    forward with hooks, backward, get_cam_image, then ReLU)."""
    module = dict(model.module.named_modules())[layer]
    cam = cls(model=model.module, target_layers=[module])
    try:
        targets = [ClassifierOutputTarget(TARGET)]
        outputs = cam.activations_and_grads(x.clone())
        if cam.uses_gradients:
            model.module.zero_grad()
            targets[0](outputs[0]).backward(retain_graph=True)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = (cam.activations_and_grads.gradients[0].numpy()
                 if cam.activations_and_grads.gradients else None)
        raw = cam.get_cam_image(x.clone(), module, targets, acts, grads, False)[0]
    finally:
        cam.activations_and_grads.release()
    model.module.zero_grad(set_to_none=True)
    return raw


@pytest.mark.parametrize("method,cls", [("grad_cam_pp", "GradCAMPlusPlus"),
                                        ("xgrad_cam", "XGradCAM"), ("layer_cam", "LayerCAM"),
                                        ("grad_cam", "GradCAM")])
def test_gradient_cams(net, method, cls):
    name, model, x = net
    layer = LAYERS[name][0]
    theirs = np.maximum(pgc_raw(getattr(pgc, cls), model, layer, x), 0)
    assert theirs.max() > 0
    assert rel_error(ours(model, method, layer=layer), theirs) < 1e-4


@pytest.mark.parametrize("method,cls", [("score_cam", "ScoreCAM"), ("ablation_cam", "AblationCAM")])
def test_perturbation_cams(net, method, cls):
    name, model, x = net
    layer = LAYERS[name][1]
    theirs = np.maximum(pgc_raw(getattr(pgc, cls), model, layer, x), 0)
    assert rel_error(ours(model, method, layer=layer, batch_size=32), theirs) < 1e-4


def test_eigen_cam(net):
    name, model, x = net
    layer = LAYERS[name][0]
    theirs = pgc_raw(pgc.EigenCAM, model, layer, x)  # the projection, sign arbitrary
    mine = ours(model, "eigen_cam", layer=layer)
    assert min(rel_error(mine, theirs), rel_error(mine, -theirs)) < 1e-4
