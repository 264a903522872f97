"""How fast FeatureMapExplorer responds, on the Python side, to the end of the redraw.

    python benchmarks/feature_maps.py [--repeats 15]

Times, for efficientnet_lite0 at 224 px on the CPU: a layer switch on first visit (activations
computed), a cached layer switch, and a channel click; each from setting the traitlet to the end
of the Agg redraw plus the PNG frame ipympl sends to the browser. A front end is simulated as
connected, so the extra PNG that ipympl makes only when no browser is attached is not counted.
One forward pass is timed in the same run for scale. The widget prefetches every layer that fits
half the activation cache in its first forward pass, so in normal use every switch is a cached
one; "first visit" is the cost of a layer that was not prefetched.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone
import cnnwidgets as cw  # noqa: E402


def median_ms(samples):
    return 1000 * statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--image", default="cat")
    args = parser.parse_args()

    model = cw.load_model("efficientnet_lite0", device="cpu")
    image = cw.sample_image(args.image)
    with torch.no_grad():
        model.module(model.prepare(image)[0])  # warm-up: first-call allocations are not ours
    created = []
    for _ in range(3):
        model.cache.clear()
        t = time.perf_counter()
        w = cw.FeatureMapExplorer(model, image)  # one forward pass prefetches every layer
        w.canvas.draw()
        created.append(time.perf_counter() - t)
    w.canvas.syncing_data_url = False  # as after the browser's "initialized" message
    w.canvas.draw()
    layers = ["_blocks.1", "_blocks.5", "_blocks.10", "_conv_head"]

    x, _ = model.prepare(image)
    with torch.no_grad():
        model.module(x)
        forward = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.module(x)
            forward.append(time.perf_counter() - t)

    first, cached, click = [], [], []
    for i in range(args.repeats):
        model.cache.clear()  # a layer that is not cached: one forward pass, then the redraw
        for layer in layers:
            t = time.perf_counter()
            w.layer = layer
            w.canvas.draw()
            first.append(time.perf_counter() - t)
        for layer in layers:
            t = time.perf_counter()
            w.layer = layer
            w.canvas.draw()
            cached.append(time.perf_counter() - t)
        for c in (1, 2, 3):
            t = time.perf_counter()
            w.channel = (w.channel + c) % w.maps.channels
            w.canvas.draw()
            click.append(time.perf_counter() - t)

    print(f"FeatureMapExplorer, efficientnet_lite0, 224 px, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds over layers {layers}")
    print(f"{'operation':<32}{'median ms':>12}{'× forward':>12}")
    fwd = median_ms(forward)
    for name, samples in (("one forward pass (reference)", forward),
                          ("widget created and drawn", created),
                          ("layer switch, first visit", first),
                          ("layer switch, cached", cached),
                          ("channel click", click)):
        ms = median_ms(samples)
        print(f"{name:<32}{ms:>12.1f}{ms / fwd:>12.2f}")
    print("aim: cached switch under 50 ms")


if __name__ == "__main__":
    main()
