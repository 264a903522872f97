"""Occlusion by incremental inference (``cnnwidgets.engine.incremental``, Krypton): the boxes
each rule computes, worked out by hand, and the scores it gives equal to running the network
on every occluded copy (the ``incremental`` trick of ``engine/fast.py`` off) — on tiny networks
made for one rule each (float64, so that only a wrong rule, not rounding, can differ), on
ResNet-18 and EfficientNet-Lite0 (random weights, small inputs) and against Captum."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import fast, incremental, targets
from cnnwidgets.engine.attribution.perturbation import every_other, window_starts
from cnnwidgets.engine.hooks import hook_count, restored
from cnnwidgets.engine.incremental import Patch, clean_window, occluded_input, span
from cnnwidgets.engine.incremental.rules import changed_rows
from test_fast import _with_statistics  # batch-norm statistics far from (0, 1)


@contextlib.contextmanager
def trick(on: bool, name: str = "incremental"):
    was = name in fast.ENABLED
    (fast.ENABLED.add if on else fast.ENABLED.discard)(name)
    try:
        yield
    finally:
        (fast.ENABLED.add if was else fast.ENABLED.discard)(name)


# --------------------------------------------------------------------------- boxes by hand
def test_changed_rows_of_a_sliding_window():
    t = torch.tensor
    # 3×3, stride 2, padding 1: output row o reads input rows 2o−1 … 2o+1; changed rows 4…7
    # are read by o = ceil((4+1−2)/2) = 2 … floor((7+1)/2) = 4
    first, length = changed_rows(t([4]), 4, pad=1, k=3, s=2, d=1, size=8)
    assert (first.tolist(), length) == ([2], 3)
    # dilation 2, padding 2, stride 1: o reads o−2, o, o+2; rows 4…7 → o = 2 … 9
    first, length = changed_rows(t([4]), 4, pad=2, k=3, s=1, d=2, size=16)
    assert (first.tolist(), length) == ([2], 8)
    # at the map's edge the box is cut, and one length serves the batch: the second copy's box
    # (rows 0…2 → o = 0 … 1 after clipping o ≥ 0) is widened to 3 rows
    first, length = changed_rows(t([4, 0]), 4, pad=1, k=3, s=2, d=1, size=8)
    assert (first.tolist(), length) == ([2, 0], 3)
    # a 1×1 stride-2 window skips odd rows: row 5 alone changes no output; one row recomputed
    first, length = changed_rows(t([5]), 1, pad=0, k=1, s=2, d=1, size=4)
    assert length == 1


def test_span_with_a_threshold_keeps_the_middle():
    t = torch.tensor
    assert span(t([2]), t([11]), 16)[1] == 10  # exact: rows 2 … 11
    # τ = 0.5 of 16 rows: 8 rows around the middle (2 + 11 + 1) // 2 = 7 → rows 3 … 10
    first, length = span(t([2]), t([11]), 16, threshold=0.5)
    assert (first.tolist(), length) == ([3], 8)
    first, length = span(t([12]), t([15]), 16, threshold=0.125)  # 2 rows, inside the map
    assert (first.tolist(), length) == ([13], 2)


def test_window_reads_the_stored_map_with_the_box_pasted_in():
    full = torch.arange(16.0).view(1, 1, 4, 4)
    p = Patch(full, -torch.ones(1, 1, 2, 2), torch.tensor([1]), torch.tensor([2]))
    got = p.window(torch.tensor([-1]), torch.tensor([1]), 3, 4, fill=9.0)[0, 0]
    expected = [[9, 9, 9, 9],        # row −1: outside the map
                [1, 2, 3, 9],        # row 0: stored (column 4 is outside)
                [5, -1, -1, 9]]      # row 1: columns 2, 3 are the box's
    assert got.tolist() == expected
    assert p.whole()[0, 0].tolist() == [[0, 1, 2, 3], [4, 5, -1, -1], [8, 9, -1, -1],
                                        [12, 13, 14, 15]]
    assert clean_window(full, torch.tensor([3]), torch.tensor([3]), 2, 2, 0.0)[0, 0].tolist() \
        == [[15, 0], [0, 0]]


def test_occluded_input_clips_boxes_at_the_edge():
    x = torch.ones(1, 1, 5, 5)
    base = torch.zeros(1, 1, 5, 5)
    p = occluded_input(x, base, [(0, 0), (4, 4)], (2, 2))  # the second box is 1×1 (clipped)
    assert p.top.tolist() == [0, 3] and p.left.tolist() == [0, 3]
    assert p.values[0, 0].tolist() == [[0, 0], [0, 0]]
    assert p.values[1, 0].tolist() == [[1, 1], [1, 0]]


def test_every_other_keeps_the_last_window():
    assert every_other([0, 8, 16, 24, 32, 40, 48]) == [0, 16, 32, 48]
    assert every_other([0, 8, 16, 24]) == [0, 16, 24]


# --------------------------------------------------------------------------- one rule each
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn(self.conv1(x))))
        out += x  # in place, as torchvision's blocks
        return F.relu(out)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2, stride=1)

    def forward(self, x):
        return torch.cat([self.a(x), torch.sigmoid(self.b(x))], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, 2, 1)
        self.expand = nn.Conv2d(2, c, 1)

    def forward(self, x):
        s = self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return torch.sigmoid(s) * x


class Roll(nn.Module):
    """An operation without an incremental rule: the fallback runs from it on."""

    def forward(self, x):
        return torch.roll(x, 1, 3)


def head(c, k=5):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, k)]


NETWORKS = {
    "stride 2, batch norm": lambda: [nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(True),
                                     nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU6()] + head(4),
    "dilation": lambda: [nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Tanh(),
                         nn.Conv2d(4, 4, 3, dilation=3), nn.GELU()] + head(4),
    "groups": lambda: [nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=3),
                       nn.Conv2d(6, 6, 5, 2, 2, groups=6), nn.Hardswish()] + head(6),
    "padding": lambda: [nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU(),
                        nn.Conv2d(4, 4, (3, 5), stride=(1, 2), padding=(0, 3)), nn.SiLU()]
    + head(4),
    "residual": lambda: [nn.Conv2d(3, 3, 3, padding=1), Residual(), Residual()] + head(3),
    "concat": lambda: [Concat(), nn.Conv2d(6, 6, 1), nn.LeakyReLU(0.1)] + head(6),
    "pooling": lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1),
                        nn.MaxPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 1, 1),
                        nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1)] + head(4),
    "squeeze-excitation": lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), SqueezeExcite(),
                                   nn.Conv2d(4, 4, 3, padding=1)] + head(4),
    "fallback": lambda: [nn.Conv2d(3, 4, 3, padding=1), Roll(),
                         nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU()] + head(4),
}


def make(name, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(*NETWORKS[name]())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics far from (0, 1): folding matters
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.to(dtype).eval()


def scores(net, x, boxes, size, *, on, threshold=1.0, memo=None):
    model = cw.Model(net, input_size=tuple(x.shape[-2:]), labels=[str(i) for i in range(5)])
    base = torch.zeros_like(x)
    with trick(on), restored(net, frozen=True):
        return fast.occluded_scores(model, targets.resolve(model, 2), x, boxes, size, base, threshold,
                                    {} if memo is None else memo)


def grid(size, window, stride):
    starts = window_starts(size, window, stride)
    return [(r, c) for r in starts for c in starts]


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("window,stride", [(4, 3), (7, 5)])
def test_each_rule_gives_the_scores_of_the_occluded_copies(name, window, stride):
    net = make(name)
    x = torch.randn(1, 3, 19, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    boxes = grid(19, window, stride)  # 19 is no multiple of the strides: clipped edge boxes
    memo = {}
    got = scores(net, x, boxes, (window, window), on=True, memo=memo)
    want = scores(net, x, boxes, (window, window), on=False)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)
    run = memo[("incremental", True)]
    assert run is not None  # the incremental path ran
    whole = [n.name for n in run.whole]
    if name == "squeeze-excitation":  # the product with the pooled weights: the whole map
        assert len(whole) == 1 and whole[0].startswith("mul")
    elif name == "fallback":  # full inference from the operation without a rule
        assert len(whole) == 1 and whole[0].startswith("roll"), whole
    else:  # a box all the way to the global pooling
        assert whole == []


def test_boxes_of_a_stride_two_network_by_hand():
    net = make("stride 2, batch norm")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    memo = {}
    scores(net, x, [(4, 4)], (4, 4), on=True, memo=memo)
    sizes = [memo[("incremental", True)].sizes[k] for k in ("_1", "_2", "_3", "_4")]
    # rows 4…7: conv 3×3/2/1 → rows 2…4 (3); batch norm (folded into it: "_1"), ReLU keep it;
    # conv 3×3/2/1 on rows 2…4 → ceil((2+1−2)/2) = 1 … floor((4+1)/2) = 2: 2 rows
    assert sizes == [(3, 3), (3, 3), (2, 2), (2, 2)]


def test_threshold_one_is_exact_and_a_smaller_one_cuts_the_boxes():
    net = make("dilation")
    x = torch.randn(1, 3, 19, 19, dtype=torch.float64)
    boxes = grid(19, 4, 3)
    exact = scores(net, x, boxes, (4, 4), on=True, threshold=1.0)
    np.testing.assert_allclose(exact.numpy(), scores(net, x, boxes, (4, 4), on=False).numpy(),
                               rtol=1e-10, atol=1e-10)
    memo = {}
    cut = scores(net, x, boxes, (4, 4), on=True, threshold=0.25, memo=memo)
    # the first convolution's box (4 + 4 rows) is cut to ceil(0.25 · 19) = 5 rows
    assert memo[("incremental", True)].sizes["_0"] == (5, 5)
    assert not torch.allclose(cut, exact)


def test_no_session_where_a_hook_must_fire():
    net = make("residual")
    handle = net[1].register_forward_hook(lambda m, a, out: None)
    try:
        with restored(net):
            assert incremental.session(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64)) is None
    finally:
        handle.remove()
    assert hook_count(net) == 0


# --------------------------------------------------------------------------- whole networks
def resnet18():
    import torchvision

    torch.manual_seed(0)
    return _with_statistics(torchvision.models.resnet18(weights=None, num_classes=10))


def lite0():
    # its trained weights (shipped with the package, offline): with random ones its scores
    # barely move when a patch is occluded (drops ~1e-8), too small to compare anything
    return cw.load_model("efficientnet_lite0", device="cpu").module


def occlusion(model, image, on, **kw):
    with trick(on):
        return cw.attribute(model, image, "occlusion", target=3, progress=False, **kw)


@pytest.mark.parametrize("build,size,window,stride", [(resnet18, 64, 16, 8),
                                                      (lite0, 96, 24, 18)])
def test_networks_map_equals_plain_occlusion_and_captum(build, size, window, stride):
    captum = pytest.importorskip("captum.attr")
    net = build()
    model = cw.Model(net, input_size=(size, size))
    image = cw.sample_image("cat")
    kw = dict(window=window, stride=stride, baseline="zeros", batch_size=16)
    ours = occlusion(model, image, True, **kw).raw
    plain = occlusion(model, image, False, **kw).raw
    x, _ = model.prepare(image)
    theirs = captum.Occlusion(net).attribute(
        x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
        baselines=0.0, target=3, perturbations_per_eval=16)[0].detach().numpy()
    scale = np.abs(plain).max()
    assert scale > 0
    assert np.abs(ours - plain).max() <= 1e-4 * scale
    assert np.abs(ours - theirs).max() <= 1e-4 * scale


def test_resnet_runs_incrementally_up_to_the_global_pooling():
    net = resnet18()
    x = torch.randn(1, 3, 64, 64)
    memo = {}
    model = cw.Model(net, input_size=(64, 64), labels=[str(i) for i in range(10)])
    with trick(True), restored(net, frozen=True):
        fast.occluded_scores(model, targets.resolve(model, 3), x, [(0, 0), (48, 16)], (16, 16), torch.zeros_like(x),
                             memo=memo)
    run = memo[("incremental", True)]
    assert run.whole == []
    assert run.sizes["avgpool"] is None and run.sizes["layer1_0_relu_1"] is not None


def test_approximate_mode():
    net = make("residual", torch.float32)
    labels = [str(i) for i in range(5)]
    model = cw.Model(net, input_size=(24, 24), labels=labels, mean=(0, 0, 0), std=(1, 1, 1))
    image = cw.sample_image("cat")
    kw = dict(window=6, stride=3, baseline="zeros", batch_size=7)
    exact = cw.attribute(model, image, "occlusion", target=2, progress=False, **kw)
    # no cut and every window drilled into: the exact map
    same = cw.attribute(model, image, "occlusion", target=2, progress=False, exact=False,
                        threshold=1.0, drill_down=1.0, **kw)
    np.testing.assert_allclose(same.raw, exact.raw, rtol=1e-5, atol=1e-6 * np.abs(exact.raw).max())
    # no drill-down: only every other window (starts 0, 6, 12, 18 of 0, 3, …, 18): 16 copies
    totals = []
    cw.attribute(model, image, "occlusion", target=2, exact=False, drill_down=0.0,
                 progress=lambda done, total: totals.append(total), **kw)
    assert set(totals) == {16}
    # a quarter of the other 33 windows: 8 more
    totals.clear()
    cw.attribute(model, image, "occlusion", target=2, exact=False, drill_down=0.25,
                 progress=lambda done, total: totals.append(total), **kw)
    assert set(totals) == {16, 8}


def test_fill_in_interpolates_the_windows_not_run():
    from cnnwidgets.engine.attribution.perturbation import fill_in

    nan = float("nan")
    drops = torch.tensor([[1.0, nan, 3.0], [nan, nan, nan], [5.0, nan, 7.0]])
    # beside two known windows: their mean; among four diagonal ones: theirs
    assert fill_in(drops).tolist() == [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [5.0, 6.0, 7.0]]


# --------------------------------------------------------------------------- the bound
def test_multiply_adds_per_output_pixel():
    from cnnwidgets.engine.incremental.cost import macs_per_pixel

    assert macs_per_pixel(nn.Conv2d(2, 4, 3)) == 4 * 2 * 9
    assert macs_per_pixel(nn.Conv2d(2, 4, 3, groups=2)) == 4 * 1 * 9  # each output reads 1 map
    assert macs_per_pixel(nn.Conv2d(6, 6, (1, 5), groups=6)) == 6 * 1 * 5
    assert macs_per_pixel(nn.Linear(4, 5)) == 20
    assert macs_per_pixel(nn.ReLU()) == 0 and macs_per_pixel(nn.BatchNorm2d(3)) == 0


def _bound_net(batch_norm: bool):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 2, 3, padding=1)] + ([nn.BatchNorm2d(2)] if batch_norm else []) \
        + [nn.ReLU(), nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)] + head(4)
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_speedup_bound_from_the_boxes_by_hand(batch_norm):
    from cnnwidgets.engine.incremental import cost

    net = _bound_net(batch_norm)  # batch norm: folded, its node records the convolution's box
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    memo = {}
    scores(net, x, [(0, 0)], (2, 2), on=True, memo=memo)
    run = memo[("incremental", True)]
    # full network, per copy: conv 3→2, 3×3, 8×8 out: 64 · (2·3·9 = 54) = 3456; conv 2→4 in
    # 2 groups, 3×3/2, 4×4 out: 16 · (4·1·9 = 36) = 576; linear 4→5: 20 — in all 4052
    assert cost.network_macs(run) == 4052
    # window rows 0…1: conv 1 → rows 0…2 (ceil(−1) clipped at 0 … floor(2)): 3×3 · 54 = 486;
    # conv 2 → rows ceil((0+1−2)/2) = 0 … floor((2+1)/2) = 1: 2×2 · 36 = 144; linear (after
    # the global pooling: whole) 20
    first = dict(run.sizes)
    assert cost.pass_macs(run, first) == 486 + 144 + 20
    scores(net, x, [(3, 3)], (2, 2), on=True, memo=memo)
    # rows 3…4: conv 1 → rows 2…5 (4×4 · 54 = 864); conv 2 → ceil(0.5) = 1 … floor(3) = 3
    # (3×3 · 36 = 324); linear 20
    middle = dict(run.sizes)
    assert cost.pass_macs(run, middle) == 864 + 324 + 20
    # the two windows apart: 2 · 4052 / (650 + 1208); in one batch both get the larger boxes
    # (conv 1: 4 rows, 0…3 for the first copy; conv 2 on rows 0…3: 0 … floor(4/2) = 2, 3 rows)
    assert cost.speedup_bound(run, [(1, first), (1, middle)]) == pytest.approx(8104 / 1858)
    scores(net, x, [(0, 0), (3, 3)], (2, 2), on=True, memo=memo)
    assert cost.speedup_bound(run, [(2, dict(run.sizes))]) == pytest.approx(8104 / 2416)
    # a node missing from the sizes (its stored value served) costs nothing; run whole: all
    assert cost.pass_macs(run, {}) == 0
    assert cost.pass_macs(run, {k: None for k in first}) == 4052


# --------------------------------------------------------------------------- drill-down
def test_spread_of_the_known_neighbours():
    from cnnwidgets.engine.attribution.perturbation import spread

    nan = float("nan")
    drops = torch.tensor([[1.0, nan, 3.0], [nan, nan, nan], [5.0, nan, 7.0]])
    # (0, 1) sees 1 and 3; (1, 0) sees 1 and 5; (1, 1) all four; a corner sees no known one
    assert spread(drops).tolist() == [[0.0, 2.0, 0.0], [4.0, 6.0, 4.0], [0.0, 2.0, 0.0]]
    assert spread(torch.tensor([[nan, 2.0, nan]])).tolist() == [[0.0, 0.0, 0.0]]  # one: 0


@pytest.mark.parametrize("order,chosen", [("magnitude", (2, 1)), ("spread", (1, 1)),
                                          ("magnitude×spread", (1, 1))])
def test_drill_down_runs_the_coarse_windows_then_the_first_ranked(order, chosen):
    from cnnwidgets.engine.attribution.perturbation import drill

    exact = torch.tensor([[1.0, 0.0, 3.0], [0.0, 9.0, 0.0], [5.0, 0.0, 7.0]])
    runs = []

    def occlude(cells):
        runs.append(list(cells))
        for c in cells:
            grid[c] = exact[c]

    grid = torch.full((3, 3), float("nan"))
    got = drill(grid, occlude, 0.2, order)  # one of the five other windows
    assert runs[0] == [(0, 0), (0, 2), (2, 0), (2, 2)]
    # the guesses (bilinear): (0, 1) 2, (1, 0) 3, (1, 1) 4, (1, 2) 5, (2, 1) 6; the spreads
    # 2, 4, 6, 4, 2; magnitude × spread 4, 12, 24, 20, 12
    assert runs[1] == [chosen]
    assert float(got[chosen]) == float(exact[chosen])
    if chosen == (1, 1):  # the centre known (9): (0, 1) from 1, 3 beside it and 9 below
        assert float(got[0, 1]) == pytest.approx((1 + 3 + 9) / 3)
    else:  # (2, 1) known (0): the centre from the four corners (weight ½) and (2, 1) (1)
        assert float(got[1, 1]) == pytest.approx((0.5 * (1 + 3 + 5 + 7) + 0.0) / 3)


def test_a_node_run_whole_costs_its_whole_map():
    from cnnwidgets.engine.incremental import cost

    net = make("fallback")  # conv 3→4, 3×3 / 1 / 1; roll (no rule); conv 4→4, 3×3 / 2 / 1; head
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    memo = {}
    scores(net, x, [(0, 0)], (2, 2), on=True, memo=memo)
    run = memo[("incremental", True)]
    # full: 64 · (4·3·9 = 108) = 6912, 16 · (4·4·9 = 144) = 2304, linear 4·5 = 20
    assert cost.network_macs(run) == 6912 + 2304 + 20
    # the first convolution inside its box (rows 0…2: 9 · 108 = 972); from the roll on, whole
    assert cost.pass_macs(run, run.sizes) == 972 + 2304 + 20
