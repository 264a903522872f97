"""cw.train and cw.Monitor: a real seeded run, snapshots bounded, hooks removed, state restored,
dead units and bad input on hand-set networks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count
from cnnwidgets.engine.training import small_cnn

from test_engine import Boom


def shapes(n=64, size=16, **kw):
    return cw.datasets.SyntheticShapes(n_images=n, size=size, seed=0, **kw)


# ------------------------------------------------------------------ the data set
def test_synthetic_shapes_items():
    data = shapes(8, 24)
    x, y = data[3]
    assert x.shape == (3, 24, 24) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y == data.label(3) and 0 <= y < len(data.classes) == 4
    np.testing.assert_array_equal(x, data[3][0])  # the same every time
    # exactly three colours (shape, background, its texture) or two, all from the palette
    colours = np.unique(x.reshape(3, -1).T, axis=0)
    assert 2 <= len(colours) <= 3
    assert {data[i][1] for i in range(len(data))} <= set(range(4))
    with pytest.raises(IndexError):
        data[8]


# ------------------------------------------------------------------ training
def test_seeded_training_on_a_tiny_set_makes_the_loss_fall():
    torch.manual_seed(0)
    net = small_cnn(classes=4, width=8)
    data = shapes(192, 16, textured=0.0)
    state = torch.get_rng_state()
    result = cw.train(net, data, epochs=4, lr=0.01, optimizer="adam", batch_size=32, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert result.stopped is None
    assert result.steps == 4 * 6 and result.epochs == pytest.approx(4.0)
    losses = result.losses
    assert np.isfinite(losses).all()
    first, last = losses[:6].mean(), losses[-6:].mean()
    assert first == pytest.approx(math.log(4), rel=0.2)  # chance for four classes at the start
    assert last < 0.8 * first, (first, last)
    assert net.training  # put back as it was (a new module trains by default)


def test_training_is_reproducible_with_a_seed():
    def run():
        torch.manual_seed(0)
        net = small_cnn(classes=4, width=4)
        return cw.train(net, shapes(64, 16), epochs=1, lr=0.05, seed=3).losses

    np.testing.assert_array_equal(run(), run())


def test_training_flags_are_put_back():
    net = small_cnn(classes=4, width=4).eval()
    cw.train(net, shapes(32, 16), epochs=1, lr=0.01)
    assert not any(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


class NanImages(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((3, 16, 16), float("nan")), 0


def test_nan_loss_stops_and_says_so():
    net = small_cnn(classes=4, width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="loss became nan at step 1"):
        result = cw.train(net, NanImages(), epochs=3, lr=0.1, batch_size=4)
    assert result.steps == 1 and "learning rate" in result.stopped
    for k, v in net.state_dict().items():  # the NaN step was not applied
        assert torch.equal(v, before[k])

    monitor = cw.Monitor(net, images=torch.rand(2, 3, 16, 16), initial=False)
    with pytest.raises(cw.NonFiniteLoss, match="inf at step 1"):
        monitor.step(float("inf"))
    assert "step 1" in monitor.stopped


class BadShapes(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(16, 16), 0  # no channel dimension


def test_wrong_shapes_are_refused_with_what_is_expected():
    net = small_cnn(classes=4, width=4)
    with pytest.raises((ValueError, RuntimeError), match="N×C×H×W|channels"):
        cw.train(net, BadShapes(), epochs=1)
    labels_out_of_range = [(torch.rand(2, 3, 16, 16), torch.tensor([0, 7]))]
    with pytest.raises(ValueError, match="labels run 0–7 but the network has 4 outputs"):
        cw.train(net, labels_out_of_range, epochs=1)
    with pytest.raises(ValueError, match="not \\(images, labels\\) pairs"):
        cw.train(net, [torch.rand(2, 3, 16, 16)], epochs=1)


# ------------------------------------------------------------------ the monitor
def test_monitor_takes_snapshots_every_n_steps():
    torch.manual_seed(0)
    net = small_cnn(classes=4, width=4)
    data = shapes(64, 16)
    monitor = cw.Monitor(net, data, every=3, n_images=4)
    assert monitor.snapshots.steps == [0]
    assert sorted(monitor.labels.tolist()) == [0, 1, 2, 3]  # one image of each class
    result = cw.train(net, data, epochs=1, lr=0.01, batch_size=8, monitor=monitor)
    assert result.steps == 8 and monitor.steps == 8
    assert monitor.snapshots.steps == [0, 3, 6, 8]  # and one where the run ended
    assert monitor.snapshots[-1].loss == result.history[-1][1]
    snap = monitor.snapshots[-2]
    assert snap.step == 6 and snap.loss == pytest.approx(result.history[5][1])
    assert snap.filters.shape == (4, 3, 3, 3)
    np.testing.assert_array_equal(monitor.snapshots[0].filters.shape, snap.filters.shape)
    assert snap.maps.shape == (4, 4, 16, 16)  # the first convolution's maps of the 4 images
    assert monitor.first_conv == "0" and monitor.cam_layer == "13"
    assert snap.cams.shape[0] == 4 and (snap.cams >= 0).all()
    assert snap.targets.tolist() == monitor.labels.tolist()
    assert list(snap.dead) == ["2", "5", "9", "13"]  # the ReLU modules
    assert all(0.0 <= v <= 1.0 for v in snap.dead.values())
    steps, losses, accs = monitor.curves()
    assert steps.tolist() == list(range(1, 9)) and np.allclose(losses, result.losses)
    assert not np.array_equal(monitor.snapshots[0].filters, snap.filters)  # it trained


def test_snapshot_filters_are_the_weights_of_their_step_even_from_disk(tmp_path):
    net = small_cnn(classes=4, width=4)
    w0 = net[0].weight.detach().clone()
    monitor = cw.Monitor(net, images=torch.rand(2, 3, 16, 16), every=1, spill_dir=tmp_path,
                         initial=True)
    one = monitor.snapshots[0].nbytes
    monitor.snapshots.memory_bytes = 2 * one  # room for two snapshots in memory
    for _ in range(6):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        monitor.step(1.0, 0.5)
    assert len(monitor.snapshots) == 7
    assert monitor.snapshots.in_memory_bytes <= 2 * one
    assert monitor.snapshots.spilled == 5
    assert len(list(tmp_path.glob("*.npz"))) == 5
    for k in range(7):  # snapshot k (the oldest ones read back from disk) holds w0 + k
        snap = monitor.snapshots[k]
        assert snap.step == k
        np.testing.assert_allclose(snap.filters, (w0 + k).numpy(), rtol=0, atol=1e-5)
    assert monitor.snapshots[3].accuracy == 0.5 and monitor.snapshots[3].loss == 1.0
    assert monitor.snapshots.at_step(4).step == 4


def test_snapshots_stay_bounded_over_a_long_run():
    net = small_cnn(classes=4, width=4)
    monitor = cw.Monitor(net, images=torch.rand(2, 3, 16, 16), every=1, memory_bytes=20_000)
    for _ in range(30):
        monitor.step(1.0)
        # the newest always stays in memory, the rest within the budget
        assert monitor.snapshots.in_memory_bytes <= 20_000 + monitor.snapshots[-1].nbytes
    assert monitor.snapshots.spilled >= 25
    folder = monitor.snapshots._folder
    assert folder.is_dir()
    monitor.close()
    assert not folder.exists()


def test_monitor_leaves_no_hook_and_restores_state_after_success_and_error():
    net = small_cnn(classes=4, width=4)
    net.insert(2, Boom())  # between the first batch norm and its ReLU
    net.train()
    frozen = net[4].weight  # the second convolution
    frozen.requires_grad_(False)
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    monitor = cw.Monitor(net, images=torch.rand(3, 3, 16, 16), every=1, keep_weights=True)
    monitor.step(1.0)

    def check():
        assert hook_count(net) == 0
        assert all(m.training for m in net.modules())
        assert frozen.requires_grad is False and net[0].weight.requires_grad
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters()
                   if p.requires_grad)

    check()
    net[2].armed = True
    with pytest.raises(RuntimeError, match="boom"):
        monitor.step(1.0)
    check()
    net[2].armed = False
    copy = monitor.model_at(1)
    for k, v in copy.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])


class TwoUnits(nn.Module):
    """conv(3→2, k1): unit 0 sums the channels (fires on any non-black pixel), unit 1 has
    weights 0 and bias −1 (never fires); then conv(2→2, k1) identity; GAP; linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 2, 1)
        self.c2 = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.c1.weight.zero_()
            self.c1.weight[0] = 1.0
            self.c1.bias.copy_(torch.tensor([0.0, -1.0]))
            self.c2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.c2.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_dead_units_by_hand():
    net = TwoUnits()
    images = torch.rand(2, 3, 8, 8) + 0.1
    monitor = cw.Monitor(net, images=images, labels=[0, 1], cam_layer="c2")
    snap = monitor.snapshots[0]
    # c1: unit 1 is −1 everywhere → 1 of 2 dead. c2 copies c1 after the ReLU: unit 1 is 0 → dead
    assert snap.dead == {"c1": 0.5, "c2": 0.5}
    assert snap.maps.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(snap.maps[:, 0], images.sum(1).numpy(), rtol=1e-6)
    assert (snap.maps[:, 1] == -1).all()
    # Grad-CAM at c2 for class t: relu(Σ_k mean(∂y_t/∂A_k) A_k); ∂y_t/∂A_k = w_tk / 64 at every
    # position, so the map is relu(w_t0 · A_0 / 64) (A_1 = 0)
    w = net.fc.weight.detach()
    a0 = images.sum(1)
    for i, t in enumerate([0, 1]):
        expected = torch.relu(w[t, 0] / 64 * a0[i]).numpy()
        np.testing.assert_allclose(snap.cams[i], expected, rtol=1e-5, atol=1e-7)


def test_snapshots_count_concept_detectors_as_cw_dissect_does():
    torch.manual_seed(0)
    net = small_cnn(classes=4, width=4)
    concepts = cw.datasets.SyntheticConcepts(n_images=12, size=32, seed=0)
    monitor = cw.Monitor(net, images=torch.rand(2, 3, 32, 32), concepts=concepts, quantile=0.05)
    snap = monitor.snapshots[0]
    assert monitor.concept_layer == "11"  # the last convolution
    result = cw.dissect(monitor.model, concepts, ["11"], quantile=0.05, progress=False)
    expected = {}
    for r in result.detectors("11"):
        expected[r.concept] = expected.get(r.concept, 0) + 1
    assert snap.detectors == expected
    assert sum(snap.detectors.values()) <= 8  # at most every unit of the layer
    assert hook_count(net) == 0
