"""DissectionExplorer: traitlets and controls change what the figure shows (no browser)."""
from __future__ import annotations

import numpy as np
import pytest
import traitlets
from torch import nn

import cnnwidgets as cw
from cnnwidgets.render import dissection as render


@pytest.fixture(scope="module")
def result():
    import torch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = cw.Model(net, input_size=(24, 24))
    return cw.dissect(model, cw.datasets.SyntheticConcepts(16, 24), ["1", "3"], quantile=0.02,
                      progress=False, top_n=4)


def test_outline_and_overlay_by_hand():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    edge = render.outline(m)
    # a 3×3 square: its 8 border pixels, not the centre
    assert edge.sum() == 8 and not edge[2, 2] and edge[1, 1]
    rgba = render.overlay(m, (1.0, 0.0, 0.0), 0.5)
    assert rgba.shape == (5, 5, 4) and rgba[2, 2].tolist() == [1, 0, 0, 0.5] and rgba[0, 0, 3] == 0


def test_explorer_follows_layer_unit_and_sort(result, tmp_path):
    w = cw.DissectionExplorer(result)
    assert w.dataset is not None  # rebuilt from the result's spec
    assert w.layer == "1" and w._layer_box.value == "1"
    image0 = w._cells[0]["image"].get_array().copy()
    unit_overlay = w._cells[0]["unit"].get_array().copy()

    # pick another unit whose top image differs
    other = next(r.unit for r in result.units("1")
                 if result.top_images("1", r.unit)[0] != result.top_images("1", w.unit)[0])
    w.unit = other
    assert w._unit_box.value == other
    assert not np.array_equal(w._cells[0]["image"].get_array(), image0)
    assert not np.array_equal(w._cells[0]["unit"].get_array(), unit_overlay)
    record = result.units("1")[other]
    assert record.concept in w.info.value and f"{record.iou:.3f}" in w.info.value
    expected = result.top_images("1", other)[0]
    shown = w._cells[0]["image"].get_array()
    assert np.allclose(shown, w.dataset[expected]["image"] / 255.0)

    # the unit's outline is the boundary of its binarised map on that image
    mask = result.unit_mask("1", other, 0, (24, 24))
    assert np.array_equal(w._cells[0]["unit"].get_array()[..., 3] > 0, render.outline(mask))

    # the layer dropdown sets the traitlet; the category bars follow the layer
    heights = [b.get_height() for b in w._cat_bars["bars"]]
    w._layer_box.value = "3"
    assert w.layer == "3"
    summary = result.summary()["3"]
    assert [b.get_height() for b in w._cat_bars["bars"]] == [summary[c] for c in w.categories]
    assert len(w._unit_box.options) == 5
    _ = heights

    # sorting by IoU lists the best unit first; by unit, in index order
    w.sort = "iou"
    ious = [r.iou for r in result.units("3", sort="iou")]
    assert w._unit_box.options[0][1] == result.units("3", sort="iou")[0].unit
    assert ious == sorted(ious, reverse=True)
    w._sort_box.value = "unit"
    assert w.sort == "unit" and [v for _, v in w._unit_box.options] == list(range(5))
    w.detectors_only = True
    assert [v for _, v in w._unit_box.options] == [r.unit for r in result.detectors("3", sort="unit")]

    with pytest.raises(traitlets.TraitError, match="no layer"):
        w.layer = "nope"
    with pytest.raises(traitlets.TraitError, match="unit must be"):
        w.unit = 99
    w.save(tmp_path / "explorer.png")
    assert (tmp_path / "explorer.png").stat().st_size > 1000


def test_explorer_without_dataset_shows_unit_maps(result, tmp_path):
    path = result.save(tmp_path / "r.npz")
    loaded = cw.DissectionResult.load(path)
    loaded.dataset = {"class": "Elsewhere"}  # cannot be rebuilt here
    w = cw.DissectionExplorer(loaded)
    assert w.dataset is None
    # the image cells show the unit's own (normalised) map
    shown = w._cells[0]["image"].get_array()
    m = loaded.unit_map(w.layer, w.unit, 0)
    assert shown.shape[:2] == m.shape
    assert np.allclose(shown[..., 0], (m - m.min()) / (m.max() - m.min()))
    # and a path works as well as a result
    assert cw.DissectionExplorer(str(path)).result.equals(loaded)


def test_explorer_on_broden_masks_at_half_size(tmp_path):
    from test_dissection import color_net, make_broden

    make_broden(tmp_path)
    ds = cw.datasets.Broden(tmp_path)
    result = cw.dissect(color_net(), ds, "1", quantile=0.1, progress=False)
    w = cw.DissectionExplorer(result)  # the data set is reopened from its root
    assert isinstance(w.dataset, cw.datasets.Broden)
    w.unit = 0
    cell = w._cells[0]
    # the 8×8 image and the 4×4 masks cover the same extent, so they line up
    assert cell["image"].get_array().shape[:2] == (8, 8)
    assert cell["concept"].get_array().shape[:2] == (4, 4)
    assert cell["image"].get_extent() == cell["concept"].get_extent() == cell["unit"].get_extent()
    # red unit on a red image: everything but the red-c 2×2 block is dimmed
    assert (cell["concept"].get_array()[:2, :2, 3] == 0).all()
    assert (cell["concept"].get_array()[2:, :, 3] > 0).all()
