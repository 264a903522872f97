"""The application labs' cost against the network passes they need, on the CPU at 224 px.

    python benchmarks/applications.py [--repeats 5] [--images 32] [--threads 1] [--out FILE]
    python benchmarks/applications.py --quick      # smoke run: 1 repeat, 4 images

Two ratios (aims of issue #17 in brackets):

* one PGD step (``cw.attack(..., "pgd", steps=S)`` divided by S, S = 10) against one plain
  forward + backward pass of the network to its input (≤ 1.2×);
* ``cw.prune_curve`` over N images and F fractions against the (F + 1) · N image forward passes
  it needs, run as plain batched forward passes of the same batch size (≤ 1.3×).

Model: EfficientNet-Lite0 with its shipped weights (offline). Timings of one table are
interleaved and the median of ``--repeats`` runs is reported, after a warm-up of each. Do not
quote ratios measured on a loaded machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a clone
import cnnwidgets as cw  # noqa: E402
from _output import tee  # noqa: E402  (benchmarks/, the script's own folder)

STEPS = 10
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(repeats: int, n_images: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    model = cw.load_model("efficientnet_lite0", device="cpu")
    module = model.module.eval()
    image = cw.sample_image("cat")
    x, _ = model.prepare(image)

    def forward_backward():
        xg = x.clone().requires_grad_(True)
        with cw.engine.restored(module, frozen=True):
            loss = torch.nn.functional.cross_entropy(module(xg), torch.tensor([0]))
            torch.autograd.grad(loss, xg)

    def pgd():
        cw.attack(model, image, "pgd", epsilon=4 / 255, steps=STEPS, progress=False)

    fb = _median_time(forward_backward, repeats)
    step = _median_time(pgd, repeats) / STEPS
    print(f"## PGD step vs forward + backward ({torch.get_num_threads()} thread(s))\n")
    print("| forward + backward (s) | one PGD step (s) | ratio (aim ≤ 1.2) |")
    print("| --- | --- | --- |")
    print(f"| {fb:.4f} | {step:.4f} | {step / fb:.2f} |\n")

    images = cw.datasets.sample_variants(n_images, seed=0)
    batch = torch.cat([model.prepare(im)[0] for im in images])
    layer = model.layers("conv")[len(model.layers("conv")) // 2]
    batch_size = 32

    def passes():
        with torch.no_grad(), cw.engine.restored(module):
            for _ in range(len(FRACTIONS) + 1):
                for lo in range(0, len(batch), batch_size):
                    module(batch[lo:lo + batch_size])

    def curve():
        cw.prune_curve(model, images, layer, "weight_l1", FRACTIONS, batch_size=batch_size,
                       progress=False)

    base = _median_time(passes, repeats)
    full = _median_time(curve, repeats)
    print(f"## prune curve vs its forward passes ({n_images} images, {len(FRACTIONS)} "
          f"fractions, layer {layer})\n")
    print("| (F + 1) · N forward passes (s) | cw.prune_curve (s) | ratio (aim ≤ 1.3) |")
    print("| --- | --- | --- |")
    print(f"| {base:.3f} | {full:.3f} | {full / base:.2f} |\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 4 images")
    parser.add_argument("--out", default=None, help="also write the output to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.images = 1, 4
    with tee(args.out):
        print(f"# benchmarks/applications.py, {datetime.date.today()}, torch {torch.__version__}"
              f", repeats {args.repeats}\n")
        run(args.repeats, args.images, args.threads)


if __name__ == "__main__":
    main()
