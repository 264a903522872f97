"""Time of ``cw.fixations`` as a ratio to one forward pass (and to a forward + backward pass,
the cost of the cheapest gradient method), on the CPU at 224 px.

    python benchmarks/fixations.py [--repeats 5] [--threads 1 0] [--models vgg16 ...] [--out FILE]

Models: VGG-16 and ResNet-50 with RANDOM weights (nothing is downloaded) and EfficientNet-Lite0
with its trained weights (shipped, offline). All timings of one model are interleaved in one
run and the median of ``--repeats`` runs is reported, after one warm-up of each. The first
``cw.fixations`` call of a model also traces it with torch.fx (cached afterwards); that one-off
cost is reported separately. Every table is measured twice: with one torch thread (CPU time
per process is then a fair measure of work on a shared machine) and with torch's default
thread count (what a user gets); ``--threads`` chooses the counts (0: torch's default).
Smoke run: ``--repeats 1 --models efficientnet_lite0``.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torchvision

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone
import cnnwidgets as cw  # noqa: E402
from _output import tee  # noqa: E402  (benchmarks/, the script's own folder)


def _time(fn) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, model: cw.Model, image, repeats: int) -> dict:
    x, _ = model.prepare(image)
    module = model.module.eval()

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        torch.autograd.grad(out[0].max(), xg)

    def fixations():
        cw.fixations(model, image)

    first = _time(fixations)[0]  # includes torch.fx tracing (cached afterwards); warms it up
    forward()  # warm-up
    forward_backward()
    times = {"forward": [], "fixations": [], "forward+backward": []}
    for _ in range(repeats):
        for key, fn in (("forward", forward), ("fixations", fixations),
                        ("forward+backward", forward_backward)):
            times[key].append(_time(fn))
    out = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    out.update({k + " cpu": statistics.median(c for _, c in v) for k, v in times.items()})
    out["first call"] = first
    return out


DEFAULT_THREADS = torch.get_num_threads()  # before any set_num_threads
MODELS = {
    "vgg16": lambda: cw.Model(torchvision.models.vgg16(weights=None), name="vgg16"),
    "resnet50": lambda: cw.Model(torchvision.models.resnet50(weights=None), name="resnet50"),
    "efficientnet_lite0": lambda: cw.load_model("efficientnet_lite0", device="cpu"),
}


def table(models: list, image, repeats: int, threads: int) -> None:
    """One table at ``threads`` torch threads (0: torch's default). Each thread count gets fresh
    models, so the first-call column (the torch.fx trace) is measured again."""
    torch.set_num_threads(threads or DEFAULT_THREADS)
    what = "one thread" if threads == 1 else "torch's default" if threads == 0 else "--threads"
    print(f"\n## {torch.get_num_threads()} threads ({what}), CPU, 224 px, median of {repeats}")
    header = (f"{'model':20s} {'forward s':>10s} {'fixations s':>12s} {'fwd+bwd s':>10s} "
              f"{'fix/fwd':>8s} {'fix/(fwd+bwd)':>14s} {'CPU fix/fwd':>12s} "
              f"{'CPU fix/(fwd+bwd)':>18s} {'1st call s':>11s}")
    print(header)
    print("-" * len(header))
    for name in models:
        torch.manual_seed(0)
        r = bench(name, MODELS[name](), image, repeats)
        print(f"{name:20s} {r['forward']:10.3f} {r['fixations']:12.3f} "
              f"{r['forward+backward']:10.3f} {r['fixations'] / r['forward']:8.2f} "
              f"{r['fixations'] / r['forward+backward']:14.2f} "
              f"{r['fixations cpu'] / r['forward cpu']:12.2f} "
              f"{r['fixations cpu'] / r['forward+backward cpu']:18.2f} {r['first call']:11.3f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                        help="torch thread counts, one table each (default: 1 and 0, torch's "
                             f"default, here {DEFAULT_THREADS}). One thread: on a shared machine, "
                             "CPU time per process is then a fair measure of work")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=None, help="also write everything printed to this file")
    args = parser.parse_args()
    image = cw.sample_image("cat")
    with tee(args.out):
        print(f"# {' '.join(['python'] + sys.argv)}")
        print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
              f"torch {torch.__version__}, default {DEFAULT_THREADS} threads, "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; models: vgg16 and "
              "resnet50 RANDOM weights, efficientnet_lite0 trained")
        for threads in args.threads:
            table(args.models, image, args.repeats, threads)
        print("\ntimes: wall-clock medians; CPU: medians of this process's CPU time. fixations = "
              "cw.fixations(model, image) end to end (preprocessing, forward, backtrack, outlier "
              "removal); 1st call adds the one-off torch.fx trace.")


if __name__ == "__main__":
    main()
