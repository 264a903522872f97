"""cw.evaluate: boxes from maps, IoU, MaxBoxAcc, the box data sets, the evaluation itself, its
file, its cache, two processes against one, and the command line. Expected values are worked
out by hand in the comments."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import boxes as B
from cnnwidgets.engine.boxdata import OBJECTS, AnnotationError, ImageFolderBoxes, SyntheticBoxes
from cnnwidgets.engine.evaluation import EvaluationFileError, mean_interval, wilson
from cnnwidgets.engine.preprocess import Preprocess
from test_dissection import _free_port, assert_unchanged, snapshot

# --------------------------------------------------------------------------- helpers


def red_net():
    """A 1×1 convolution whose channel 0 is the red value and channel 1 the blue one, ReLU,
    global average pooling and an identity classifier: class 0 = "red", class 1 = "blue".
    Grad-CAM of class 0 at the ReLU is relu(Σ_k mean(∂y0/∂A_k) A_k) = A_0 / (h·w): the red
    channel itself, so its box is the red square's box exactly (the layer has the input's
    32×32 size: no upsampling)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
        conv.weight[1, 2, 0, 0] = 1.0
        lin.weight.copy_(torch.eye(2))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    return cw.Model(net, mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32), crop=1.0,
                    labels=["red", "blue"])


class Squares:
    """A box data set of 32×32 black images with a red square at ``boxes[i]``; the annotated
    box is ``claimed[i]`` (deliberately wrong for some images); every label is 0 ("red")."""

    def __init__(self, boxes, claimed=None):
        self.boxes = [tuple(b) for b in boxes]
        self.claimed = [tuple(b) for b in (claimed or boxes)]

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        image = np.zeros((32, 32, 3), np.uint8)
        x0, y0, x1, y1 = self.boxes[i]
        image[y0:y1, x0:x1, 0] = 200
        return {"image": image, "boxes": np.array([self.claimed[i]], np.float32), "label": 0,
                "name": f"square{i}"}

    def spec(self):
        return {"class": "Squares", "boxes": self.boxes, "claimed": self.claimed}


# --------------------------------------------------------------------------- boxes from maps


def test_box_from_map_largest_component_by_hand():
    heat = np.zeros((6, 8))
    heat[1:3, 1:4] = 1.0  # A: 2×3 = 6 pixels, box (1, 1, 4, 3)
    heat[4, 5:8] = 0.5  # B: 3 pixels, box (5, 4, 8, 5)
    heat[0, 7] = 0.1  # below 20% of the maximum
    assert B.box_from_map(heat, 0.2) == (1.0, 1.0, 4.0, 3.0)
    assert B.box_from_map(heat, 0.6) == (1.0, 1.0, 4.0, 3.0)  # B is gone, A remains
    np.testing.assert_array_equal(B.box_from_map(heat, 0.2, component="all"),
                                  [[1, 1, 4, 3], [5, 4, 8, 5]])
    # at τ = 0.05 the lone pixel (0, 7) joins as its own component; A is still the largest
    assert len(B.box_from_map(heat, 0.05, component="all")) == 3
    assert B.box_from_map(np.zeros((4, 4)), 0.2) is None  # flat: scaled to 0, nothing ≥ 0.2
    # 8-connectivity: diagonal neighbours are one component
    diag = np.zeros((4, 4))
    diag[0, 0] = diag[1, 1] = 1.0
    assert B.box_from_map(diag, 0.5) == (0.0, 0.0, 2.0, 2.0)
    # min–max scaling: adding a constant or scaling changes nothing
    assert B.box_from_map(3 * heat - 7, 0.2) == (1.0, 1.0, 4.0, 3.0)
    # a tie in size: the component met first in reading order
    tie = np.zeros((3, 5))
    tie[0, 3:5] = 1.0
    tie[2, 0:2] = 1.0
    assert B.box_from_map(tie, 0.5) == (3.0, 0.0, 5.0, 1.0)


def test_box_around_points_by_hand():
    # points (row, col): rows 2..7, cols 1..9 → pixel edges (1, 2, 10, 8)
    assert B.box_around_points([[2, 5], [7, 1], [4, 9]]) == (1.0, 2.0, 10.0, 8.0)
    assert B.box_around_points(np.zeros((0, 2))) is None


def test_iou_by_hand():
    # overlap 2×2 = 4; union 16 + 16 − 4 = 28
    assert B.box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == pytest.approx(4 / 28)
    assert B.box_iou((0, 0, 4, 4), (4, 0, 8, 4)) == 0.0  # touching edges only
    assert B.box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert B.box_iou((1, 2, 3, 5), (1, 2, 3, 5)) == 1.0
    assert B.box_iou(None, (0, 0, 1, 1)) == 0.0
    m = B.iou_matrix([[0, 0, 4, 4], [2, 2, 6, 6]], [[2, 2, 6, 6]])
    np.testing.assert_allclose(m, [[4 / 28], [1.0]])


HEAT = np.array([[0.0, 0.0, 0.0, 0.0],
                 [0.0, 0.6, 0.6, 0.0],
                 [0.0, 0.6, 1.0, 0.0],
                 [0.0, 0.0, 0.0, 0.0]])


def test_box_hits_and_max_box_acc_by_hand():
    taus = B.default_thresholds(4)  # 0, 0.25, 0.5, 0.75
    np.testing.assert_array_equal(taus, [0, 0.25, 0.5, 0.75])
    # truth = the 2×2 block. τ=0: everything, box (0,0,4,4), IoU 4/16 = 0.25 < 0.3;
    # τ=0.25 and 0.5: the block, IoU 1; τ=0.75: the one pixel (2,2), IoU 1/4 = 0.25
    largest, best = B.box_hits(HEAT, [[1, 1, 3, 3]], taus)
    np.testing.assert_array_equal(largest, [[0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(best, largest)  # one component at every τ
    # truth = the whole 4×4 image: IoU 1 at τ=0; 4/16 at τ=0.25 and 0.5; 1/16 at τ=0.75
    largest2, _ = B.box_hits(HEAT, [[0, 0, 4, 4]], taus)
    np.testing.assert_array_equal(largest2, [[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    # over the two images: hits τ × δ = [[1,1,1],[1,1,1],[1,1,1],[0,0,0]]: MaxBoxAcc 1/2
    # for every δ, first reached at τ = 0
    acc, tau = B.max_box_acc(largest + largest2, 2, taus)
    np.testing.assert_array_equal(acc, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(tau, [0, 0, 0])
    # several true boxes: the best-matching one counts
    l3, _ = B.box_hits(HEAT, [[0, 0, 4, 4], [1, 1, 3, 3]], taus)
    np.testing.assert_array_equal(l3, [[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]])


def test_box_hits_best_component_differs_from_largest():
    # a big wrong blob (3×3 = 9 pixels) and a small right one (2×2 = 4 pixels)
    heat = np.zeros((8, 8))
    heat[0:3, 0:3] = 1.0
    heat[5:7, 5:7] = 1.0
    largest, best = B.box_hits(heat, [[5, 5, 7, 7]], [0.5])
    np.testing.assert_array_equal(largest, [[0, 0, 0]])  # the CAM rule picks the big blob
    np.testing.assert_array_equal(best, [[1, 1, 1]])  # one of the boxes is exact


def test_intervals_by_hand():
    # Wilson, 1 of 2, z = 1.96: centre = (0.5 + z²/4) / (1 + z²/2) = 0.5;
    # half = z·sqrt(0.25/2 + z²/16) / (1 + z²/2) = 1.96·0.60423/2.92073 = 0.40547
    low, high = wilson(1, 2)
    assert low == pytest.approx(0.5 - 0.40547, abs=1e-4)
    assert high == pytest.approx(0.5 + 0.40547, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    # mean of 1, 2, 3: 2; s = 1; t(2 dof, 0.975) = 4.302653; half = 4.302653/sqrt(3) = 2.48414
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, math.nan])
    assert mean == 2.0
    assert lo == pytest.approx(2 - 2.48414, abs=1e-4) and hi == pytest.approx(2 + 2.48414, abs=1e-4)


# --------------------------------------------------------------------------- boxes into the crop


def test_boxes_follow_resize_and_crop_by_hand():
    pre = Preprocess(None, (224, 224), (0, 0, 0), (1, 1, 1), 0.875)
    # 512×256 (w×h): scale = max(224/0.875/256, 224/0.875/512) = 1, so no resize;
    # left = (512 − 224) // 2 = 144, top = (256 − 224) // 2 = 16
    assert pre.crop_geometry(512, 256) == (512, 256, 144, 16)
    boxes, clipped, dropped = pre.map_boxes([[200, 50, 300, 150],   # → (56, 34, 156, 134)
                                             [100, 0, 200, 100],    # → (−44, −16, 56, 84): clipped
                                             [0, 0, 100, 100]], 512, 256)  # → x1 = −44: dropped
    np.testing.assert_allclose(boxes, [[56, 34, 156, 134], [0, 0, 56, 84]])
    assert (clipped, dropped) == (1, 1)
    # 128×128: scale = 256/128 = 2, resized 256×256, left = top = 16: (8, 8, 24, 24) → (0, 0, 32, 32)
    np.testing.assert_allclose(pre.map_boxes([[8, 8, 24, 24]], 128, 128)[0], [[0, 0, 32, 32]])


def test_mapped_box_lines_up_with_the_display_image():
    model = red_net()
    model = cw.Model(model.module, mean=(0, 0, 0), std=(1, 1, 1), input_size=(56, 56))
    image = np.zeros((120, 200, 3), np.uint8)
    image[30:90, 110:170] = 255  # a white square, box (110, 30, 170, 90)
    display = model.prepare(image)[1]
    (x0, y0, x1, y1), = model.map_boxes([[110, 30, 170, 90]], 200, 120)[0]
    # the square fills the mapped box (a pixel in from its edges, which bilinear blurs) …
    inside = display[int(math.ceil(y0)) + 1:int(y1) - 1, int(math.ceil(x0)) + 1:int(x1) - 1]
    assert inside.size and inside.min() > 0.9
    bright = np.argwhere(display.mean(2) > 0.5)
    # … and nothing bright lies more than a pixel outside it (bilinear edges)
    assert bright[:, 1].min() >= x0 - 1 and bright[:, 1].max() < x1 + 1
    assert bright[:, 0].min() >= y0 - 1 and bright[:, 0].max() < y1 + 1


# --------------------------------------------------------------------------- data sets


def test_synsets_are_torchvisions_class_order():
    synsets = cw.datasets.imagenet_synsets()
    assert len(synsets) == 1000 == len(set(synsets)) and synsets == sorted(synsets)
    labels = cw.engine.imagenet_labels()
    # torchvision's ImageNette reader names ten synsets with their ImageNet class names: each
    # must sit at the index of that name in torchvision's ImageNet labels
    from torchvision.datasets import Imagenette

    known = {wnid: names[0] for wnid, names in Imagenette._WNID_TO_CLASS.items()}
    assert len(known) == 10
    for synset, name in known.items():
        assert labels[synsets.index(synset)] == name


VOC = """<annotation><filename>{stem}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{syn}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
       "<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _write_ilsvrc(folder):
    """Three annotated images, one XML that does not parse, one with an unknown synset, one
    image without XML."""
    folder.mkdir()
    ann = folder / "ann"
    ann.mkdir()
    for i in range(1, 7):
        Image.new("RGB", (60, 40), (i * 30, 0, 0)).save(folder / f"val_{i:03d}.JPEG")
    objs = OBJ.format(syn="n01440764", x0=11, y0=6, x1=30, y1=20) + OBJ.format(
        syn="n01440764", x0=41, y0=1, x1=70, y1=40) + OBJ.format(  # reaches past x = 60
        syn="n02102040", x0=1, y0=1, x1=5, y1=5)  # another synset: left out
    (ann / "val_001.xml").write_text(VOC.format(stem="val_001", w=60, h=40, objects=objs))
    (ann / "val_002.xml").write_text(VOC.format(stem="val_002.JPEG", w=60, h=40, objects=OBJ.format(
        syn="n03888605", x0=1, y0=1, x1=60, y1=40)))
    (ann / "val_003.xml").write_text(VOC.format(stem="val_003", w=60, h=40, objects=OBJ.format(
        syn="n02102040", x0=5, y0=5, x1=10, y1=10)))
    (ann / "val_004.xml").write_text("<annotation><object>")  # truncated
    (ann / "val_005.xml").write_text(VOC.format(stem="val_005", w=60, h=40, objects=OBJ.format(
        syn="n99999999", x0=1, y0=1, x1=5, y1=5)))
    return folder, ann


def test_ilsvrc_layout_reader(tmp_path):
    root, ann = _write_ilsvrc(tmp_path / "val")
    with pytest.warns(UserWarning, match="3 annotation"):
        ds = ImageFolderBoxes(root, ann)
    assert len(ds) == 3
    item = ds[0]
    assert item["name"] == "val_001.JPEG" and item["label"] == 0  # n01440764 is class 0
    # VOC corners are 1-based inclusive: 11..30 → edges [10, 30); the second box is clipped
    # to the 60-pixel-wide image: [40, 60)
    np.testing.assert_array_equal(item["boxes"], [[10, 5, 30, 20], [40, 0, 60, 40]])
    assert ds.clipped == 1
    assert ds[1]["label"] == cw.datasets.imagenet_synsets().index("n03888605")
    assert item["image"].shape == (40, 60, 3)
    problems = {p.file.split("/")[-1]: p.reason for p in ds.problems}
    assert set(problems) == {"val_004.xml", "val_005.xml", "val_006.JPEG"}
    assert "XML" in problems["val_004.xml"] and "n99999999" in problems["val_005.xml"]
    assert "no annotation" in problems["val_006.JPEG"]
    with pytest.raises(AnnotationError, match="val_004.xml"):
        ImageFolderBoxes(root, ann, errors="raise")


def test_csv_reader(tmp_path):
    Image.new("RGB", (50, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 30)).save(tmp_path / "b.png")
    (tmp_path / "boxes.csv").write_text(
        "path,x0,y0,x1,y1,class\n"
        "a.png,1,2,11,12,7\n"
        "a.png,20,5,40,25,7\n"
        "b.png,0,0,10,10,n01443537\n"
        "b.png,x,0,10,10,3\n"  # not a number
        "c.png,0,0,10,10,3\n"  # no image
        "b.png,5,5,5,9,3\n")  # empty
    with pytest.warns(UserWarning, match="3 annotation"):
        ds = ImageFolderBoxes(tmp_path / "boxes.csv")
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[0]["boxes"], [[1, 2, 11, 12], [20, 5, 40, 25]])
    assert ds[0]["label"] == 7 and ds[1]["label"] == 1  # n01443537 is class 1
    assert sorted(p.file.rsplit(":", 1)[1] for p in ds.problems) == ["5", "6", "7"]
    (tmp_path / "bad.csv").write_text("file,a,b\n")
    with pytest.raises(AnnotationError, match="header"):
        ImageFolderBoxes(tmp_path / "bad.csv")


def test_synthetic_boxes_are_exact_and_seeded():
    from skimage import data as skdata

    ds = SyntheticBoxes(6, size=(96, 128), seed=3, objects=["cat", "espresso"], distractor=0)
    again = SyntheticBoxes(6, size=(96, 128), seed=3, objects=["cat", "espresso"], distractor=0)
    for i in range(len(ds)):
        a, b = ds[i], again[i]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
        x0, y0, x1, y1 = (int(v) for v in a["boxes"][0])
        name = a["name"].split("-", 1)[1]
        function, crop, label, _ = OBJECTS[name]
        assert a["label"] == label
        # the box holds exactly the object, cut from its photo and resized to the box
        expected = Image.fromarray(getattr(skdata, function)()).crop(crop).resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(a["image"][y0:y1, x0:x1], np.asarray(expected))
    other = SyntheticBoxes(6, size=(96, 128), seed=4, objects=["cat", "espresso"], distractor=0)
    assert not np.array_equal(ds[0]["image"], other[0]["image"])


# --------------------------------------------------------------------------- evaluate

# square 0 annotated right; square 1 annotated at the wrong place (IoU 0)
SQUARES = dict(boxes=[(4, 6, 14, 20), (18, 2, 30, 12)],
               claimed=[(4, 6, 14, 20), (0, 20, 10, 30)])


def test_evaluate_by_hand():
    model = red_net()
    snap = snapshot(model.module)
    ds = Squares(**SQUARES)
    ev = cw.evaluate(model, ds, ["grad_cam"], threshold=0.2, steps=4, progress=False,
                     n_thresholds=10)
    assert_unchanged(model.module, snap)
    r = ev.rows("grad_cam")
    np.testing.assert_array_equal(r["index"], [0, 1])
    # the Grad-CAM map is the red channel: its box is the red square
    np.testing.assert_array_equal(np.stack([r["x0"], r["y0"], r["x1"], r["y1"]], 1),
                                  [[4, 6, 14, 20], [18, 2, 30, 12]])
    np.testing.assert_array_equal(r["iou"], [1.0, 0.0])
    np.testing.assert_array_equal(r["localization"], [1.0, 0.0])
    np.testing.assert_array_equal(r["pointing"], [1.0, 0.0])  # 20.1 px > 15: see below
    np.testing.assert_array_equal(r["predicted"], [0, 0])
    # deletion / insertion are cw.metrics' own areas for the same map
    for i in range(2):
        a = cw.attribute(model, ds[i]["image"], "grad_cam", target=0)
        assert r["deletion"][i] == cw.metrics.deletion(model, ds[i]["image"], a, steps=4).auc
        assert r["insertion"][i] == cw.metrics.insertion(model, ds[i]["image"], a, steps=4).auc
    s = ev.summary()[0]
    assert s["n"] == 2 and s["localization"][0] == 0.5
    assert s["localization"][1] == pytest.approx(0.0945, abs=1e-4)  # Wilson, 1 of 2
    # MaxBoxAcc: image 0 is hit for τ in 0.1 … 0.9 (the map is 0 off the square), image 1
    # never: 1/2
    assert s["maxboxacc"][0] == 0.5 and s["maxboxacc_threshold"] == 0.1
    assert s["top1_loc"][0] == 0.5
    text = ev.table()
    assert "grad_cam" in text and "0.500 [0.095, 0.905]" in text
    assert ev.table("markdown").startswith("| method | n |")
    assert list(ev.ranked("grad_cam", "iou")) == [0, 1]


def test_pointing_distance_by_hand():
    # square 1's map is flat on its square (18..29 × 2..11), so its maximum is the first such
    # pixel in reading order, (row 2, col 18); the claimed box (0, 20, 10, 30) is nearest at
    # (row 20, col 9): sqrt(18² + 9²) = 20.12 px — a miss with the default tolerance of 15,
    # a hit with 21
    model = red_net()
    ds = Squares(**SQUARES)
    miss = cw.evaluate(model, ds, ["grad_cam"], ["pointing"], progress=False)
    hit = cw.evaluate(model, ds, ["grad_cam"], ["pointing"], tolerance=21, progress=False)
    assert miss.rows("grad_cam")["pointing"][1] == 0.0
    assert hit.rows("grad_cam")["pointing"][1] == 1.0


def test_fixations_use_the_box_around_their_points():
    model = red_net()
    ds = Squares(**SQUARES)
    ev = cw.evaluate(model, ds, ["fixations"], ["localization"], progress=False)
    for i in range(2):
        fx = cw.fixations(model, ds[i]["image"], target=0)
        x0, y0, x1, y1 = fx.box()  # inclusive pixel indices
        r = ev.rows("fixations")
        assert (r["x0"][i], r["y0"][i], r["x1"][i], r["y1"][i]) == (x0, y0, x1 + 1, y1 + 1)


def test_top1_target_and_model_restored_after_an_error():
    model = red_net()
    snap = snapshot(model.module)

    class Broken(Squares):
        def __getitem__(self, i):
            if i == 2:
                raise RuntimeError("unreadable image")
            return super().__getitem__(i)

    with pytest.raises(RuntimeError, match="unreadable"):
        cw.evaluate(model, Broken([(0, 0, 5, 5)] * 3), ["grad_cam"], progress=False,
                    batch_size=1, steps=2)
    assert_unchanged(model.module, snap)
    ev = cw.evaluate(model, Squares(**SQUARES), ["grad_cam", "saliency"], ["localization"],
                     targets=("label", "top1"), progress=False)
    assert ev.targets == ["label", "top1"]
    assert len(ev.columns["index"]) == 2 * 2 * 2  # images × methods × targets
    np.testing.assert_array_equal(ev.rows("saliency", "top1")["target"], [0, 0])


def test_save_load_round_trip(tmp_path):
    ev = cw.evaluate(red_net(), Squares(**SQUARES), ["grad_cam", "saliency"], steps=3,
                     progress=False)
    path = ev.save(tmp_path / "ev")
    assert path.name == "ev.npz"
    back = cw.Evaluation.load(path)
    assert back.equals(ev) and back.table() == ev.table()
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(EvaluationFileError, match="other.npz"):
        cw.Evaluation.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK not really")
    with pytest.raises(EvaluationFileError, match="junk.npz"):
        cw.Evaluation.load(tmp_path / "junk.npz")


def test_resume_from_cache(tmp_path):
    model = red_net()
    ds = Squares([(i, i, i + 6, i + 6) for i in range(5)])
    full = cw.evaluate(model, ds, ["grad_cam"], steps=2, batch_size=2, progress=False)
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 2:
            stop.set()  # after the first block of two images

    with pytest.raises(cw.Cancelled):
        cw.evaluate(model, ds, ["grad_cam"], steps=2, batch_size=2, progress=progress,
                    cancel=stop, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("block-*.npz"))) == 1
    first = []
    resumed = cw.evaluate(model, ds, ["grad_cam"], steps=2, batch_size=2, cache_dir=tmp_path,
                          progress=lambda done, total: first.append(done))
    assert first[0] == 2  # the cached block counted at once, then one image at a time
    assert resumed.equals(full)


def test_maps_dir_and_examples(tmp_path):
    model = red_net()
    ds = Squares(**SQUARES)
    ev = cw.evaluate(model, ds, ["grad_cam"], ["localization"], maps_dir=tmp_path / "maps",
                     progress=False)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["0000000.npz", "0000001.npz"]
    e = ev.example(0, "grad_cam", dataset=ds)  # the map read back from maps_dir
    a = cw.attribute(model, ds[0]["image"], "grad_cam", target=0)
    np.testing.assert_allclose(e["map"], a.map, atol=1e-3)  # stored as float16
    np.testing.assert_array_equal(e["truth"], [[4, 6, 14, 20]])
    assert e["box"] == (4, 6, 14, 20)


# --------------------------------------------------------------------------- processes, CLI


FIVE = [(i, 2 * i, i + 8, 2 * i + 9) for i in range(5)]


def _rank_main(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        ev = cw.evaluate(red_net(), Squares(FIVE), ["grad_cam", "fixations"], steps=3,
                         batch_size=2, progress=False)
        ev.save(f"{out}/rank{rank}.npz")
    finally:
        dist.destroy_process_group()


def test_two_process_run_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = cw.evaluate(red_net(), Squares(FIVE), ["grad_cam", "fixations"], steps=3,
                         batch_size=3, progress=False)  # other blocks: the same result
    for rank in (0, 1):
        assert cw.Evaluation.load(tmp_path / f"rank{rank}.npz").equals(single)


def test_command_line(tmp_path, capsys):
    from cnnwidgets.cli import main

    for i, (x0, y0, x1, y1) in enumerate(FIVE[:3]):
        image = np.zeros((32, 32, 3), np.uint8)
        image[y0:y1, x0:x1, 0] = 200
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1,class\n" + "".join(
        f"{i}.png,{x0},{y0},{x1},{y1},0\n" for i, (x0, y0, x1, y1) in enumerate(FIVE[:3])))
    out = tmp_path / "e.npz"
    assert main(["evaluate", "--model", "test_evaluation:red_net", "--data",
                 str(tmp_path / "boxes.csv"), "--methods", "grad_cam", "--steps", "2",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "saved" in printed and "grad_cam" in printed and "MaxBoxAcc" in printed
    direct = cw.evaluate(red_net(), ImageFolderBoxes(tmp_path / "boxes.csv"), ["grad_cam"],
                         steps=2, progress=False)
    loaded = cw.Evaluation.load(out)
    loaded.settings["model"] = direct.settings["model"]  # the CLI's wrapper names it alike
    assert loaded.equals(direct)
    assert loaded.summary()[0]["localization"][0] == 1.0
