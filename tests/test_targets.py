"""Targets beyond one class (issue 20): lists of classes, ``cw.targets.Region`` on dense
outputs, ``cw.targets.Box`` on scored boxes, callables — for the attribution methods and CNN
Fixations, on tiny hand-set networks whose expected values are worked out in the comments;
then torchvision's segmentation networks (random weights) end to end, and agreement with
pytorch-grad-cam's ``SemanticSegmentationTarget``."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count

from conftest import assert_same_state, snapshot, tiny_model

Region, Box = cw.targets.Region, cw.targets.Box


def every_other_pixel(pil) -> torch.Tensor:
    """The tiny networks' transform: an image made by :func:`rgb` (each pixel doubled, since
    images under 8×8 are refused) back to its own pixels, as value / 255."""
    return torch.from_numpy(np.asarray(pil, np.float32)[::2, ::2] / 255).permute(2, 0, 1)


def plain(net, size, **kw) -> cw.Model:
    """``net`` wrapped so that an image from :func:`rgb` of size×size pixels reaches it as
    value / 255."""
    return cw.Model(net, transform=every_other_pixel, mean=(0.0,) * 3, std=(1.0,) * 3,
                    input_size=(size, size), **kw)


def rgb(r, g=None, b=None) -> np.ndarray:
    """An H×W×3 uint8 image from its channels (zeros where not given), each pixel doubled
    (2H×2W: :func:`every_other_pixel` takes it back)."""
    r = np.asarray(r, np.uint8)
    z = np.zeros_like(r)
    image = np.stack([r, z if g is None else np.asarray(g, np.uint8),
                      z if b is None else np.asarray(b, np.uint8)], -1)
    return image.repeat(2, 0).repeat(2, 1)


def mask_of(pixels, size=4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for i, j in pixels:
        m[i, j] = True
    return m


# ------------------------------------------------------------------ a dense output, by hand
class DenseNet(nn.Module):
    """conv(3→2, 3×3, padding 1), no bias: class 0 at a pixel = the sum of the red channel over
    its 3×3 neighbourhood; class 1 = the green value at the pixel (centre tap only)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1, 1, 1] = 1.0

    def forward(self, x):
        return self.conv(x)


RED = np.array([[10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120],
                [130, 140, 150, 250]], np.uint8)


def test_region_gradient_is_the_sum_of_its_pixels_gradients_by_hand():
    net = DenseNet()
    model = plain(net, 4, labels=["red", "green"])
    image = rgb(RED, RED // 2)
    before = snapshot(net)
    # ∂out[0, i, j]/∂x[0, a, b] = 1 when (a, b) is within one pixel of (i, j).
    # pixel (0, 0) reaches rows 0–1, cols 0–1; pixel (0, 1) rows 0–1, cols 0–2:
    one = np.zeros((3, 4, 4), np.float32)
    one[0, :2, :2] = 1
    two = np.zeros((3, 4, 4), np.float32)
    two[0, :2, :3] = 1
    both = np.zeros((3, 4, 4), np.float32)
    both[0, :2] = [[2, 2, 1, 0], [2, 2, 1, 0]]
    assert np.array_equal(both, one + two)
    mask = mask_of([(0, 0), (0, 1)])
    a = cw.attribute(model, image, "saliency", target=Region(0, mask))
    np.testing.assert_array_equal(a.raw, both)
    np.testing.assert_array_equal(
        cw.attribute(model, image, "saliency", target=Region("red", mask_of([(0, 0)]))).raw, one)
    np.testing.assert_array_equal(
        cw.attribute(model, image, "saliency", target=Region(0, mask_of([(0, 1)]))).raw, two)
    # the score: red summed over (0,0)'s window (10+20+50+60) and (0,1)'s (10+20+30+50+60+70)
    assert a.score == pytest.approx((140 + 240) / 255, rel=1e-6)
    assert isinstance(a.target, Region) and a.target.cls == 0
    assert np.array_equal(a.target.mask, mask) and a.label == "red @ 2 px"
    # Integrated Gradients on a linear network from the black baseline: x · gradient, exactly
    ig = cw.attribute(model, image, "integrated_gradients", target=Region(0, mask), steps=4).raw
    x = model.prepare(image)[0][0].numpy()
    np.testing.assert_allclose(ig, x * both, rtol=1e-5, atol=1e-7)
    # a callable reading the same pixels is the same target
    fn = lambda out: out[:, 0, 0, 0] + out[:, 0, 0, 1]  # noqa: E731
    np.testing.assert_array_equal(cw.attribute(model, image, "saliency", target=fn).raw, both)
    assert hook_count(net) == 0
    assert_same_state(net, before)


def test_dense_class_alone_is_its_predicted_pixels_and_none_the_widest_class():
    model = plain(DenseNet(), 4)
    # green 200 everywhere but the bottom-right pixel: class 1 (green, 200/255 ≈ 0.78) beats
    # class 0 (the red 3×3 sums, ≥ 0.55 only near the bottom right) except where red is large
    red = np.zeros((4, 4), np.uint8)
    red[3, 3] = 255
    green = np.full((4, 4), 200, np.uint8)
    green[3, 3] = 0
    image = rgb(red, green)
    # class 0 at (i, j) = 1.0 within one pixel of (3, 3), else 0: it wins at (2,2), (2,3),
    # (3,2), (3,3); class 1 wins the other 12 pixels, so target=None is class 1 there
    a = cw.attribute(model, image, "saliency", target=0)
    expected = mask_of([(2, 2), (2, 3), (3, 2), (3, 3)])
    assert np.array_equal(a.target.mask, expected)
    top = cw.attribute(model, image, "saliency")
    assert top.target.cls == 1 and np.array_equal(top.target.mask, ~expected)
    assert model.predict(image, k=1)[0][:2] == (1, "class 1")
    assert model.predict(image, k=2)[1][2] == pytest.approx(4 / 16)


# ------------------------------------------------------------------ several classes
@pytest.mark.parametrize("method,params", [
    ("gradient_x_input", {}), ("integrated_gradients", {"steps": 8}),
    ("occlusion", {"window": 3, "stride": 2}), ("cam", {}), ("grad_cam", {}),
])
def test_several_classes_are_the_sum_of_each(method, params):
    """Each of these raws is linear in the target's score (Grad-CAM's weighted sum before its
    ReLU is, and on TinyNet every weighted sum here is positive), so the raw of classes 0 and
    2 is the raw of 0 plus the raw of 2."""
    model = tiny_model()
    image = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8)
    if method == "grad_cam":  # relu(Σ mean-grad · A): with only non-negative class weights
        pair = (0, 1)
    else:
        pair = (0, 2)
    both = cw.attribute(model, image, method, target=list(pair), **params)
    each = [cw.attribute(model, image, method, target=c, **params) for c in pair]
    np.testing.assert_allclose(both.raw, each[0].raw + each[1].raw, rtol=1e-5, atol=1e-6)
    if both.score is not None:  # (the methods that read the unperturbed score)
        assert both.score == pytest.approx(each[0].score + each[1].score, rel=1e-6)
    assert both.target == list(pair) and both.label == " + ".join(model.label(c) for c in pair)


def test_several_classes_by_label_and_single_class_stays_an_int():
    model = tiny_model()
    image = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8)
    assert cw.attribute(model, image, "saliency", target=["a", "c"]).target == [0, 2]
    one = cw.attribute(model, image, "saliency", target=["b"])
    assert one.target == 1 and isinstance(one.target, int)


# ------------------------------------------------------------------ fixations
class PoolNet(nn.Module):
    """conv(3→2, 1×1) copying red and green → max-pool 2 → nearest upsampling ×2: a 2×4×4
    dense output where each pixel holds the maximum of its 2×2 cell."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return self.up(self.pool(self.conv(x)))


def test_fixations_from_a_region_follow_the_union_rule_by_hand():
    net = PoolNet()
    model = plain(net, 4)
    image = rgb([[10, 200, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120], [130, 140, 150, 250]],
                [[5, 5, 9, 5], [5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 5, 5]])
    before = snapshot(net)
    # output pixels (0,0), (0,1), (1,0) of class 0 read cell (0,0) of the pooled map, whose
    # maximum is red 200 at (0,1); (3,3) reads cell (1,1), maximum red 250 at (3,3). The 1×1
    # convolution keeps the position and picks the red channel (the only one with weight).
    region = Region(0, mask_of([(0, 0), (0, 1), (1, 0), (3, 3)]))
    fix = cw.fixations(model, image, region, outlier_removal=False)
    assert sorted(map(tuple, fix.all_points)) == [(0, 1), (3, 3)]
    assert sorted(map(tuple, fix.trace["up"])) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 3, 3)]
    assert sorted(map(tuple, fix.trace["pool"])) == [(0, 0, 0), (0, 1, 1)]
    assert sorted(map(tuple, fix.trace["conv"])) == [(0, 0, 1), (0, 3, 3)]
    assert fix.score == pytest.approx((3 * 200 + 250) / 255, rel=1e-6)
    # the union rule: a region's fixations are the union of its pixels' fixations
    singles = [cw.fixations(model, image, Region(0, mask_of([p])), outlier_removal=False)
               for p in [(0, 0), (0, 1), (1, 0), (3, 3)]]
    union = {tuple(p) for f in singles for p in f.all_points}
    assert union == {(0, 1), (3, 3)}
    # class 1 (green) over every pixel reaches each cell's green maximum — (0,2) holds 9 in
    # cell (0,1); the other cells are flat, and max pooling keeps the first of a tie
    both = cw.fixations(model, image, Region(1, "all"), outlier_removal=False)
    assert sorted(map(tuple, both.all_points)) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    # a callable reading the same neurons starts from them too
    fn = lambda out: out[:, 0, 0, 0] + out[:, 0, 3, 3]  # noqa: E731
    assert sorted(map(tuple, cw.fixations(model, image, fn, outlier_removal=False)
                      .all_points)) == [(0, 1), (3, 3)]
    # as an attribution method: the mask of the points
    raw = cw.attribute(model, image, "fixations", target=region, outlier_removal=False).raw
    assert sorted(zip(*np.nonzero(raw))) == [(0, 1), (3, 3)]
    assert hook_count(net) == 0
    assert_same_state(net, before)


def test_fixations_of_several_classes_are_the_union_of_each():
    model = tiny_model()
    image = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8)
    both = cw.fixations(model, image, [0, 1], outlier_removal=False)
    each = [cw.fixations(model, image, c, outlier_removal=False) for c in (0, 1)]
    assert {tuple(p) for p in both.all_points} == {tuple(p) for f in each for p in f.all_points}
    assert both.target == [0, 1] and both.label == "a + b"
    assert each[0].target == 0 and each[0].label == "a"


# ------------------------------------------------------------------ boxes and detectors
class BoxNet(nn.Module):
    """conv(3→6, 2×2, stride 2) on a 4×4 input, read as 4 boxes (one per 2×2 cell, row-major)
    of 6 numbers: 4 coordinates (zero weights) then 2 class scores — class 0 the cell's red
    sum, class 1 its green sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 2, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[4, 0] = 1.0
            self.conv.weight[5, 1] = 1.0

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def test_box_target_by_hand():
    model = plain(BoxNet(), 4, labels=["red", "green"])
    image = rgb(RED, np.full((4, 4), 100, np.uint8))
    # box 3 is the cell rows 2–3, cols 2–3: red 110+120+150+250 = 630 > green 400, so its
    # best class is red; its gradient is 1 on that cell's red pixels
    a = cw.attribute(model, image, "saliency", target=Box(3))
    expected = np.zeros((3, 4, 4), np.float32)
    expected[0, 2:, 2:] = 1
    np.testing.assert_array_equal(a.raw, expected)
    assert a.target == Box(3, 0) and a.label == "box 3: red"
    assert a.score == pytest.approx(630 / 255, rel=1e-6)
    g = cw.attribute(model, image, "saliency", target=Box(0, "green")).raw
    assert g[1, :2, :2].tolist() == [[1, 1], [1, 1]] and g.sum() == 4
    # fixations: the strided convolution moves the point to the largest red contribution
    fix = cw.fixations(model, image, Box(3), outlier_removal=False)
    assert [tuple(p) for p in fix.all_points] == [(3, 3)]


class TinyDetector(nn.Module):
    """A detector-style output: per image a dict of ``boxes`` and ``scores`` (the 4 cells of
    BoxNet with their red sums as scores), the format torchvision's detectors return."""

    def __init__(self):
        super().__init__()
        self.net = BoxNet()

    def forward(self, x):
        rows = self.net(x)
        return [{"boxes": r[:, :4], "scores": r[:, 4]} for r in rows]


def test_callable_target_on_a_detector_for_gradient_and_perturbation_methods():
    net = TinyDetector()
    model = plain(net, 4)
    image = rgb(RED)

    def best_box(out):  # the highest-scoring box of each image
        return torch.stack([d["scores"].max() for d in out])

    a = cw.attribute(model, image, "saliency", target=best_box)
    expected = np.zeros((3, 4, 4), np.float32)
    expected[0, 2:, 2:] = 1  # the bottom-right cell has the largest red sum
    np.testing.assert_array_equal(a.raw, expected)
    assert a.label == "best_box" and a.target is best_box
    # occlusion with 2×2 zero patches, one per cell: covering the bottom-right cell drops the
    # best score from 630 to the bottom-left cell's 90+100+130+140 = 460 (the top cells sum
    # to 140 and 220); covering any other cell leaves the best box as it is
    occ = cw.attribute(model, image, "occlusion", target=cw.targets.Score(best_box, "best"),
                       window=2, stride=2, baseline="zeros")
    heat = occ.raw[0]
    np.testing.assert_allclose(heat[2:, 2:], np.full((2, 2), (630 - 460) / 255), rtol=1e-6)
    assert np.all(heat[:2] == 0) and np.all(heat[2:, :2] == 0) and occ.label == "best"
    # CNN Fixations trace the network into a graph of tensors: a list of dicts does not trace
    with pytest.raises(cw.engine.UnsupportedOperationError, match="needs to trace TinyDetector"):
        cw.fixations(model, image, best_box)
    assert hook_count(net) == 0


# ------------------------------------------------------------------ errors
def test_bad_targets_say_what_is_wrong():
    net = DenseNet()
    model = plain(net, 4)
    image = rgb(RED)
    before = snapshot(net)
    cases = [
        (Region(0, np.ones((3, 4), bool)), r"mask has shape \(3, 4\); it must be 4×4"),
        (Region(0, np.zeros((4, 4), bool)), "selects no pixel"),
        (Region(5, "all"), r"target 5 is out of range; the model has 2 classes"),
        (Region(0, np.full((4, 4), 0.5)), "must be boolean"),
        (Region(0, "some"), "'all'"),
        (7, "out of range"),
        ([], "empty list"),
        ([0, 0], "twice"),
        (lambda out: out.sum(), r"returned a torch.float32 tensor of shape \(\); it must return "
                                r"one floating-point score per image, shape \(1,\)"),
        (lambda out: out[:, 0, 0], r"shape \(1, 4\)"),
        (lambda out: 3.0, "returned a float"),
        (Box(0), "Box needs scored boxes"),
    ]
    for target, message in cases:
        for method, kw in (("saliency", {}), ("occlusion", {"window": 2})):
            with pytest.raises(ValueError, match=message):
                cw.attribute(model, image, method, target=target, **kw)
            assert hook_count(net) == 0
    with pytest.raises(ValueError, match=r"cam reads the final linear classifier.*grad_cam"):
        cw.attribute(tiny_model(), np.zeros((8, 8), np.uint8), "cam", target=lambda o: o[:, 0])
    with pytest.raises(ValueError, match="Region needs a dense output"):
        cw.attribute(tiny_model(), np.zeros((8, 8), np.uint8), "saliency", target=Region(0))
    with pytest.raises(ValueError, match="scores highest at no output pixel"):
        cw.attribute(model, rgb(RED), "saliency", target=1)  # no green: class 1 wins nowhere
    with pytest.raises(ValueError, match="depends on no output neuron"):
        cw.fixations(model, image, lambda out: out[:, 0, 0, 0] * 0)
    assert hook_count(net) == 0
    assert_same_state(net, before)


def test_model_output_key_picks_from_a_dict():
    class DictNet(DenseNet):
        def forward(self, x):
            return {"out": super().forward(x), "aux": x}

    model = plain(DictNet(), 4, output="out")
    assert model.output_shape == (2, 4, 4) and model.num_classes == 2
    a = cw.attribute(model, rgb(RED), "saliency", target=Region(0, mask_of([(0, 0)])))
    assert a.raw[0, :2, :2].tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="has no item 'logits'"):
        plain(DictNet(), 4, output="logits").predict(rgb(RED))


# ------------------------------------------------------------------ torchvision segmentation
SEG_SIZE = 64


@functools.lru_cache(maxsize=None)
def segmentation(name):
    import torchvision.models.segmentation as seg

    torch.manual_seed(0)
    module = getattr(seg, name)(weights=None, weights_backbone=None, num_classes=3).eval()
    return cw.Model(module, output="out", input_size=(SEG_SIZE, SEG_SIZE), name=name,
                    labels=["background", "cat", "other"])


SEG_LAYERS = {"fcn_resnet50": "backbone.layer4", "deeplabv3_mobilenet_v3_large": "backbone.16",
              "lraspp_mobilenet_v3_large": "backbone.16"}


@pytest.mark.parametrize("name", list(SEG_LAYERS))
def test_torchvision_segmentation_end_to_end(name):
    model = segmentation(name)
    net = model.module
    before = snapshot(net)
    image = cw.sample_image("cat")
    assert model.output_shape == (3, SEG_SIZE, SEG_SIZE)
    mask = np.zeros((SEG_SIZE, SEG_SIZE), bool)
    mask[16:40, 20:44] = True
    region = Region("cat", mask)
    for method, kw in (("grad_cam", {"layer": SEG_LAYERS[name]}), ("saliency", {}),
                       ("occlusion", {"window": 16, "stride": 16})):
        a = cw.attribute(model, image, method, target=region, progress=False, **kw)
        assert a.map.shape == (SEG_SIZE, SEG_SIZE) and np.isfinite(a.map).all()
        # (with random weights DeepLabV3-MobileNet's output moves by less than float32's
        # resolution when a patch is occluded: its occlusion map is rightly all zero)
        if not (method == "occlusion" and name.startswith("deeplabv3")):
            assert np.abs(a.raw).max() > 0, method
        assert a.label == "cat @ 576 px"
    fix = cw.fixations(model, image, region)
    assert len(fix.all_points) > 0 and fix.label == "cat @ 576 px"
    top = cw.fixations(model, image)  # the class that wins the most pixels
    assert isinstance(top.target, Region)
    assert hook_count(net) == 0
    assert_same_state(net, before)


def test_torchvision_detector_with_a_callable_target():
    """Faster R-CNN (random weights, every box kept) returns a list of dicts per batch; a
    callable reads one score per image off it, for a gradient and a perturbation method."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0).eval()
    model = cw.Model(net, mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(64, 64))
    before = snapshot(net)
    assert model.output_shape is None  # not a tensor: only a callable target reads it

    def top_scores(out):  # the three best boxes of each image
        return torch.stack([d["scores"][:3].sum() for d in out])

    image = cw.sample_image("cat")
    a = cw.attribute(model, image, "saliency", target=top_scores)
    assert a.raw.shape == (3, 64, 64) and np.isfinite(a.raw).all() and np.abs(a.raw).max() > 0
    assert a.label == "top_scores" and 0 < a.score <= 3
    o = cw.attribute(model, image, "occlusion", target=top_scores, window=32, stride=32,
                     progress=False)
    assert o.raw.shape == (3, 64, 64) and np.isfinite(o.raw).all()
    with pytest.raises(ValueError, match="not a tensor of scores"):
        cw.attribute(model, image, "saliency", target=0)
    assert hook_count(net) == 0
    assert_same_state(net, before)


def test_region_grad_cam_agrees_with_pytorch_grad_cam():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = segmentation("fcn_resnet50")
    net = model.module
    image = cw.sample_image("cat")
    x, _ = model.prepare(image)
    with torch.no_grad():
        out = net(x)["out"][0]
    mask = (out.argmax(0) == 1).numpy()
    assert mask.any()  # class 1 wins somewhere (random weights, seed 0)

    class Out(nn.Module):  # pytorch-grad-cam wants a tensor output
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t)["out"]

    layer = net.backbone.layer4
    cam = pgc.GradCAM(model=Out(net), target_layers=[layer])
    try:
        target = SemanticSegmentationTarget(1, mask.astype(np.float32))
        outputs = cam.activations_and_grads(x.clone().requires_grad_(True))
        target(outputs[0]).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        theirs = np.maximum(cam.get_cam_image(x.clone(), layer, [target], acts, grads, False)[0], 0)
    finally:
        cam.activations_and_grads.release()
    net.zero_grad(set_to_none=True)
    ours = cw.attribute(model, image, "grad_cam", target=Region(1, mask),
                        layer="backbone.layer4").raw
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert hook_count(net) == 0


# ------------------------------------------------------------------ widgets
def test_explorers_take_any_target_and_show_its_name():
    pytest.importorskip("ipywidgets")
    pytest.importorskip("ipympl")
    net = DenseNet()
    model = plain(net, 4, labels=["red", "green"])
    image = rgb(RED, RED // 2)  # red's 3×3 sums beat green everywhere: class 0 is the top one
    w = cw.AttributionExplorer(model, image, "saliency", background=False)
    assert w.target == 0 and len(w.region_box.children) == 4  # a dense output: region controls
    w.pick_region(rows=(0, 0), cols=(0, 1))
    assert isinstance(w.target, Region) and w.target.cls == 0
    expected = np.zeros((3, 4, 4), np.float32)
    expected[0, :2] = [[2, 2, 1, 0], [2, 2, 1, 0]]  # as in the hand-worked region test
    np.testing.assert_array_equal(w.result[0].raw, expected)
    assert "red @ 2 px" in w.target_label.value and "red @ 2 px" in w.status.value
    assert w.errors.last_error is None

    def green_total(out):
        return out[:, 1].sum((1, 2))

    w.target = green_total
    assert "green_total" in w.target_label.value
    green = np.zeros((3, 4, 4), np.float32)
    green[1] = 1
    np.testing.assert_array_equal(w.result[0].raw, green)
    with pytest.raises(ValueError, match="selects no pixel"):
        w.target = Region(0, np.zeros((4, 4), bool))
    assert w.target is green_total
    # the controls: ranges of rows and columns, then the button (class: the top one, as the
    # callable names none)
    w.region_rows.value, w.region_cols.value = (3, 3), (3, 3)
    w.region_button.click()
    assert np.array_equal(w.target.mask, mask_of([(3, 3)])) and w.target.cls == 0
    corner = np.zeros((3, 4, 4), np.float32)
    corner[0, 2:, 2:] = 1  # (3, 3)'s 3×3 neighbourhood, cut by the border
    np.testing.assert_array_equal(w.result[0].raw, corner)
    assert "red @ 1 px" in w.target_label.value and w.errors.last_error is None

    f = cw.FixationExplorer(model, image, target=Region(0, mask_of([(0, 0), (0, 1)])),
                            background=False)
    assert sorted(map(tuple, f.result.all_points)) == [(0, 0), (0, 1)]
    assert "red @ 2 px" in f.status.value and "class" not in f.status.value
    f.target = 0  # a class alone on a dense output: the pixels it wins, here all of them
    assert f.result.label == "red @ all pixels" and len(f.result.all_points) == 16
    assert hook_count(net) == 0



def _mouse(canvas, name, ax, x, y):
    """Send a left-button mouse event at data point (x, y) of ``ax`` (None: a point of the
    figure left of every axes) through the canvas, as a browser's would arrive."""
    from matplotlib.backend_bases import MouseEvent

    px, py = (2.0, 2.0) if x is None else ax.transData.transform((x, y))
    canvas.callbacks.process(name, MouseEvent(name, canvas, px, py, button=1))


def test_a_drag_on_the_input_chooses_the_region_and_moves_its_sliders():
    from conftest import assert_frame_is_current

    traitlets = pytest.importorskip("traitlets")
    pytest.importorskip("ipywidgets")
    pytest.importorskip("ipympl")
    net = DenseNet()
    model = plain(net, 4, labels=["red", "green"])
    w = cw.AttributionExplorer(model, rgb(RED, RED // 2), "saliency", background=False)
    canvas, ax = w.figures.single_canvas, w.figures.image_panel["image"].axes
    canvas.draw()
    outline = w.figures.image_panel["region"]
    assert (w.rows, w.cols) == ((0, 3), (0, 3)) and outline.get_xy() == (-0.5, -0.5)
    assert w.target == 0  # nothing chosen yet: the top class
    # the 4×4 output over the 4×4 image: pixel (row i, column j) covers y, x in [i, j] ± 0.5
    _mouse(canvas, "button_press_event", ax, 0.2, 1.1)  # row 1, column 0
    _mouse(canvas, "motion_notify_event", ax, 1.4, 0.9)  # row 1, column 1
    assert (w.rows, w.cols) == ((1, 1), (0, 1))  # the sliders follow the drag…
    assert (w.region_rows.value, w.region_cols.value) == ((1, 1), (0, 1))
    assert outline.get_xy() == (-0.5, 0.5) and (outline.get_width(), outline.get_height()) == (2, 1)
    assert_frame_is_current(canvas)  # the outline moved: not the frame kept before the drag
    assert w.target == 0  # …and nothing is computed before the release
    _mouse(canvas, "button_release_event", ax, 2.4, 3.4)  # row 3, column 2
    assert (w.region_rows.value, w.region_cols.value) == ((1, 3), (0, 2))
    assert isinstance(w.target, Region) and w.target.cls == 0
    np.testing.assert_array_equal(w.target.mask, mask_of(
        [(i, j) for i in (1, 2, 3) for j in (0, 1, 2)]))
    # class 0 at a pixel sums the red of its 3×3 neighbourhood: an input pixel's gradient
    # counts the chosen pixels around it, rows 1–3 seen from rows 0…3: 1, 2, 3, 2; columns
    # 0–2 from columns 0…3: 2, 3, 2, 1
    expected = np.zeros((3, 4, 4), np.float32)
    expected[0] = np.outer([1, 2, 3, 2], [2, 3, 2, 1])
    np.testing.assert_array_equal(w.result[0].raw, expected)
    assert "red @ 9 px" in w.status.value and w.errors.last_error is None
    # dragged backwards and let go outside the image: the last point inside ends it
    _mouse(canvas, "button_press_event", ax, 3.0, 3.0)
    _mouse(canvas, "motion_notify_event", ax, 1.0, -0.4)
    _mouse(canvas, "button_release_event", ax, None, None)
    assert (w.rows, w.cols) == ((0, 3), (1, 3)) and w.target.mask[0:4, 1:4].all()
    assert_frame_is_current(canvas)
    assert w.target.mask.sum() == 12
    # a press outside the image starts nothing; the sliders move the outline the same way
    _mouse(canvas, "button_press_event", ax, None, None)
    _mouse(canvas, "button_release_event", ax, 1.0, 1.0)
    assert (w.rows, w.cols) == ((0, 3), (1, 3))
    w.region_rows.value = (2, 2)
    assert w.rows == (2, 2) and outline.get_xy() == (0.5, 1.5) and outline.get_height() == 1
    assert_frame_is_current(canvas)
    w.region_rows.value = (0, 3)  # the outline back where it was, the same results: kept frame
    assert_frame_is_current(canvas)
    w.region_rows.value = (2, 2)
    with pytest.raises(traitlets.TraitError, match="within 0…3"):
        w.cols = (1, 4)
    w.cols = (3, 3)  # from code: the slider follows, the button explains it
    assert w.region_cols.value == (3, 3)
    w.region_button.click()
    np.testing.assert_array_equal(w.target.mask, mask_of([(2, 3)]))
    assert hook_count(net) == 0


# ------------------------------------------------------------------ the rest of the engine
def test_a_method_registered_outside_still_indexes_with_ctx_target():
    """Methods written for class targets (``logits[:, ctx.target]``) keep working on one class;
    on another target the indexing fails (torch's IndexError names the Resolved target; an
    ``operator.index`` call gets a TypeError saying to use ``ctx.target.score(output)``)."""
    from cnnwidgets.engine.attribution import register, unregister

    @register("demo_logit", kind="other")
    def demo(ctx):
        with torch.no_grad():
            ctx.base_score = float(ctx.logits(ctx.x)[0, ctx.target])
        return torch.zeros(ctx.x.shape[-2:])

    try:
        model = tiny_model()
        image = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8)
        a = cw.attribute(model, image, "demo_logit", target=2)
        assert a.score == pytest.approx(cw.attribute(model, image, "saliency", target=2).score)
        with pytest.raises(IndexError, match="got Resolved"):
            cw.attribute(model, image, "demo_logit", target=[0, 2])
        both = cw.targets.resolve(model, [0, 2])
        with pytest.raises(TypeError, match=r"target\.score\(output\)"):
            [10, 20, 30][both]
    finally:
        unregister("demo_logit")


def test_deletion_curve_reads_the_region_score():
    model = plain(DenseNet(), 4, labels=["red", "green"])
    image = rgb(RED, RED // 2)
    region = Region(0, mask_of([(0, 0), (0, 1)]))
    curve = cw.metrics.deletion(model, image, "saliency", target=region, steps=4, score="logit",
                                baseline="zeros")
    # nothing deleted: the region's score as in the first test, (140 + 240) / 255; everything
    # deleted (zero input): 0
    assert curve.scores[0] == pytest.approx(380 / 255, rel=1e-6) and curve.scores[-1] == 0
    assert curve.label == "red @ 2 px" and isinstance(curve.target, Region)
