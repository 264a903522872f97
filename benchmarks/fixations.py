"""Time of ``cw.fixations`` as a ratio to one forward pass (and to a forward + backward pass,
the cost of the cheapest gradient method), on the CPU at 224 px.

    python benchmarks/fixations.py [--repeats 5] [--threads 1]

Models: VGG-16 and ResNet-50 with random weights (nothing is downloaded) and the offline
EfficientNet-Lite0. All timings of one model are interleaved in one run and the median of
``--repeats`` runs is reported. The first ``cw.fixations`` call of a model also traces it with
torch.fx (cached afterwards); that one-off cost is reported separately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone
import cnnwidgets as cw  # noqa: E402


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

    first = _time(fixations)[0]  # includes torch.fx tracing (cached afterwards)
    forward()  # warm-up
    times = {"forward": [], "fixations": [], "forward+backward": []}
    for _ in range(repeats):
        for key, fn in (("forward", forward), ("fixations", fixations),
                        ("forward+backward", forward_backward)):
            times[key].append(_time(fn))
    out = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    out.update({k + " cpu": statistics.median(c for _, c in v) for k, v in times.items()})
    out["first call"] = first
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, CPU time per "
                             "process is then a fair measure of work; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = cw.sample_image("cat")
    torch.manual_seed(0)
    models = {
        "vgg16": cw.Model(torchvision.models.vgg16(weights=None), name="vgg16"),
        "resnet50": cw.Model(torchvision.models.resnet50(weights=None), name="resnet50"),
        "efficientnet_lite0": cw.load_model("efficientnet_lite0", device="cpu"),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 224 px, "
          f"median of {args.repeats}")
    header = (f"{'model':20s} {'forward s':>10s} {'fixations s':>12s} {'fwd+bwd s':>10s} "
              f"{'fix/fwd':>8s} {'fix/(fwd+bwd)':>14s} {'CPU fix/fwd':>12s} "
              f"{'CPU fix/(fwd+bwd)':>18s} {'1st call s':>11s}")
    print(header)
    print("-" * len(header))
    for name, model in models.items():
        r = bench(name, model, image, args.repeats)
        print(f"{name:20s} {r['forward']:10.3f} {r['fixations']:12.3f} "
              f"{r['forward+backward']:10.3f} {r['fixations'] / r['forward']:8.2f} "
              f"{r['fixations'] / r['forward+backward']:14.2f} "
              f"{r['fixations cpu'] / r['forward cpu']:12.2f} "
              f"{r['fixations cpu'] / r['forward+backward cpu']:18.2f} {r['first call']:11.3f}",
              flush=True)
    print("times: wall-clock medians; CPU: medians of this process's CPU time. fixations = "
          "cw.fixations(model, image) end to end (preprocessing, forward, backtrack, outlier "
          "removal); 1st call adds the one-off torch.fx trace.")


if __name__ == "__main__":
    main()
