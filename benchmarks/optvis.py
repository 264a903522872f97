"""Feature-visualisation speed at 128 px against the floor, measured in one run.

    python benchmarks/optvis.py [--steps 24] [--rounds 3] [--threads 1]

Rows (all efficientnet_lite0, batch 1, 128-px image → 140-px network input after the
robustness transforms):

* floor — one forward + one backward of the same 1×3×140×140 batch (parameters frozen, gradient
  to the input only), the forward cut at the objective's layer exactly as the optimiser cuts it;
* optimize — ``cw.engine.optvis.optimize`` steps: FFT parameterisation + decorrelated colour +
  sigmoid + transforms + forward/backward + Adam, entering/leaving ``restored``/``capture`` each step;
* param (+ transforms) + Adam alone — the same image pipeline with no network, forward and
  backward (the direct measure of their overhead; end-to-end differences drown in the noise);
* widget, preview every 4 — ``FeatureVisualizer.run(wait=True)``: image, loss curve and progress
  updated every 4 steps (ipympl ``draw_idle``: no frontend here, so the render the browser then
  asks the kernel for is not counted) and the same with a full Agg render of the figure in
  each preview (an upper bound). Previews are rate-limited by their measured cost (at most 8%
  of the run), so a slow render means fewer previews rather than a slower optimisation.

Rounds are interleaved and the median per row is reported, because the machine is shared: read
the ratios, not the absolute numbers.
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
from cnnwidgets.engine.optvis import optimize


def floor_time(model, layer, steps, size=140):
    module = model.module
    x = torch.rand(1, 3, size, size, requires_grad=True)
    flags = [p.requires_grad for p in module.parameters()]
    handle = None
    try:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        out = {}
        if layer is not None:
            class Stop(Exception):
                pass

            def hook(mod, args, output):
                out["a"] = output
                raise Stop

            handle = dict(module.named_modules())[layer].register_forward_hook(hook)
        t0 = time.perf_counter()
        for _ in range(steps):
            if layer is None:
                loss = -module(x)[0, 1]
            else:
                try:
                    module(x)
                except Exception:  # noqa: BLE001 - our Stop
                    pass
                loss = -out["a"][:, 0].mean()
            x.grad = None
            loss.backward()
        return (time.perf_counter() - t0) / steps
    finally:
        if handle is not None:
            handle.remove()
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def overhead_time(model, steps, transforms=True):
    """Parameterisation (+ transforms) forward + backward and the Adam update, no network."""
    from cnnwidgets.engine.optvis.param import make_param
    from cnnwidgets.engine.optvis.transforms import Robustness

    g = torch.Generator().manual_seed(0)
    param = make_param("fft", size=128, generator=g)
    chain = Robustness()
    opt = torch.optim.Adam(param.parameters(), lr=0.05)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = param()
        if transforms:
            x = chain(x, generator=g)
        loss = model.normalize(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def opt_time(model, objective, steps, transforms=True):
    gen = optimize(model, objective, steps=steps + 1, size=128, transforms=transforms)
    next(gen)  # first step includes set-up
    t0 = time.perf_counter()
    for _ in gen:
        pass
    return (time.perf_counter() - t0) / steps


def widget_time(model, layer, channel, mode, steps, every, agg=False):
    w = cw.FeatureVisualizer(model, layer=layer or "_blocks.2", channel=channel, steps=steps,
                             size=128, preview_every=every, mode=mode, target="goldfish")
    if agg:
        w.figure.canvas.draw()  # the first render (layout, fonts) is a one-off
        w._draw = lambda: w.figure.canvas.draw()
    spent = []
    on_step = w._on_step

    def timed(step):
        t = time.perf_counter()
        on_step(step)
        spent.append(time.perf_counter() - t)

    w._on_step = timed
    t0 = time.perf_counter()
    w.run(wait=True)
    total = time.perf_counter() - t0
    PREVIEWS[(mode, every, agg)] = (len(spent), sum(spent), total)
    return total / steps


PREVIEWS: dict = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preview-steps", type=int, default=128,
                    help="steps of the widget runs (previews are rate-limited, so short runs "
                         "over-weight the first and the final preview)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 is fastest on a busy 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = cw.load_model("efficientnet_lite0")
    cases = [("class 'goldfish' (whole network)", None, "class", cw.objectives.class_logit(1)),
             ("channel _blocks.2:0 (forward cut early)", "_blocks.2", "channel",
              cw.objectives.channel("_blocks.2", 0))]
    n = args.steps
    for title, layer, mode, objective in cases:
        rows = {k: [] for k in ("floor", "optimize", "param + Adam alone",
                                "param + transforms + Adam alone",
                                "widget, preview every 4", "widget, no preview",
                                "widget, preview every 4 + Agg render")}
        opt_time(model, objective, 2)  # warm-up
        for _ in range(args.rounds):
            rows["floor"].append(floor_time(model, layer, n))
            rows["optimize"].append(opt_time(model, objective, n))
            rows["param + Adam alone"].append(overhead_time(model, n, False))
            rows["param + transforms + Adam alone"].append(overhead_time(model, n, True))
            m = args.preview_steps
            rows["widget, no preview"].append(widget_time(model, layer, 0, mode, m, m))
            rows["widget, preview every 4"].append(widget_time(model, layer, 0, mode, m, 4))
            rows["widget, preview every 4 + Agg render"].append(
                widget_time(model, layer, 0, mode, m, 4, agg=True))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"\n{title}: 128 px, {n} steps ({args.preview_steps} for the widget rows) × "
              f"{args.rounds} rounds, {args.threads} thread(s)")
        print(f"{'':40s} {'ms/step':>9s} {'steps/s':>8s} {'vs floor':>9s}")
        for k, v in med.items():
            print(f"{k:40s} {1000 * v:9.1f} {1 / v:8.2f} {v / med['floor']:8.2f}×")
        over = 100 * (med["optimize"] / med["floor"] - 1)
        tr = 100 * med["param + transforms + Adam alone"] / med["floor"]
        tr_only = 100 * (med["param + transforms + Adam alone"] - med["param + Adam alone"]) / med["floor"]
        prev = 100 * (med["widget, preview every 4"] / med["widget, no preview"] - 1)
        agg = 100 * (med["widget, preview every 4 + Agg render"] / med["widget, no preview"] - 1)
        print(f"optimize step over the floor (end to end, noisy): {over:+.1f}%")
        print(f"parameterisation + transforms + Adam measured alone: {tr:.1f}% of the floor "
              f"(transforms {tr_only:.1f}%)  [aim < 20%]")
        print(f"live preview slow-down, end to end (noisy): {prev:+.1f}% (draw_idle), "
              f"{agg:+.1f}% with a full Agg render per preview")
        m = args.preview_steps
        for label, key in (("draw_idle", (mode, 4, False)), ("Agg render", (mode, 4, True))):
            count, spent, total = PREVIEWS[key]
            print(f"previews ({label}), measured inside the last run: {count} in {m} steps, "
                  f"{1000 * spent / max(count, 1):.1f} ms each, {100 * spent / total:.1f}% of the "
                  "run's time  [aim < 10%]")


if __name__ == "__main__":
    main()
