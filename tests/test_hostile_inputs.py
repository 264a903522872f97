"""Hostile inputs (issue 15): nothing silent, every refusal says what to do.

Each case asserts the error's type and that its message names the parameter and its valid
range (or the fix), and that the model is left as it was: no hook, flags and parameters
bit-identical (:func:`conftest.snapshot`). Float images follow one rule: [0, 1], a small
overshoot clipped, anything further out refused with how to scale it.
"""
from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnwidgets as cw
from cnnwidgets.engine import images
from cnnwidgets.engine.hooks import hook_count

from conftest import TinyNet, assert_same_state, snapshot, tiny_model

NAN, INF = float("nan"), float("inf")

#: an 8×8 RGB image in [0, 1]: values in eighths, exact in float16 and bfloat16 too
EIGHTHS = (np.arange(8 * 8 * 3).reshape(8, 8, 3) % 9 / 8.0).astype(np.float32)


@contextlib.contextmanager
def untouched(model):
    """The model after the block is as before it: no hook, same flags and parameters."""
    module = model.module if isinstance(model, cw.Model) else model
    before = snapshot(module)
    yield
    assert hook_count(module) == 0
    assert_same_state(module, before)


def refused(model, error, pattern, call):
    """``call()`` raises ``error`` whose message matches ``pattern``; the model is untouched."""
    with untouched(model), pytest.raises(error, match=pattern):
        call()


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- float images
def test_a_small_float_overshoot_is_clipped_not_read_as_0_to_255(tiny):
    # 0.5 · 1.02 = 0.51 → round(0.51 · 255) = round(130.05) = 130; 1.02 → clipped → 255;
    # −0.05 (a resize undershoot) → 0. Before: the whole image was divided by 255 (≈ black).
    base = np.full((8, 8, 3), 0.5)
    base[0, 0] = 1.0
    jittered = base * 1.02
    jittered[1, 1] = -0.05
    rgb = np.asarray(cw.load_image(jittered))
    assert rgb[2, 2].tolist() == [130] * 3
    assert rgb[0, 0].tolist() == [255] * 3
    assert rgb[1, 1].tolist() == [0] * 3
    # what the network sees is the clipped image
    x, _ = tiny.prepare(jittered)
    assert float(x[0, 0, 2, 2]) == pytest.approx(130 / 255)
    assert float(x[0, 0, 0, 0]) == 1.0


def test_a_float_pil_image_follows_the_same_rule():
    a = np.full((8, 8), 0.51, np.float32)
    a[0, 0] = 1.02
    rgb = np.asarray(cw.load_image(Image.fromarray(a, mode="F")))
    assert rgb[2, 2].tolist() == [130] * 3 and rgb[0, 0].tolist() == [255] * 3


@pytest.mark.parametrize("scale, fix", [
    (255.0, r"divide by 255 \(image / 255\)"),  # floats in 0–255 are never guessed
    (1.5, r"np\.clip\(image, 0, 1\)"),          # a large overshoot is not clipped silently
])
def test_floats_far_outside_0_1_are_refused_with_how_to_scale(tiny, scale, fix):
    bright = EIGHTHS * scale
    pattern = rf"float pixel values must be in \[0, 1\].*{fix}"
    with pytest.raises(ValueError, match=pattern):
        cw.load_image(bright)
    refused(tiny, ValueError, pattern, lambda: cw.attribute(tiny, bright, "saliency"))


def test_a_normalised_network_input_is_refused_with_denormalize(tiny):
    imagenet = cw.Model(TinyNet(), input_size=(8, 8))  # ImageNet mean and std
    x, _ = imagenet.prepare(EIGHTHS)
    assert float(x.min()) < -0.5  # a normalised input: far below 0
    refused(imagenet, ValueError, r"model\.denormalize\(x\)", lambda: cw.load_image(x))
    refused(imagenet, ValueError, r"model\.denormalize\(x\)",
            lambda: cw.attribute(imagenet, x, "saliency"))


# --------------------------------------------------------------------------- method parameters
@pytest.mark.parametrize("method, params, error, pattern", [
    ("smoothgrad", {"noise": NAN}, ValueError,
     r"smoothgrad: noise=nan .*noise must be a number from 0\.0 to 1\.0"),
    ("smoothgrad", {"noise": -INF}, ValueError, r"noise must be a number from 0\.0 to 1\.0"),
    ("rise", {"p": NAN}, ValueError, r"rise: p=nan .*p must be a number from 0\.05 to 0\.95"),
    ("integrated_gradients", {"steps": NAN}, ValueError,
     r"steps must be an integer from 2 to 1000"),
    ("integrated_gradients", {"steps": INF}, ValueError,
     r"steps must be an integer from 2 to 1000"),
    ("integrated_gradients", {"steps": 4.5}, ValueError, r"steps=4\.5 is not a whole number"),
    ("integrated_gradients", {"steps": "5"}, TypeError,
     r"steps must be an integer from 2 to 1000, not str '5'"),
    ("occlusion", {"window": 0}, ValueError,
     r"window=0 is out of range; window must be an integer from 1 to 1024"),
    ("occlusion", {"baseline": 0}, TypeError, r"baseline must be one of 'zeros', 'black'"),
    ("fixations", {"outlier_removal": "yes"}, TypeError,
     r"outlier_removal must be True or False, not str 'yes'"),
])
def test_method_parameters_refuse_nan_inf_range_and_type(tiny, image, method, params, error,
                                                         pattern):
    refused(tiny, error, pattern, lambda: cw.attribute(tiny, image, method, target=0, **params))


def test_numpy_numbers_are_accepted_where_python_ones_are(tiny, image):
    a = cw.attribute(tiny, image, "integrated_gradients", target=0, steps=np.int64(4),
                     batch_size=np.int32(2))
    b = cw.attribute(tiny, image, "integrated_gradients", target=0, steps=4, batch_size=2)
    assert type(a.params["steps"]) is int and a.params["steps"] == 4
    np.testing.assert_array_equal(a.map, b.map)
    c = cw.attribute(tiny, image, "smoothgrad", target=0, noise=np.float32(0.25), n_samples=2)
    assert type(c.params["noise"]) is float and c.params["noise"] == 0.25
    d = cw.attribute(tiny, image, "fixations", target=0, outlier_removal=np.False_)
    assert d.params["outlier_removal"] is False
    heat = np.arange(64, dtype=np.float32).reshape(8, 8)
    e = cw.metrics.deletion(tiny, image, heat, target=0, steps=np.int64(4),
                            batch_size=np.int64(2))
    f = cw.metrics.deletion(tiny, image, heat, target=0, steps=4, batch_size=2)
    assert len(e.fractions) == 5
    np.testing.assert_array_equal(e.scores, f.scores)


def test_attribute_refuses_a_progress_that_is_not_none_bool_or_callable(tiny, image):
    refused(tiny, TypeError, r"progress must be None .*True, False or a callable",
            lambda: cw.attribute(tiny, image, "saliency", progress="yes"))


@pytest.mark.parametrize("cancel", [True, 1, "stop"])
def test_attribute_refuses_a_cancel_that_is_not_an_event_or_callable(tiny, image, cancel):
    refused(tiny, TypeError, r"cancel must be a threading.Event or a callable",
            lambda: cw.attribute(tiny, image, "saliency", cancel=cancel))


@pytest.mark.parametrize("method, params", [("saliency", {}),
                                            ("smoothgrad", {"n_samples": 4, "batch_size": 4}),
                                            ("integrated_gradients", {"steps": 4,
                                                                      "batch_size": 4})])
def test_a_stop_asked_during_the_forward_pass_skips_the_backward_pass(tiny, image, method,
                                                                      params):
    """Cancellation is checked between a batch's forward and its backward pass: a stop asked
    while the forward pass runs never reaches the backward pass."""
    import threading

    stop = threading.Event()
    backward = []

    def on_forward(module, args, output):  # the user's hook: the network itself runs
        if output.requires_grad:  # the method's own pass (not a no-grad one)
            stop.set()
            output.register_hook(lambda g: backward.append(1))

    handle = tiny.module.conv.register_forward_hook(on_forward)
    try:
        with pytest.raises(cw.Cancelled):
            cw.attribute(tiny, image, method, target=0, cancel=stop, **params)
    finally:
        handle.remove()
    assert backward == []


@pytest.mark.parametrize("method, params", [
    ("saliency", {}), ("grad_cam", {}), ("smoothgrad", {"n_samples": 8, "batch_size": 8}),
    ("occlusion", {"window": 4, "stride": 4}), ("score_cam", {}),
])
def test_a_stop_answers_inside_a_pass_not_after_it(tiny, image, method, params):
    """However large a batch, a stop is obeyed within one module's work: a stop asked while
    the ReLU runs stops the pass before the pooling runs."""
    import threading

    stop = threading.Event()
    ran = []
    with untouched(tiny):
        hooks = [tiny.module.relu.register_forward_hook(lambda *a: stop.set()),
                 tiny.module.pool.register_forward_hook(lambda *a: ran.append("pool"))]
        try:
            with pytest.raises(cw.Cancelled, match=f"{method} was cancelled"):
                cw.attribute(tiny, image, method, target=0, cancel=stop, **params)
        finally:
            for h in hooks:
                h.remove()
    assert ran == []


@pytest.mark.parametrize("method, params", [
    ("saliency", {}), ("smoothgrad", {"n_samples": 8, "batch_size": 8}), ("grad_cam", {}),
])
def test_a_stop_answers_inside_the_backward_pass(tiny, image, method, params):
    """A stop asked when the backward pass leaves the last layer ends it before it reaches
    the first: the gradient of the convolution's output is never computed."""
    import threading

    stop = threading.Event()
    reached = []

    def on_fc(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda g: stop.set())

    def on_conv(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda g: reached.append("conv"))

    with untouched(tiny):
        hooks = [tiny.module.fc.register_forward_hook(on_fc),
                 tiny.module.conv.register_forward_hook(on_conv)]
        try:
            with pytest.raises(cw.Cancelled, match=f"{method} was cancelled"):
                cw.attribute(tiny, image, method, target=0, cancel=stop, **params)
        finally:
            for h in hooks:
                h.remove()
    assert reached == []


def test_without_a_stop_asked_a_cancellable_run_gives_the_same_numbers(tiny, image):
    """The cancel points change no value, and a run without ``cancel`` registers nothing."""
    import threading

    plain = cw.attribute(tiny, image, "smoothgrad", target=0, n_samples=8, seed=3)
    stoppable = cw.attribute(tiny, image, "smoothgrad", target=0, n_samples=8, seed=3,
                             cancel=threading.Event())
    np.testing.assert_array_equal(plain.raw, stoppable.raw)


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"steps": NAN}, ValueError, r"deletion: steps=nan .*steps must be an integer from 1 to 100000"),
    ({"steps": "8"}, TypeError, r"steps must be an integer from 1 to 100000, not str"),
    ({"batch_size": 0}, ValueError, r"batch_size=0 is out of range; batch_size must be an "
                                    r"integer at least 1"),
    ({"progress": "yes"}, TypeError, r"progress must be None .*or a callable f\(done, total\)"),
    ({"baseline": NAN}, ValueError, r"baseline=nan is not allowed; baseline must be a finite"),
])
def test_deletion_refuses_bad_settings(tiny, image, kwargs, error, pattern):
    heat = np.arange(64, dtype=np.float32).reshape(8, 8)
    refused(tiny, error, pattern,
            lambda: cw.metrics.deletion(tiny, image, heat, target=0, **kwargs))


def test_pointing_game_and_sanity_check_refuse_bad_numbers(tiny, image):
    with pytest.raises(ValueError, match=r"tolerance=nan .*tolerance must be a number at least 0"):
        cw.metrics.pointing_game(np.zeros((8, 8)), (0, 0, 4, 4), tolerance=NAN)
    refused(tiny, ValueError, r"stages=0 is out of range; stages must be an integer at least 1",
            lambda: cw.metrics.sanity_check(tiny, image, "saliency", stages=0))
    refused(tiny, TypeError, r"progress must be None",
            lambda: cw.metrics.sanity_check(tiny, image, "saliency", progress="yes"))


# --------------------------------------------------------------------------- dissection
def _conv_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    return cw.Model(net, input_size=(16, 16))


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"iou_threshold": -1}, ValueError,
     r"iou_threshold=-1 is out of range; iou_threshold must be a number from 0 to 1"),
    ({"quantile": NAN}, ValueError,
     r"quantile=nan .*quantile must be a number greater than 0 and less than 1"),
    ({"batch_size": 0}, ValueError, r"batch_size must be an integer at least 1"),
    ({"progress": "yes"}, TypeError, r"progress must be None"),
])
def test_dissect_refuses_bad_settings(tmp_path, kwargs, error, pattern):
    model = _conv_model()
    data = cw.datasets.SyntheticConcepts(n_images=2, size=16)
    refused(model, error, pattern,
            lambda: cw.dissect(model, data, ["0"], cache_dir=tmp_path, **kwargs))


def test_explorer_refuses_a_dissection_that_is_not_one(tiny, image):
    pytest.importorskip("ipywidgets")
    refused(tiny, TypeError, r"dissection must be a cw\.DissectionResult .*not int 42",
            lambda: cw.Explorer(tiny, image, dissection=42))
    refused(tiny, ValueError, r"dissection='no/such/file\.npz' is not a file",
            lambda: cw.Explorer(tiny, image, dissection="no/such/file.npz"))


# --------------------------------------------------------------------------- optvis, fixations
@pytest.mark.parametrize("call, error, pattern", [
    (lambda m, im: cw.visualize(m, "conv:0", steps=NAN, progress=False), ValueError,
     r"cw\.visualize: steps=nan .*steps must be an integer at least 1"),
    (lambda m, im: cw.visualize(m, "conv:0", steps=2, lr=0, progress=False), ValueError,
     r"lr=0 is out of range; lr must be a number greater than 0"),
    (lambda m, im: cw.visualize(m, "conv:0", steps=2, size=4, progress=False), ValueError,
     r"size=4 is out of range; size must be an integer from 8 to 4096"),
    (lambda m, im: cw.visualize(m, "conv:0", steps=2, progress="yes"), TypeError,
     r"progress must be None"),
    (lambda m, im: cw.invert(m, im, "conv", steps=INF, progress=False), ValueError,
     r"cw\.invert: steps=inf .*steps must be an integer at least 1"),
    (lambda m, im: cw.invert(m, im, "conv", steps=2, decay=NAN, progress=False), ValueError,
     r"decay=nan .*decay must be a number greater than 0"),
    (lambda m, im: cw.deconv(m, im, "conv", 0, rank=-1), ValueError,
     r"rank=-1 is out of range; rank must be an integer at least 0"),
    (lambda m, im: cw.deconv(m, im, "conv", 0, top_k=0), ValueError,
     r"top_k=0 is out of range; top_k must be an integer at least 1"),
    (lambda m, im: cw.fixations(m, im, progress="yes"), TypeError, r"progress must be None"),
])
def test_optvis_and_fixations_refuse_bad_numbers(tiny, image, call, error, pattern):
    refused(tiny, error, pattern, lambda: call(tiny, image))


def test_fixation_heatmap_refuses_an_infinite_sigma(tiny, image):
    f = cw.fixations(tiny, image, target=0)
    with pytest.raises(ValueError, match=r"sigma=inf .*sigma must be a number at least 0"):
        f.heatmap(sigma=INF)


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kwargs, pattern", [
    ({"crop": NAN}, r"cw\.Model: crop=nan .*crop must be a number greater than 0 and at most 1"),
    ({"input_size": (0, 8)}, r"input_size=0 is out of range; input_size must be an integer at least 1"),
    ({"std": (1.0, 0.0, 1.0)}, r"std=0\.0 is out of range; std must be a number greater than 0"),
    ({"mean": (0.5, NAN, 0.5)}, r"mean=nan .*mean must be a finite number"),
])
def test_model_settings_are_checked(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cw.Model(TinyNet(), **kwargs)


def test_predict_refuses_k_below_one(tiny, image):
    refused(tiny, ValueError, r"model\.predict: k=0 is out of range; k must be an integer at "
                              r"least 1", lambda: tiny.predict(image, k=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_says_how_to_convert(image, dtype):
    model = tiny_model()
    model.module.to(dtype)
    pattern = rf"parameters are {str(dtype)[6:]}; cnnwidgets expects float32.*module\.float\(\)"
    refused(model, TypeError, pattern, lambda: cw.attribute(model, image, "saliency"))
    refused(model, TypeError, pattern, lambda: model.predict(image))
    refused(model, TypeError, pattern, lambda: cw.fixations(model.module, image))
    assert all(p.dtype == dtype for p in model.module.parameters())  # left as it was
    model.module.float()
    assert cw.attribute(model, image, "saliency", target=0).map.shape == (8, 8)


def test_a_float64_model_gets_float64_inputs_and_the_same_map(image):
    model32, model64 = tiny_model(), tiny_model()
    model64.module.double()
    x64, _ = model64.prepare(image)
    assert x64.dtype == torch.float64  # float32 → float64 is exact
    torch.testing.assert_close(x64.float(), model32.prepare(image)[0], rtol=0, atol=0)
    a32 = cw.attribute(model32, image, "saliency", target=0)
    a64 = cw.attribute(model64, image, "saliency", target=0)
    np.testing.assert_allclose(a64.map, a32.map, atol=1e-6)


# --------------------------------------------------------------------------- image sources
def test_half_bfloat16_and_float64_image_tensors_load_like_float32():
    reference = np.asarray(cw.load_image(torch.from_numpy(EIGHTHS).permute(2, 0, 1)))
    assert reference[0, 0].tolist() == [0, 32, 64]  # 0, 1/8, 2/8 → round(k · 255 / 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        t = torch.from_numpy(EIGHTHS).permute(2, 0, 1).to(dtype)
        np.testing.assert_array_equal(np.asarray(cw.load_image(t)), reference)


@pytest.mark.parametrize("source, pattern", [
    (np.zeros((0, 0, 3), np.float32), r"the array is empty \(shape \(0, 0, 3\)\)"),
    (np.zeros((0, 8, 3), np.uint8), r"the array is empty"),
    (torch.zeros(3, 0, 8), r"the array is empty"),
    ("https://example.com/cat.jpg", r"is a URL; URLs are not fetched\. Download the file first"),
    ("", r"an empty string is not an image path"),
    ("   ", r"an empty string is not an image path"),
    (b"", r"is empty; it holds no image"),
])
def test_empty_and_url_sources_say_what_to_pass(tiny, source, pattern):
    refused(tiny, ValueError, pattern, lambda: cw.attribute(tiny, source, "saliency"))


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="Linux /proc only")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused_before_reading():
    # before: read_bytes() read /dev/zero until the process was killed for memory
    with pytest.raises(ValueError, match=r"'/dev/zero' is not a regular file"):
        cw.load_image("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_is_refused_before_opening(tmp_path):
    # before: opening the pipe blocked forever, waiting for a writer
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(ValueError, match=r"is not a regular file \(a device, pipe or socket\)"):
        cw.load_image(fifo)


def test_empty_and_oversized_files_are_refused_by_their_size(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        cw.load_image(empty)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: takes no disk space
        f.truncate(images.MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=r"over the 1 GiB limit for an image file"):
        cw.load_image(huge)


@needs_proc
def test_a_large_file_that_is_no_image_is_refused_after_its_header(tmp_path):
    # text over the sniffing limit: PIL's lenient IMT reader used to read all of it
    big = tmp_path / "notes.png"
    big.write_bytes(b"hello world\n" * (images.SNIFF_BYTES // 12 + 1000))
    before = _bytes_read()
    with pytest.raises(ValueError, match=r"is not an image file PIL can read"):
        cw.load_image(big)
    assert _bytes_read() - before < 2**20


def test_a_large_image_file_still_loads(tmp_path, monkeypatch):
    # an uncompressed BMP over the sniffing limit: its header names the format
    h, w = 2000, 2000
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 0] = 200
    a[h // 2:, :, 2] = 100
    path = tmp_path / "big.bmp"
    Image.fromarray(a).save(path)
    monkeypatch.setattr(images, "SNIFF_BYTES", 2**20)  # 12 MB is then over the limit
    assert path.stat().st_size > images.SNIFF_BYTES
    rgb = np.asarray(cw.load_image(path))
    assert rgb.shape == (h, w, 3)
    assert rgb[0, 0].tolist() == [200, 0, 0] and rgb[-1, -1].tolist() == [200, 0, 100]


def test_grad_cam_on_a_layer_that_is_not_a_feature_map_names_it_and_suitable_layers(image):
    model = tiny_model()  # TinyNet: conv → relu → pool → flat → fc; fc outputs 3 numbers
    refused(model, ValueError, r"layer 'fc' \(Linear\) outputs a vector of shape \(3,\), not a "
                               r"C×h×w feature map; pick a feature-map layer, e\.g\. .*conv",
            lambda: cw.attribute(model, image, "grad_cam", layer="fc"))
