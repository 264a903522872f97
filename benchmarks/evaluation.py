"""cw.evaluate throughput: images per second against forward passes alone, and the speed-up of
two processes (torchrun, gloo) over one on the same machine.

    python benchmarks/evaluation.py            # 64 images
    python benchmarks/evaluation.py --quick    # 8 images (a smoke run: no ratio to quote)

EfficientNet-Lite0 (trained weights, shipped with the package) on ``cw.datasets.SyntheticBoxes``
(320×256 photos with pasted objects). Rows:

* ``forward`` — the floor: the same images read and prepared, one forward pass each, in blocks;
* ``evaluate loc`` — ``cw.evaluate`` with Grad-CAM and CNN Fixations, localisation (CAM box,
  MaxBoxAcc over 100 thresholds) and the pointing game;
* ``evaluate all`` — the same plus deletion and insertion (20 steps: 42 more forward passes per
  image and method);
* ``1 process`` / ``2 processes`` — ``cnnwidgets evaluate`` (localisation + pointing) under
  ``torch.distributed.run`` with one and two processes of one thread each, timed by rank 0
  around ``cw.evaluate`` (gathering included, start-up not); the ratio is the speed-up (≤ 2
  on two free cores). The wall time with start-up is printed beside it.

Every measurement runs in a fresh subprocess; one thread per process unless ``--threads``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

METHODS = ["grad_cam", "fixations"]


def child(mode: str, n: int, threads: int, batch: int) -> dict:
    import torch

    import cnnwidgets as cw

    torch.set_num_threads(threads)
    model = cw.load_model("efficientnet_lite0")
    dataset = cw.datasets.SyntheticBoxes(n, seed=0)
    model.layers()  # the dry run, outside the timing
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            for start in range(0, n, batch):
                images = [dataset[i]["image"] for i in range(start, min(n, start + batch))]
                model.scores(torch.cat([model.prepare(im)[0] for im in images]))
    else:
        metrics = ["localization", "pointing"] + (["deletion", "insertion"]
                                                   if mode == "evaluate all" else [])
        cw.evaluate(model, dataset, METHODS, metrics, steps=20, batch_size=batch,
                    progress=False)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "n": n, "seconds": seconds, "images_per_s": n / seconds}


def processes(n: int, nproc: int, batch: int) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="cw-bench-"), "e.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "cnnwidgets.cli", "evaluate", "--synthetic",
           str(n), "--methods", *METHODS, "--metrics", "localization", "pointing",
           "--batch-size", str(batch), "--out", out, "--quiet"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0  # with start-up: torchrun, imports, the model
    # rank 0 prints "evaluated N images in X s": cw.evaluate alone, gathering included
    seconds = float(out.split("images in ", 1)[1].split(" s", 1)[0])
    return {"mode": f"{nproc} process{'es' if nproc > 1 else ''}", "n": n, "seconds": seconds,
            "images_per_s": n / seconds, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 images: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (8 if args.quick else 64)
    if args.child:
        print(json.dumps(child(args.child, n, args.threads, args.batch)))
        return
    rows = []
    for mode in ("forward", "evaluate loc", "evaluate all"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n),
                              "--threads", str(args.threads), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for nproc in (1, 2):
        rows.append(processes(n, nproc, args.batch))
    floor = rows[0]["seconds"]
    print(f"EfficientNet-Lite0, SyntheticBoxes, {n} images, methods {METHODS}, "
          f"{args.threads} thread(s) per process")
    print(f"{'run':<14}{'seconds':>10}{'images/s':>10}{'× forward':>11}")
    for r in rows:
        print(f"{r['mode']:<14}{r['seconds']:>10.2f}{r['images_per_s']:>10.2f}"
              f"{r['seconds'] / floor:>11.1f}")
    one, two = rows[-2]["seconds"], rows[-1]["seconds"]
    print(f"two processes vs one: speed-up {one / two:.2f}× (cw.evaluate alone; with start-up "
          f"{rows[-2]['wall']:.1f} s vs {rows[-1]['wall']:.1f} s)")


if __name__ == "__main__":
    main()
