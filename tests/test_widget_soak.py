"""Bursts of clicks and long runs: explorers keep their work bounded (issue 15).

An explorer runs at most one computation at a time, plus at most the newest one waiting; a
superseded computation is cancelled at its next check and its result dropped. These tests
drive real explorers on one ResNet-18 (random weights, small input) the way an impatient user
does — many changes without waiting for any result — and watch the widgets' worker threads and
the process's resident memory from a sampling thread while they run.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count

MB = 2**20


def rss() -> int | None:
    """The process's resident memory in bytes (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def workers() -> int:
    """The widgets' background threads alive now (named ``cnnwidgets-<widget class>``)."""
    return sum(t.name.startswith("cnnwidgets-") for t in threading.enumerate())


class Watch:
    """Samples, from its own thread, the widgets' worker threads and the resident memory while
    the ``with`` block runs: ``max_workers``, ``peak_rss`` (bytes)."""

    def __init__(self, every: float = 0.002):
        self.every = every
        self.max_workers = 0
        self.peak_rss = rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="soak-watch", daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.max_workers = max(self.max_workers, workers())
            self.peak_rss = max(self.peak_rss, rss() or 0)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max_workers = max(self.max_workers, workers())
        self.peak_rss = max(self.peak_rss, rss() or 0)


@pytest.fixture(scope="module")
def model():
    import torchvision

    torch.manual_seed(0)
    return cw.Model(torchvision.models.resnet18(weights=None).eval(), input_size=(96, 96))


@pytest.fixture(scope="module")
def image():
    return cw.sample_image("cat")


def test_a_hundred_rapid_target_changes_run_at_most_two_computations(model, image):
    """Sixty quick target changes used to start sixty threads that all ran to the end at once
    (~580 MB): now the running one is cancelled, only the newest waits, the rest never run."""
    w = cw.AttributionExplorer(model, image)
    w.wait()  # warm-up: the first view, allocator pools filled
    assert w.result is not None
    start_threads = threading.active_count()
    before = rss()
    first = w.target
    targets = [t for t in range(200) if t != first][:100]
    with Watch() as watch:
        for t in targets:
            w.target = t  # no waiting between changes
        w.wait()
    shown = w.result[0]
    print(f"\nrapid changes: at most {watch.max_workers} worker threads, RSS growth "
          f"{(watch.peak_rss - (before or 0)) / MB:.0f} MB")
    assert watch.max_workers <= 2
    if before is not None:
        assert watch.peak_rss - before < 100 * MB
    assert shown.target == targets[-1] and w.target == targets[-1]  # the last selection
    assert f"class {targets[-1]}" in w.status.value and w.errors.last_error is None
    assert threading.active_count() == start_threads
    assert hook_count(model.module) == 0


@pytest.mark.slow
def test_soak_three_explorers_on_one_model(model, image):
    """300 mixed interactions across three explorers sharing one model, mostly without waiting:
    memory stays flat after warm-up (its peak while they run, against the resident memory
    after warm-up), every worker thread ends, no hook is left."""
    rng = random.Random(15)
    start_threads = threading.active_count()
    attribution = cw.AttributionExplorer(model, image)
    maps = cw.FeatureMapExplorer(model, image)
    fix = cw.FixationExplorer(model, image)
    explorers = (attribution, maps, fix)
    layers = model.layers()
    targets = [value for _, value in fix.target_select.options]
    methods = ["grad_cam", "saliency", "gradient_x_input", "smoothgrad", "layer_cam"]

    def channels(layer):
        return int(model.layer_info(layer).shape[0])

    def interact():
        who = rng.randrange(3)
        if who == 0:
            what = rng.random()
            if what < 0.5:
                attribution.target = rng.randrange(1000)
            elif what < 0.8:
                attribution.method = rng.choice(methods)
            else:
                attribution.layer = rng.choice(["", "layer3", "layer4.0.conv2", "layer4"])
        elif who == 1:
            if rng.random() < 0.6:
                maps.layer = rng.choice(layers)
            maps.channel = rng.randrange(channels(maps.layer))
        else:
            if rng.random() < 0.7 or fix.result is None:
                fix.target = rng.choice(targets)
            else:
                fix.sigma = rng.uniform(0.0, 20.0)

    def settle():
        for w in explorers:
            w.wait()

    def session(n):  # n interactions, stopping to look at the results every 50
        for i in range(n):
            interact()
            if i % 50 == 49:
                settle()
        settle()

    # warm-up: every kind of work, caches filled, and the allocator's per-thread pools (glibc
    # gives new threads their own arenas) at their working size — they grow over the first few
    # hundred interactions, then stay
    session(300)
    before = rss()
    with Watch() as watch:
        session(300)
    grew = watch.peak_rss - (before or 0)
    print(f"\nsoak: at most {watch.max_workers} worker threads, RSS growth {grew / MB:.0f} MB "
          f"(peak {(watch.peak_rss or 0) / MB:.0f} MB), threads {start_threads} → "
          f"{threading.active_count()}")
    for w in explorers:
        assert w.errors.last_error is None, w.errors.last_error
    assert watch.max_workers <= 2  # one per explorer that computes in the background
    if before is not None:
        assert grew < 150 * MB
    assert threading.active_count() == start_threads
    assert hook_count(model.module) == 0
    # each explorer shows its last selection
    assert attribution.result[0].target == attribution.target
    assert attribution.result[0].method == attribution.method
    assert fix.result.target == fix.target
