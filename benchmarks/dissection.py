"""Network dissection throughput and memory: cw.dissect vs the forward passes alone.

    python benchmarks/dissection.py            # 1,000 and 4,000 synthetic images at 112 px
    python benchmarks/dissection.py --quick    # 200 and 800 images

EfficientNet-Lite0 on ``cw.datasets.SyntheticConcepts`` at 112 px, two layers
(``_blocks.2._bn0``: 144 units at 28×28, ``_blocks.4._bn0``: 240 units at 14×14), the default
quantile 0.005. Every measurement runs in a fresh subprocess so that peak memory (ru_maxrss) is
its own. "forward" is the floor: the same DataLoader (image generation included) and the
model's forward pass, nothing else. The aims: dissection ≤ 2× the forward floor, and a peak
memory that does not grow with the number of images.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LAYERS = ["_blocks.2._bn0", "_blocks.4._bn0"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, n: int, size: int, threads: int, batch: int) -> dict:
    import torch

    import cnnwidgets as cw
    from cnnwidgets.engine.datasets import SyntheticConcepts

    torch.set_num_threads(threads)
    model = cw.load_model("efficientnet_lite0", device="cpu")
    dataset = SyntheticConcepts(n, size)
    model.layers()  # the dry run, outside the timing
    start_rss = rss_mb()
    t0 = time.perf_counter()
    if mode == "forward":
        loader = torch.utils.data.DataLoader(
            range(n), batch_size=batch,
            collate_fn=lambda idx: torch.stack([torch.from_numpy(dataset[i]["image"]) for i in idx]))
        with torch.no_grad():
            for images in loader:
                x = model.normalize(images.permute(0, 3, 1, 2).float() / 255.0)
                model.module(x)
        extra = {}
    else:
        result = cw.dissect(model, dataset, LAYERS, batch_size=batch, progress=False,
                            features=mode.split(":")[1] if ":" in mode else "disk")
        extra = {"detectors": {l: len(result.detectors(l)) for l in LAYERS}}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": n, "seconds": seconds, "images_per_s": n / seconds,
            "start_rss_mb": start_rss, "peak_rss_mb": peak, **extra}


def run(mode, n, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--size", str(args.size),
           "--threads", str(args.threads), "--batch", str(args.batch)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 and 800 images")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of images")
    p.add_argument("--size", type=int, default=112, help="image size in pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--recompute", action="store_true",
                   help="also time features='recompute' (two forward passes, no scratch file)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.size, args.threads, args.batch)))
        return
    sizes = args.sizes or ([200, 800] if args.quick else [1000, 4000])
    modes = ["forward", "dissect"] + (["dissect:recompute"] if args.recompute else [])
    print(f"EfficientNet-Lite0, SyntheticConcepts at {args.size} px, layers {LAYERS}, "
          f"{args.threads} threads, batch {args.batch}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'images':>7} {'mode':>18} {'seconds':>8} {'images/s':>9} {'× forward':>10} "
          f"{'peak RSS MB':>12} {'Δ RSS MB':>9}")
    for n in sizes:
        rows = [run(mode, n, args) for mode in modes]
        floor = rows[0]["seconds"]
        for r in rows:
            print(f"{n:7d} {r['mode']:>18} {r['seconds']:8.1f} {r['images_per_s']:9.1f} "
                  f"{r['seconds'] / floor:10.2f} {r['peak_rss_mb']:12.0f} "
                  f"{r['peak_rss_mb'] - r['start_rss_mb']:9.0f}"
                  + (f"  detectors {r['detectors']}" if "detectors" in r else ""), flush=True)
    print("The machine is shared: timings under contention vary; compare rows of one run.")


if __name__ == "__main__":
    main()
