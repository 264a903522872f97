"""The engine core: activations by hand, hooks, model state, the offline model, layer names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine.cache import TensorCache
from cnnwidgets.engine.featuremaps import feature_maps
from cnnwidgets.engine.hooks import capture, hook_count, restored

from conftest import TinyNet, assert_same_state, one_pixel_image, snapshot, tiny_model


# ----------------------------------------------------------------------------- by hand
def test_prepare_passes_small_image_unchanged(tiny):
    x, display = tiny.prepare(one_pixel_image())
    assert x.shape == (1, 3, 8, 8) and display.shape == (8, 8, 3)
    expected = np.zeros((8, 8), np.float32)
    expected[2, 3] = 1.0
    for c in range(3):  # grey → RGB copies the channel; mean 0 / std 1 keeps values
        np.testing.assert_array_equal(x[0, c].numpy(), expected)
    np.testing.assert_array_equal(display[..., 0], expected)


def test_conv_activations_by_hand(tiny):
    # One white pixel at (2, 3) of an 8×8 image, 2×2 kernel, no padding → 7×7 output.
    # ch0 sums the 2×2×3 window: 3 wherever the window holds the pixel, i.e. rows 1–2, cols 2–3.
    # ch1 = input channel 0's top-left tap − 0.5: 0.5 at (2, 3), −0.5 elsewhere.
    act = tiny.activations(one_pixel_image(), "conv")
    expected0 = np.zeros((7, 7), np.float32)
    expected0[1:3, 2:4] = 3.0
    expected1 = np.full((7, 7), -0.5, np.float32)
    expected1[2, 3] = 0.5
    assert act.shape == (2, 7, 7)
    np.testing.assert_allclose(act[0].numpy(), expected0)
    np.testing.assert_allclose(act[1].numpy(), expected1)
    # after the ReLU, ch1 keeps only its 0.5
    relu = tiny.activations(one_pixel_image(), "relu")
    expected1_relu = np.zeros((7, 7), np.float32)
    expected1_relu[2, 3] = 0.5
    np.testing.assert_allclose(relu[1].numpy(), expected1_relu)


def test_predict_by_hand(tiny):
    # pooled: ch0 = 4·3/49 = 12/49, ch1 = 0.5/49 → logits (12/49, 0.5/49, 11.5/49)
    logits = torch.tensor([12 / 49, 0.5 / 49, 11.5 / 49])
    probs = logits.softmax(0)
    top = tiny.predict(one_pixel_image(), k=3)
    assert [t[0] for t in top] == [0, 2, 1]
    assert [t[1] for t in top] == ["a", "c", "b"]
    np.testing.assert_allclose([t[2] for t in top], probs[[0, 2, 1]].numpy(), rtol=1e-5)


def test_feature_maps_statistics(tiny):
    fm = feature_maps(tiny, one_pixel_image(), "conv")
    np.testing.assert_allclose(fm.mean, [12 / 49, (0.5 - 48 * 0.5) / 49], rtol=1e-5)
    np.testing.assert_allclose(fm.max, [3.0, 0.5])
    assert list(fm.order("mean")) == [0, 1]
    assert list(fm.order("index")) == [0, 1]
    assert fm.peak(1) == (2, 3)
    channels, values = fm.top_channels(2, 3, k=2)
    assert list(channels) == [0, 1] and list(values) == [3.0, 0.5]
    with pytest.raises(ValueError, match="outside"):
        fm.top_channels(7, 0)


def test_target_index(tiny):
    img = one_pixel_image()
    assert tiny.target_index(None, img) == 0
    assert tiny.target_index(2) == 2
    assert tiny.target_index("C") == 2
    with pytest.raises(ValueError, match="out of range"):
        tiny.target_index(3)
    with pytest.raises(ValueError, match="no class label"):
        tiny.target_index("zebra")


# ----------------------------------------------------------------------------- hooks and state
class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_capture_removes_hooks_after_success_and_exception():
    net = TinyNet()
    net.boom = Boom()
    net.forward = lambda x: net.fc(net.flat(net.pool(net.boom(net.relu(net.conv(x))))))
    before = hook_count(net)
    x = torch.rand(1, 3, 8, 8)
    with capture(net, ["conv", "relu"], inputs=True, grads=True, keep_graph=True) as rec:
        assert hook_count(net) == before + 2
        net(x).sum().backward()
    assert hook_count(net) == before
    assert set(rec.outputs) == {"conv", "relu"} and set(rec.grads) == {"conv", "relu"}
    # the gradient w.r.t. the ReLU output of sum(fc(avgpool(.))) is (fc column sum)/49
    col = net.fc.weight.sum(0) / 49
    np.testing.assert_allclose(rec.grads["relu"][0, :, 0, 0].numpy(), col.detach().numpy(), rtol=1e-6)
    net.boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        with capture(net, ["conv", "relu"], grads=True):
            net(x)
    assert hook_count(net) == before
    with pytest.raises(ValueError, match="no layer"):
        with capture(net, ["conv", "nope"]):
            pass
    assert hook_count(net) == before


def test_model_state_restored_after_success_and_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), Boom(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net.train()
    net[0].weight.requires_grad_(False)
    model = cw.Model(net, input_size=(16, 16))
    before = snapshot(net)
    img = np.random.default_rng(0).random((20, 20, 3))
    model.predict(img)
    model.activations(img, "1")
    model.layers()
    assert_same_state(net, before)  # BN running stats untouched: it ran in eval mode
    assert hook_count(net) == 0
    net[3].armed = True
    model.cache.clear()
    with pytest.raises(RuntimeError, match="boom"):
        model.activations(img, "1")
    assert_same_state(net, before)
    assert hook_count(net) == 0


def test_restored_puts_flags_back():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout())
    net.train()
    with pytest.raises(KeyError):
        with restored(net):
            assert not net.training
            net[0].weight.requires_grad_(False)
            raise KeyError
    assert net.training and net[1].training and net[0].weight.requires_grad


def test_activation_cache_is_bounded_and_hit(tiny):
    img = one_pixel_image()
    tiny.activations(img, "conv")
    misses = tiny.cache.misses
    tiny.activations(img, "conv")
    assert tiny.cache.misses == misses and tiny.cache.hits >= 1
    cache = TensorCache(max_bytes=1000)
    for i in range(10):
        cache.put(i, torch.zeros(100))  # 400 bytes each: at most two fit
    assert len(cache) == 2 and cache.bytes <= 1000 and 9 in cache and 0 not in cache
    cache.put("huge", torch.zeros(1000))
    assert "huge" not in cache


def test_activations_for_several_layers_in_one_pass(tiny):
    out = tiny.activations(one_pixel_image(1, 1), ["conv", "relu"])
    assert set(out) == {"conv", "relu"}
    assert torch.equal(out["relu"], out["conv"].clamp(min=0))


# ----------------------------------------------------------------------------- bad input
def test_unknown_layer_suggests_close_names(tiny, lite0, cat):
    with pytest.raises(ValueError, match="did you mean 'conv'"):
        tiny.activations(one_pixel_image(), "cnv")
    with pytest.raises(cw.LayerNotFoundError, match="_blocks.3"):
        lite0.activations(cat, "_blocks.3.conv")
    with pytest.raises(ValueError, match="runs 2 times"):
        lite0.activations(cat, "_swish")


def test_model_returning_tuple_or_dict():
    class TupleNet(TinyNet):
        def forward(self, x):
            return super().forward(x), x

    class DictNet(TinyNet):
        def forward(self, x):
            return {"logits": super().forward(x)}

    img = one_pixel_image()
    for net, pick in ((TupleNet(), lambda o: o[0]), (DictNet(), lambda o: o["logits"])):
        model = tiny_model().__class__(net, mean=(0,) * 3, std=(1,) * 3, crop=1.0, input_size=8)
        with pytest.raises(ValueError, match="output="):
            model.predict(img)
        assert hook_count(net) == 0
        fixed = cw.Model(net, mean=(0,) * 3, std=(1,) * 3, crop=1.0, input_size=8, output=pick)
        assert fixed.predict(img, k=1)[0][0] == 0


def test_model_without_convolution():
    with pytest.raises(ValueError, match="no convolution"):
        cw.Model(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        cw.Model("resnet18")


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match="resnet18"):
        cw.load_model("resnet-18x")


def test_every_entry_point_takes_a_module_and_says_what_to_do_with_a_name(cat):
    """A plain nn.Module works wherever a cw.Model does (widgets included); a model *name*
    where a model is expected, or a module given to load_model, is a short TypeError that
    names the call to use (it used to be an AttributeError deep inside a widget, and
    load_model(module) printed the module's whole repr as an 'unknown model')."""
    from torchvision.models import resnet18

    net = resnet18()
    w = cw.AttributionExplorer(net, cat, method="saliency", background=False)
    assert isinstance(w.model, cw.Model) and w.model.module is net
    assert cw.FeatureVisualizer(net).model.module is net
    assert cw.InversionExplorer(net, cat).model.module is net
    assert cw.deconv(net, cat, "layer2").shape[-1] == 3
    for call in (lambda: cw.attribute("resnet18", cat, "saliency"),
                 lambda: cw.AttributionExplorer("resnet18", cat),
                 lambda: cw.FixationExplorer("resnet18", cat),
                 lambda: cw.FeatureVisualizer("resnet18"),
                 lambda: cw.metrics.deletion("resnet18", cat, "saliency"),
                 lambda: cw.visualize("resnet18", "layer2:0", steps=1),
                 lambda: cw.invert("resnet18", cat, "layer2", steps=1),
                 lambda: cw.deconv("resnet18", cat, "layer2"),
                 lambda: cw.dissect("resnet18", cw.datasets.SyntheticConcepts(4, 32), ["layer4"])):
        with pytest.raises(TypeError, match=r"cw.load_model\('resnet18'\)"):
            call()
    with pytest.raises(TypeError, match=r"cw.Model\(module\)") as err:
        cw.load_model(net)
    assert len(str(err.value)) < 200


# ----------------------------------------------------------------------------- the offline model
def test_lite0_classifies_sample_photos(lite0, cat):
    # what the photos show, not the label one run printed: the cat photo's top class is one
    # of ImageNet's domestic cats (281–285: tabby, tiger, Persian, Siamese, Egyptian cat),
    # the coffee photo's a cup of coffee
    assert lite0.predict(cat, k=1)[0][0] in range(281, 286)
    assert lite0.predict(cw.sample_image("coffee"), k=1)[0][1] in {"espresso", "cup", "coffee mug"}
    assert len(lite0.labels) == 1000


def test_lite0_layers(lite0):
    maps = lite0.layers()
    assert maps[0] == "_conv_stem" and "_blocks.0" in maps and "_conv_head" in maps
    assert "_swish" not in maps and not any(n.endswith("static_padding") for n in maps)
    for name in maps:
        shape = lite0.layer_info(name).shape
        assert len(shape) == 3 and shape[1] * shape[2] > 1, name
    assert set(lite0.layers("conv")) <= set(lite0.layers("all"))
    assert lite0.last_map_layer() == "_bn1"  # a batch norm: the last map, not a convolution
    assert lite0.layer_info("_conv_head").shape == (1280, 7, 7)


def test_torchvision_random_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = cw.load_model("resnet18", pretrained=False, device="cpu")
    assert model.input_size == (224, 224) and len(model.labels) == 1000
    assert "layer4.1.conv2" in model.layers()
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_prefetch_fills_the_cache_in_one_pass_within_budget(tiny):
    img = one_pixel_image(4, 4)
    calls = []
    handle = tiny.module.conv.register_forward_hook(lambda *a: calls.append(1))
    try:
        # conv and relu each take 2×7×7×4 = 392 bytes: a 400-byte budget holds only one
        assert tiny.layer_bytes("conv") == 392
        assert tiny.prefetch(img, ["relu", "conv"], max_bytes=400) == ["relu"]
        tiny.cache.clear()
        calls.clear()
        assert tiny.prefetch(img, ["conv", "relu"]) == ["conv", "relu"]
        assert len(calls) == 1
        tiny.activations(img, "conv")
        tiny.activations(img, "relu")
        assert len(calls) == 1  # both were cache hits
    finally:
        handle.remove()


def test_restored_is_safe_across_threads_and_nesting():
    import threading

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout())
    net.train()
    inside, release = threading.Event(), threading.Event()

    def background():
        with restored(net):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=background)
    thread.start()
    inside.wait(10)
    # the notebook uses the model while the background block is still inside
    with restored(net):
        assert not net.training
    assert not net.training  # the background block still needs eval mode
    release.set()
    thread.join(10)
    assert net.training and net[1].training  # the last block out restored the train flags
    with restored(net):
        with restored(net):
            net[0].weight.requires_grad_(False)
        assert not net.training
    assert net.training and net[0].weight.requires_grad


@pytest.mark.parametrize("traced", ["the same network", "another network"])
def test_fx_tracing_waits_for_forward_passes_in_other_threads(traced):
    """fx patches nn.Module.__call__ of every module for every thread while tracing: a forward
    pass running meanwhile in another thread, of any network, would get Proxies. The guard
    keeps them apart."""
    import threading
    import time

    from cnnwidgets.engine.guard import guard

    net = TinyNet()
    other = net if traced == "the same network" else TinyNet()
    events = []
    inside = threading.Event()

    def forward_in_background():
        with restored(net):
            inside.set()
            time.sleep(0.3)
            events.append("forward done")

    t = threading.Thread(target=forward_in_background)
    t.start()
    inside.wait(5)
    with guard(other).tracing():
        events.append("tracing")
        with restored(net):  # the tracing thread may run a model itself
            net(torch.zeros(1, 3, 8, 8))
    t.join(5)
    assert events == ["forward done", "tracing"]


def test_fx_tracing_is_not_starved_by_passes_one_after_another():
    """Two threads run forward passes back to back, always overlapping: a trace waiting for
    the gate must still get it (new passes wait behind it), and the passes go on after."""
    import threading
    import time

    from cnnwidgets.engine.guard import guard

    net = TinyNet()
    stop = threading.Event()
    passes = []

    def busy(offset):
        time.sleep(offset)
        while not stop.is_set():
            with restored(net):
                with restored(net):  # a pass already inside may nest another
                    time.sleep(0.02)
                passes.append(time.monotonic())

    threads = [threading.Thread(target=busy, args=(d,)) for d in (0.0, 0.01)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.1)
        start = time.monotonic()
        with guard(net).tracing(timeout=5):
            waited = time.monotonic() - start
            during = len(passes)
            time.sleep(0.05)
            assert len(passes) == during  # no pass ran while the trace held the gate
        time.sleep(0.1)
        assert len(passes) > during  # and they went on afterwards
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert waited < 1.0


def test_cached_activations_follow_weight_updates():
    model = tiny_model()
    image = one_pixel_image()
    before = model.activations(image, "conv").clone()
    assert model.activations(image, "conv") is model.activations(image, "conv")  # a cache hit
    with torch.no_grad():
        model.module.conv.weight.mul_(2)  # in place, as an optimiser step would
    after = model.activations(image, "conv")
    # channel 0 sums its window with weight 1 (now 2) and no bias: it doubles
    assert torch.allclose(after[0], 2 * before[0]) and after[0].abs().sum() > 0
    model.module.load_state_dict(TinyNet().state_dict())  # back to the hand-set weights
    assert torch.allclose(model.activations(image, "conv"), before)


def test_hooks_ignore_forward_passes_of_other_threads():
    """Module hooks are process-wide; widgets compute on one model in several threads at once
    (Voila runs every cell before the page shows). A tap held by one thread must not catch
    another thread's (no-grad) activation, and its replacement must not change the other
    thread's forward pass. (Found in Voila: Grad-CAM failed with "One of the differentiated
    Tensors does not require grad" while a second explorer drew its deletion curve.)"""
    import threading

    from cnnwidgets.engine.attribution.core import tap

    net = TinyNet()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)

    def other_thread():
        out = {}

        def run():
            with torch.no_grad():
                out["y"] = net(torch.rand(1, 3, 8, 8) + 5.0)

        t = threading.Thread(target=run)
        t.start()
        t.join(10)
        return out["y"]

    xg = x.clone().requires_grad_(True)
    with tap(net, "conv") as box:
        net(xg)
        mine = box["value"]
        other_thread()
        assert box["value"] is mine and box["value"].requires_grad
    (g,) = torch.autograd.grad(net(xg).sum(), xg)  # and the graph is still usable
    assert g.shape == xg.shape

    with tap(net, "relu", replace=lambda t: torch.zeros_like(t)) as box:
        with torch.no_grad():
            zeroed = net(x)
        y_other = other_thread()
    assert torch.count_nonzero(zeroed) == 0
    with torch.no_grad():  # the other thread's input ran through the unchanged network
        assert torch.count_nonzero(y_other) > 0

    with capture(net, ["conv"], replace=lambda n, t: torch.zeros_like(t)) as rec:
        with torch.no_grad():
            net(x)
        other_thread()
    assert torch.count_nonzero(rec.outputs["conv"]) == 0
    with torch.no_grad():
        assert torch.equal(net(x), plain)
    assert hook_count(net) == 0


def test_one_guard_per_network_that_does_not_keep_it_alive():
    import gc
    import weakref

    from cnnwidgets.engine.guard import guard

    net = TinyNet()
    assert guard(net) is guard(net) and guard(net) is not guard(TinyNet())
    with restored(net):
        pass
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_weights_state_changes_with_in_place_updates_and_replacements():
    from cnnwidgets.engine.cache import weights_state

    conv = nn.Conv2d(1, 1, 1)
    before = weights_state(conv)
    assert weights_state(conv) == before  # nothing changed
    with torch.no_grad():
        conv.weight.mul_(2)  # in place, as an optimiser step
    after = weights_state(conv)
    assert after != before
    conv.bias = nn.Parameter(torch.zeros(1))  # replaced
    assert weights_state(conv) != after
    assert weights_state(nn.Sequential(conv)) == ()  # a module's own tensors only


def test_last_map_layer_is_the_deepest_feature_map(tiny):
    # conv and relu output 2×7×7; the pool's 2×1×1 and the flattened vector are not maps
    assert tiny.layers() == ["conv", "relu"] and tiny.layers("conv") == ["conv"]
    assert tiny.last_map_layer() == "relu"  # an activation: the name says map, not conv
