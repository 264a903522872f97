"""The cost of watching and comparing: the training monitor's overhead per step, and
``cw.compare`` against the forward passes it needs.

    python benchmarks/design.py [--quick] [--out FILE]

1. **Monitor overhead.** ``cw.train`` on ``SyntheticShapes`` (32 px) with the four-layer
   ``small_cnn`` (width 16, batch 32), with and without a ``cw.Monitor`` at the default
   ``every`` (10): seconds per training step, median of alternating runs (a run with, a run
   without, and so on, so that a load change hits both alike). The aim is ≤ 10 %.
2. **compare vs forward passes.** ``cw.compare`` of EfficientNet-Lite0 against a random
   ResNet-18 on the sample photos (default layers: four convolutions each), against the
   forward passes of both networks on the same images that it cannot avoid. The aim is
   ≤ 1.5×. Reported with and without unit matching (CKA alone).

``--quick`` runs small sizes (a smoke test of the script, not a measurement). Measure on a
quiet machine: ratios taken while other processes compete for the cores mean little.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone
import cnnwidgets as cw  # noqa: E402
from cnnwidgets.engine.training import small_cnn  # noqa: E402

from _output import tee  # noqa: E402


def train_seconds_per_step(data, steps: int, monitor: bool, every: int) -> float:
    torch.manual_seed(0)
    net = small_cnn(classes=4, width=16)
    mon = cw.Monitor(net, data, every=every) if monitor else None
    epochs = steps * 32 / len(data)
    t = time.perf_counter()
    result = cw.train(net, data, epochs=epochs, lr=0.003, optimizer="adam", monitor=mon,
                      progress=False)
    elapsed = time.perf_counter() - t
    if mon is not None:
        mon.close()
    return elapsed / result.steps


def monitor_overhead(quick: bool, every: int) -> None:
    data = cw.datasets.SyntheticShapes(n_images=320 if quick else 3200, size=32, seed=0)
    steps = 10 if quick else 100
    pairs = 1 if quick else 5
    train_seconds_per_step(data, 3, False, every)  # warm-up
    plain, watched = [], []
    for _ in range(pairs):
        plain.append(train_seconds_per_step(data, steps, False, every))
        watched.append(train_seconds_per_step(data, steps, True, every))
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"monitor overhead (every={every}, {steps} steps, {pairs} alternating pairs): "
          f"{1000 * p:.1f} ms/step plain, {1000 * w:.1f} ms/step monitored, "
          f"overhead {100 * (w / p - 1):+.1f} %")


def compare_cost(quick: bool) -> None:
    a = cw.load_model("efficientnet_lite0", device="cpu")
    b = cw.load_model("resnet18", pretrained=False)
    names = cw.sample_images()
    photos = [cw.sample_image(n) for n in (names[:2] if quick else names)]
    repeats = 1 if quick else 5

    def forwards():
        with torch.no_grad():
            for model in (a, b):
                x = torch.cat([model.prepare(p)[0] for p in photos])
                model.module.eval()
                model.module(x)

    forwards()
    fwd, full, cka_only = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        forwards()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        cw.compare(a, b, photos)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        cw.compare(a, b, photos, match=False)
        cka_only.append(time.perf_counter() - t)
    f, c, k = (statistics.median(v) for v in (fwd, full, cka_only))
    print(f"cw.compare, Lite0 vs random ResNet-18, {len(photos)} photos, {repeats} repeats: "
          f"forward passes {1000 * f:.0f} ms, compare {1000 * c:.0f} ms ({c / f:.2f}×), "
          f"CKA only {1000 * k:.0f} ms ({k / f:.2f}×)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the output to this file")
    args = parser.parse_args()
    with tee(args.out):
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        monitor_overhead(args.quick, args.every)
        compare_cost(args.quick)


if __name__ == "__main__":
    main()
