"""Network dissection: data sets, the streaming quantile, upsampling, IoU tallies, results,
distributed runs and the command line."""
from __future__ import annotations

import csv
import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import dissection as D
from cnnwidgets.engine.hooks import hook_count

# --------------------------------------------------------------------------- helpers


def color_net():
    """Two hand-set 1×1 convolutions on [0, 1] RGB, clipped to [0, 1] (Hardtanh):
    unit 0 = 50·(R − G − B) − 27.5 fires on the synthetic red (220, 20, 30): 50·0.667 − 27.5 = 5.8,
    but not on orange (255, 140, 0): 50·0.451 − 27.5 = −5.0, nor brown, pink or purple;
    unit 1 = 50·(B − R − G) − 12.5 fires on blue (30, 60, 220): 50·0.510 − 12.5 = 13.0,
    but not on purple (130, 40, 170): 50·0 − 12.5 < 0."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 0, 0] = torch.tensor([50.0, -50.0, -50.0])
        conv.weight[1, :, 0, 0] = torch.tensor([-50.0, -50.0, 50.0])
        conv.bias.copy_(torch.tensor([-27.5, -12.5]))
    net = nn.Sequential(conv, nn.Hardtanh(0, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return cw.Model(net, mean=(0, 0, 0), std=(1, 1, 1), input_size=(32, 32))


def small_net(seed=0):
    """A tiny random CNN with two dissectable layers (8 units at 16×16, 12 units at 8×8)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )
    return cw.Model(net, input_size=(16, 16))


def snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [m.training for m in module.modules()], [p.requires_grad for p in module.parameters()])


def assert_unchanged(module, snap):
    state, training, requires = snap
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in module.modules()] == training
    assert [p.requires_grad for p in module.parameters()] == requires
    assert hook_count(module) == 0


# --------------------------------------------------------------------------- the synthetic set


def test_synthetic_set_is_deterministic_and_exact():
    ds = cw.datasets.SyntheticConcepts(20, 48, seed=3)
    assert len(ds) == 20 and len(ds.concepts) == 21
    assert set(ds.categories.values()) == {"color", "texture", "shape"}
    assert ds.categories["red"] == "color" and ds.categories["striped"] == "texture"
    a, b = ds[7], cw.datasets.SyntheticConcepts(20, 48, seed=3)[7]
    assert np.array_equal(a["image"], b["image"])
    assert not np.array_equal(ds[7]["image"], cw.datasets.SyntheticConcepts(20, 48, seed=4)[7]["image"])
    for i in range(len(ds)):
        item = ds[i]
        image, (color, texture, shape) = item["image"], item["masks"]
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        # every pixel has exactly the RGB value of its colour label
        palette = np.array(list(cw.datasets.COLORS.values()), np.uint8)
        assert (color >= 0).all()
        assert np.array_equal(palette[color], image)
        # textures and shapes are labelled with indices of their own category, never both
        assert all(ds.categories[ds.concepts[c]] == "texture" for c in np.unique(texture[texture >= 0]))
        assert all(ds.categories[ds.concepts[c]] == "shape" for c in np.unique(shape[shape >= 0]))
        assert not ((texture >= 0) & (shape >= 0)).any()
    with pytest.raises(IndexError):
        ds[20]


# --------------------------------------------------------------------------- the maths by hand


def test_streaming_quantile_by_hand():
    # one unit, 3 images of 2×2 values 1..12: n = 12, quantile 0.25 → r = ceil(3) = 3,
    # the 3rd largest of 1..12 is 10
    st = D._Thresholds(3, (1, 2, 2), 0.25, max_values=10**6, top_n=2)
    values = torch.arange(1, 13, dtype=torch.float32).reshape(3, 1, 2, 2)
    st.update(values[:2], torch.tensor([0, 1]))  # batches of 2 and 1
    st.update(values[2:], torch.tensor([2]))
    assert st.rank == 3
    threshold, minimum = st.finish()
    assert threshold.tolist() == [10.0] and minimum.tolist() == [1.0]
    # top images by maximum: image 2 (12) then image 1 (8); their maps kept
    assert st.top_index.tolist() == [[2, 1]]
    assert st.top_maps[0, 0].tolist() == [9, 10, 11, 12]
    # the buffer never holds more than r values after a merge
    assert st.buffer.shape[1] <= 3


def test_quantile_memory_is_bounded():
    # 1,000 images of 4 units × 10×10: r would be ceil(0.005 · 100,000) = 500 per unit, 2,000
    # in all; with max_values=400 each image contributes a fixed subsample of positions instead
    st = D._Thresholds(1000, (4, 10, 10), 0.005, max_values=400, top_n=1)
    assert st.sample is not None and st.rank * 4 <= 400
    g = torch.Generator().manual_seed(0)
    for start in range(0, 1000, 100):
        st.update(torch.rand(100, 4, 10, 10, generator=g), torch.arange(start, start + 100))
        assert st.buffer.shape[1] + st.pending_size <= max(st.rank, 4096) + 400
    t, _ = st.finish()
    # uniform values: the top 0.5% starts near 0.995
    assert ((t > 0.98) & (t < 1.0)).all()


def test_bilinear_upsampling_by_hand():
    # 2×2 → 4×4 with align_corners=False: output pixel i samples source (i + 0.5)/2 − 0.5,
    # i.e. −0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    up = D.upsample(a, (4, 4)).reshape(4, 4)
    row0 = [0.0, 0.25, 0.75, 1.0]
    row3 = [2.0, 2.25, 2.75, 3.0]
    expected = [row0, [0.75 * a + 0.25 * b for a, b in zip(row0, row3)],
                [0.25 * a + 0.75 * b for a, b in zip(row0, row3)], row3]
    assert torch.allclose(up, torch.tensor(expected))


@pytest.mark.parametrize("native,hw", [((7, 7), (24, 24)), ((5, 3), (12, 11)), ((8, 8), (4, 4)),
                                       ((6, 6), (6, 6))])
def test_sparse_tally_equals_dense_reference(native, hw):
    """The tally only upsamples cells that reach the threshold; it must count exactly what the
    dense recipe (upsample everything, binarise, multiply by the masks) counts."""
    g = torch.Generator().manual_seed(sum(native) + sum(hw))
    N, C, K = 3, 5, 4
    act = torch.rand(N, C, *native, generator=g) ** 3
    threshold = torch.quantile(act.transpose(0, 1).reshape(C, -1), 0.7, dim=1)
    minimum = act.amin(dim=(0, 2, 3))
    P = hw[0] * hw[1]
    batch = {"hw": [hw] * N, "ids": [], "masks": [], "labels": [], "annotated": []}
    for n in range(N):
        labels = torch.randint(-1, K, (P,), generator=g)
        ids = torch.unique(labels[labels >= 0])
        batch["ids"].append(ids)
        batch["masks"].append(labels[None, :] == ids[:, None])
        batch["labels"].append(torch.tensor([n % K]))
        batch["annotated"].append(torch.tensor([True, n != 1]))
    tally = D._Tally(C, K, 2)
    tally.update(act, threshold, minimum, batch)
    # dense reference
    inter = torch.zeros(C, K, dtype=torch.int64)
    unit_area = torch.zeros(C, 2, dtype=torch.int64)
    up = D.binarize(D.upsample(act, hw), threshold, minimum)  # N×C×P
    for n in range(N):
        m = up[n].to(torch.int64)
        inter[:, batch["ids"][n]] += m @ batch["masks"][n].T.to(torch.int64)
        inter[:, batch["labels"][n]] += m.sum(1, keepdim=True)
        unit_area[:, batch["annotated"][n]] += m.sum(1, keepdim=True)
    assert up.any() and torch.equal(tally.inter, inter) and torch.equal(tally.unit_area, unit_area)
    # and the upsampling is torch's bilinear one
    ref = torch.nn.functional.interpolate(act, size=hw, mode="bilinear", align_corners=False)
    assert torch.allclose(D.upsample(act, hw), ref.reshape(N, C, -1), atol=1e-6)


def test_binarize_ties_rule():
    x = torch.tensor([[0.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    # unit 0: threshold 1 above its minimum 0 → ties at 1 are in
    # unit 1: threshold 0 equals its minimum → only values above 0
    m = D.binarize(x, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert m.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_iou_tallies_by_hand():
    # concepts: 0 = "red" (color, pixels), 1 = "kitchen" (scene, image level)
    cats = torch.tensor([0, 1])
    # image 0: unit on the top row, red on the left column, scene "kitchen" annotated
    # image 1: unit on 3 pixels, red on 1 pixel (bottom right), no scene annotated
    act = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.0]]]])
    batch = {
        "hw": [(2, 2), (2, 2)],
        "ids": [torch.tensor([0]), torch.tensor([0])],
        "masks": [torch.tensor([[1, 0, 1, 0]], dtype=torch.bool),
                  torch.tensor([[0, 0, 0, 1]], dtype=torch.bool)],
        "labels": [torch.tensor([1]), torch.tensor([], dtype=torch.int64)],
        "annotated": [torch.tensor([True, True]), torch.tensor([True, False])],
    }
    tally = D._Tally(1, 2, 2)
    tally.update(act, torch.tensor([0.5]), torch.tensor([0.0]), batch)
    area = D.label_areas(batch, 2)
    # red: I = 1 (image 0, top-left) + 0 = 1; |L| = 2 + 1 = 3; unit area where color is
    #      annotated = 2 + 3 = 5; U = 5 + 3 − 1 = 7 → IoU 1/7
    # kitchen: I = 2 (the whole image 0 ∩ unit); |L| = 4; unit area where scene is annotated
    #      = 2 (image 0 only); U = 2 + 4 − 2 = 4 → IoU 1/2
    assert tally.inter.tolist() == [[1, 2]]
    assert tally.unit_area.tolist() == [[5, 2]]
    assert area.tolist() == [3, 4]
    iou = D.iou_matrix(tally.inter, tally.unit_area, area, cats)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1 / 2]]))


# --------------------------------------------------------------------------- dissect end to end


def test_hand_built_colour_detectors_get_their_concepts():
    model = color_net()
    snap = snapshot(model.module)
    ds = cw.datasets.SyntheticConcepts(40, 32)
    result = cw.dissect(model, ds, "1", progress=False, batch_size=16)
    units = result.units("1")
    assert [u.concept for u in units] == ["red", "blue"]
    assert all(u.category == "color" for u in units)
    # the unit's top-0.5% mask is exactly the colour's region: IoU 1
    assert [u.iou for u in units] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert [u.threshold for u in units] == [1.0, 1.0]
    assert [d.unit for d in result.detectors("1")] == [0, 1]
    assert result.summary()["1"] == {"color": 2, "texture": 0, "shape": 0, "concepts": 2}
    assert_unchanged(model.module, snap)
    # the top images of the red unit contain red; its mask on them is the red region
    red = ds.concepts.index("red")
    for rank, index in enumerate(result.top_images("1", 0)[:3]):
        item = ds[index]
        assert np.array_equal(result.unit_mask("1", 0, rank, (32, 32)), item["masks"][0] == red)


def test_disk_and_recompute_and_batch_sizes_agree():
    model, ds = small_net(), cw.datasets.SyntheticConcepts(24, 16, seed=1)
    a = cw.dissect(model, ds, ["1", "3"], progress=False, batch_size=8)
    b = cw.dissect(model, ds, ["1", "3"], progress=False, batch_size=5, features="recompute")
    assert a.equals(b)
    c = cw.dissect(model, ds, ["1", "3"], progress=False, batch_size=8, num_workers=1)
    assert a.equals(c)  # DataLoader workers generate the items: same result
    assert a.iou("3").shape == (12, 21) and (a.iou("3") >= 0).all() and (a.iou("3") <= 1).all()


class DictMasks:
    """The same data as a SyntheticConcepts set, masks given as {concept name: bool mask}."""

    def __init__(self, base):
        self.base, self.concepts, self.categories = base, base.concepts, base.categories

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        masks = {}
        for m in item["masks"]:
            for c in np.unique(m[m >= 0]):
                masks[self.concepts[c]] = m == c
        return {"image": Image.fromarray(item["image"]), "masks": masks}


def test_any_object_following_the_protocol():
    model, base = small_net(), cw.datasets.SyntheticConcepts(12, 16, seed=2)
    a = cw.dissect(model, base, "1", progress=False)
    b = cw.dissect(model, DictMasks(base), "1", progress=False)
    assert a.equals(b)
    with pytest.raises(TypeError, match="concept data set"):
        cw.dissect(model, [1, 2, 3], "1", progress=False)
    with pytest.raises(cw.LayerNotFoundError):
        cw.dissect(model, base, "conv9", progress=False)


class Exploding(cw.datasets.SyntheticConcepts):
    def __getitem__(self, i):
        if i == 5:
            raise RuntimeError("boom")
        return super().__getitem__(i)


def test_model_unchanged_after_an_exception():
    model = small_net()
    model.module.train()
    model.module[0].weight.requires_grad_(False)
    snap = snapshot(model.module)
    with pytest.raises(RuntimeError, match="boom"):
        cw.dissect(model, Exploding(8, 16), ["1", "3"], progress=False, batch_size=4)
    assert_unchanged(model.module, snap)


def test_save_load_round_trip_and_cache(tmp_path):
    model, ds = small_net(), cw.datasets.SyntheticConcepts(10, 16)
    result = cw.dissect(model, ds, ["1", "3"], progress=False, cache_dir=tmp_path)
    cached = list(tmp_path.glob("dissection-*.npz"))
    assert len(cached) == 1
    path = result.save(tmp_path / "r.npz")
    loaded = cw.DissectionResult.load(path)
    assert loaded.equals(result)
    assert loaded.units("3") == result.units("3") and loaded.summary() == result.summary()
    assert loaded.dataset == {"class": "SyntheticConcepts", "n_images": 10, "size": 16, "seed": 0}
    # a second call with the same arguments reopens the cached result without running the model
    calls = []
    handle = model.module.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = cw.dissect(model, ds, ["1", "3"], progress=False, cache_dir=tmp_path)
    finally:
        handle.remove()
    assert calls == [] and again.equals(result)
    assert not list(tmp_path.glob("cw-dissect-*"))  # the scratch folder is gone


# --------------------------------------------------------------------------- Broden


def _png(path, numbers):
    numbers = np.asarray(numbers, np.int64)
    rgb = np.stack([numbers % 256, numbers // 256, np.zeros_like(numbers)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def make_broden(root):
    """A 3-image Broden-format folder: 8×8 images, 4×4 masks (label = R + 256·G)."""
    (root / "images").mkdir(parents=True)
    labels = [(0, "-", ""), (1, "red-c", "color(3)"), (2, "dog", "object(2)"),
              (3, "kitchen", "scene(1)"), (4, "striped", "texture(1)"),
              (300, "tree", "object(1);part(0)")]
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for n, name, cat in labels:
            w.writerow([n, name, cat, 1, 1.0, ""])
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for c in ("color", "object", "part", "material", "scene", "texture"):
            w.writerow([c, 1, 1, 1, 1])
    rows = []
    red = np.zeros((4, 4), np.int64)
    red[:2, :2] = 1  # red in the top-left quarter (a 4×4 block of image pixels)
    for i in range(3):
        img = np.full((8, 8, 3), 128, np.uint8)
        if i < 2:
            img[:4, :4] = (220, 20, 30)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        color = ""
        obj = ""
        if i < 2:
            _png(root / "images" / f"im{i}_color.png", red)
            color = f"im{i}_color.png"
        if i == 1:
            o = np.zeros((4, 4), np.int64)
            o[2:, :] = 300  # tree (needs the green channel: 300 = 44 + 256·1)
            o[0, 3] = 2
            _png(root / "images" / f"im{i}_object.png", o)
            obj = f"im{i}_object.png"
        rows.append({"image": f"im{i}.png", "split": "train", "ih": 8, "iw": 8, "sh": 4, "sw": 4,
                     "color": color, "object": obj, "part": "", "material": "",
                     "scene": "3" if i == 2 else "", "texture": "4;" if i == 0 else ""})
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_broden_reader(tmp_path):
    make_broden(tmp_path)
    ds = cw.datasets.Broden(tmp_path)
    assert len(ds) == 3
    assert ds.concepts == ["red-c", "dog", "kitchen", "striped", "tree"]
    assert ds.categories == {"red-c": "color", "dog": "object", "kitchen": "scene",
                             "striped": "texture", "tree": "object"}
    item = ds[1]
    assert item["image"].shape == (8, 8, 3)
    color, obj = item["masks"]
    assert color.shape == (4, 4) and (color[:2, :2] == 0).all() and (color[2:] == -1).all()
    assert (obj[2:] == 4).all() and obj[0, 3] == 1 and obj[0, 0] == -1  # 300 decoded via G
    assert item["labels"] == [] and set(item["annotated"]) == {"color", "object"}
    assert ds[0]["labels"] == [3] and ds[2]["labels"] == [2]
    with pytest.raises(FileNotFoundError, match="index.csv"):
        cw.datasets.Broden(tmp_path / "nowhere")


def test_dissect_on_broden(tmp_path):
    make_broden(tmp_path)
    ds = cw.datasets.Broden(tmp_path)
    model = color_net()
    result = cw.dissect(model, ds, "1", quantile=0.1, progress=False)
    # the red unit fires on the 4×4 red block of images 0 and 1; downsampled bilinearly to the
    # 4×4 masks it is exactly the red-c mask's 2×2 block: IoU 1
    red = result.units("1")[0]
    assert red.concept == "red-c" and red.iou == pytest.approx(1.0)
    iou = result.iou("1")
    # texture "striped" is image-level on image 0: I = 4 (the unit's area there), |L| = 16,
    # unit area where texture is annotated = 4 → U = 16 → 0.25
    assert iou[0, ds.concepts.index("striped")] == pytest.approx(0.25)


# --------------------------------------------------------------------------- distributed, CLI


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = cw.dissect(small_net(), cw.datasets.SyntheticConcepts(23, 16, seed=5),
                            ["1", "3"], quantile=0.01, progress=False, batch_size=4, top_n=5)
        result.save(f"{out}/rank{rank}.npz")
    finally:
        dist.destroy_process_group()


def test_two_process_run_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = cw.dissect(small_net(), cw.datasets.SyntheticConcepts(23, 16, seed=5), ["1", "3"],
                        quantile=0.01, progress=False, batch_size=7, top_n=5)
    for rank in (0, 1):
        assert cw.DissectionResult.load(tmp_path / f"rank{rank}.npz").equals(single)


def test_command_line(tmp_path, capsys):
    from cnnwidgets.cli import main

    out = tmp_path / "cli.npz"
    assert main(["dissect", "--model", "test_dissection:small_net", "--layers", "1", "3",
                 "--synthetic", "6", "--size", "16", "--out", str(out), "--quiet"]) == 0
    assert "saved" in capsys.readouterr().out
    loaded = cw.DissectionResult.load(out)
    assert loaded.equals(cw.dissect(small_net(), cw.datasets.SyntheticConcepts(6, 16), ["1", "3"],
                                    progress=False))
