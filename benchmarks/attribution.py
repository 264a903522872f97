"""Attribution speed: every method against the floor and against Captum / pytorch-grad-cam.

    python benchmarks/attribution.py --out benchmarks/results/attribution-$(date +%F).txt
    python benchmarks/attribution.py --quick    # smoke run: fast rows only (no Score-/
                                                # Ablation-CAM, occlusion, RISE, nor SmoothGrad /
                                                # IG on EfficientNet), one pair, no settling
    python benchmarks/attribution.py --ab fold  # one speed trick of cnnwidgets.engine.fast
                                                # on / off in alternating pairs (see ab)
    python benchmarks/attribution.py --occlusion  # occlusion only: exact (incremental) and
                                                # approximate against Captum at window 32 /
                                                # stride 16 and 16 / 8, the approximate map's
                                                # agreement, where the time goes and the
                                                # bound (multiply-adds) exact mode can reach
    python benchmarks/attribution.py --occlusion --quick --settings 32/16 --models resnet18
                                                # a smoke run of one setting
    python benchmarks/attribution.py --drill-orders --models efficientnet_lite0
                                                # accuracy of the approximate mode's variants
                                                # (drill-down orders and shares, thresholds)

Models: ResNet-18 with RANDOM weights (torchvision, ``weights=None``: nothing is downloaded)
and EfficientNet-Lite0 with its trained weights (shipped, offline).

Everything is measured in ONE run, at 224 px, batch 1, same target, same layer, same steps /
samples / windows / upsampling for both sides (guided Grad-CAM: bilinear, as ours, where
Captum's default is nearest):

* floor: one forward plus one backward to the input (plain PyTorch; one warm-up call, then the
  median of 5);
* ours: ``cw.attribute(...)``; peer: the same method in Captum or pytorch-grad-cam;
* ratios: ours / floor and ours / peer (< 1 means we are faster).

Protocol, the same for every row: one untimed warm-up call of each side (one-time costs such as
building the folded twin or a peer's hooks), then at least three (ours, peer) pairs whose order
alternates — ours then peer, peer then ours, ours then peer… — so that drifts in the machine's
speed fall on both sides and neither always runs second. ours / peer is the median of the
ratios of the pairs; the seconds are medians over the pairs.

Pairs: ``--repeats`` (default 5) for SmoothGrad and Integrated Gradients, ``--single-repeats``
(default 15) for the one-pass methods, ``--slow-repeats`` (default 3) for the slow ones
(Ablation-CAM, occlusion, RISE, and Integrated Gradients / SmoothGrad on EfficientNet),
``--score-cam-repeats`` (default 3) for Score-CAM, whose aim is tight. Fewer than three is
refused except with ``--quick``, which is a smoke test (one pair, no settling pause), not a
measurement.
``--out FILE`` writes everything printed to FILE as well: the raw output behind a README table
is committed beside it, in ``benchmarks/results/``.
On a shared, contended machine the absolute seconds move a lot between runs; the ratios, taken
in the same run under the same load, move much less.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cnnwidgets as cw  # noqa: E402
from _output import tee  # noqa: E402  (benchmarks/, the script's own folder)

TARGET = 281  # tabby cat (any fixed class: random-weight models have no meaningful top-1)
SLOW = {"score_cam", "ablation_cam", "occlusion", "rise"}
SAMPLING = {"integrated_gradients", "smoothgrad"}
LAYERS = {"resnet18": "layer4", "efficientnet_lite0": "_bn1"}  # a module both sides can hook
PARAMS = {
    "smoothgrad": {"n_samples": 25, "noise": 0.15},
    "integrated_gradients": {"steps": 50, "baseline": "zeros"},
    "occlusion": {"window": 32, "stride": 16, "baseline": "zeros", "batch_size": 32},
    "rise": {"n_masks": 1000},
}


SETTLE = 0.3  # seconds of quiet before each timed call (see _once)
MIN_PAIRS = 3  # the protocol's least number of (ours, peer) pairs per row


def _once(fn):
    # A peer's NumPy call (pytorch-grad-cam's Eigen-CAM runs an SVD through OpenBLAS) leaves
    # OpenBLAS threads spinning for a moment; on two cores, whatever runs next gets ~3× slower
    # (measured: a 43 ms forward pass takes 135 ms right after a NumPy SVD). Alternating the
    # two sides would charge that to the side that runs second, so each call starts settled.
    time.sleep(SETTLE)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # peers' own progress bars
        fn()
    return time.perf_counter() - start


def timed(fn, repeats):
    _once(fn)  # warm-up
    return statistics.median(_once(fn) for _ in range(repeats))


def timed_pair(ours, peer, pairs):
    """Median seconds of ``ours`` and ``peer`` and the per-pair ratios ours / peer.

    One untimed call of each side first (one-time costs such as building the folded twin), then
    ``pairs`` pairs whose order alternates (ours, peer), (peer, ours), (ours, peer)…: on a shared
    machine the speed drifts by tens of per cent within minutes (measured here: the same
    SmoothGrad call took 0.70–1.28 s within one minute), and back-to-back blocks would put that
    drift into the ratio; a pair's ratio is taken under nearly the same conditions, and a fixed
    order would always give one side the other's leftovers (caches, spinning threads)."""
    _once(ours)
    if peer is not None:
        _once(peer)
    a, b = [], []
    for i in range(pairs):
        if peer is None:
            a.append(_once(ours))
        elif i % 2 == 0:
            a.append(_once(ours))
            b.append(_once(peer))
        else:
            b.append(_once(peer))
            a.append(_once(ours))
    ratios = [x / y for x, y in zip(a, b)]
    return statistics.median(a), (statistics.median(b) if b else None), ratios


def floor_fn(net, x):
    def run():
        xb = x.detach().requires_grad_(True)
        torch.autograd.grad(net(xb)[0, TARGET], xb)
    return run


def peers(net, x, layer_name, sigma):
    """method → (peer name, callable) for the same computation in Captum / pytorch-grad-cam."""
    out = {}
    try:
        import captum.attr as ca
    except ImportError:
        ca = None
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    layer = dict(net.named_modules())[layer_name]
    if ca is not None:
        out["saliency"] = ("Captum Saliency", lambda: ca.Saliency(net).attribute(x, target=TARGET))
        out["gradient_x_input"] = ("Captum InputXGradient", lambda: ca.InputXGradient(net).attribute(
            x.clone().requires_grad_(), target=TARGET))
        out["smoothgrad"] = ("Captum NoiseTunnel(Saliency)", lambda: ca.NoiseTunnel(ca.Saliency(net)).attribute(
            x, nt_type="smoothgrad", nt_samples=25, stdevs=sigma, target=TARGET, abs=False))
        out["integrated_gradients"] = ("Captum IntegratedGradients", lambda: ca.IntegratedGradients(
            net).attribute(x, baselines=0.0, target=TARGET, n_steps=50))
        out["guided_backprop"] = ("Captum GuidedBackprop", lambda: ca.GuidedBackprop(net).attribute(
            x, target=TARGET))
        out["deconvnet"] = ("Captum Deconvolution", lambda: ca.Deconvolution(net).attribute(
            x, target=TARGET))
        # Captum upsamples the Grad-CAM map nearest-neighbour by default; ours is bilinear
        # (align_corners=False, as Captum's F.interpolate call): the same upsampling on both sides
        out["guided_grad_cam"] = ("Captum GuidedGradCam (bilinear)", lambda: ca.GuidedGradCam(
            net, layer).attribute(x, target=TARGET, interpolate_mode="bilinear"))
        out["occlusion"] = ("Captum Occlusion", lambda: ca.Occlusion(net).attribute(
            x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), baselines=0.0, target=TARGET,
            perturbations_per_eval=32))
    if pgc is not None:
        def cam(cls):
            def run():
                with cls(model=net, target_layers=[layer]) as c:
                    c(input_tensor=x, targets=[ClassifierOutputTarget(TARGET)])
                net.zero_grad(set_to_none=True)
            return run

        for ours, theirs in [("grad_cam", "GradCAM"), ("grad_cam_pp", "GradCAMPlusPlus"),
                             ("xgrad_cam", "XGradCAM"), ("layer_cam", "LayerCAM"),
                             ("eigen_cam", "EigenCAM"), ("score_cam", "ScoreCAM"),
                             ("ablation_cam", "AblationCAM")]:
            out[ours] = (f"pytorch-grad-cam {theirs}", cam(getattr(pgc, theirs)))
    return out


def aim(method):
    if method in SAMPLING:
        return "≤ 0.60"
    if method == "score_cam":
        return "≤ 0.80"
    return "≤ 1.00"


def bench(model_name, args):
    torch.manual_seed(0)
    model = cw.load_model(model_name, pretrained=model_name == "efficientnet_lite0")
    net = model.module
    image = cw.sample_image("cat")
    x, _ = model.prepare(image)
    layer = LAYERS[model_name]
    floor = timed(floor_fn(net, x), 5)
    sigma = 0.15 * float(x.max() - x.min())
    theirs = peers(net, x, layer, sigma)
    weights = "trained weights" if model_name == "efficientnet_lite0" else "RANDOM weights"
    print(f"\n## {model_name} ({weights}) at 224 px, batch 1 — floor (forward + backward to the "
          f"input): {floor * 1000:.0f} ms")
    print(f"{'method':22} {'ours s':>8} {'×floor':>8} {'peer s':>8} {'ours/peer':>10} {'aim':>7} "
          f"{'pairs':>5} {'pair ratios':>11}  peer")
    rows = []
    for method in args.methods or cw.methods():
        slow = method in SLOW or (method in SAMPLING and model_name == "efficientnet_lite0")
        if args.quick and slow and not args.methods:
            continue
        single = not slow and method not in SAMPLING  # one pass, ~0.1 s: noise needs repeats
        repeats = args.slow_repeats if slow else max(args.repeats, args.single_repeats) \
            if single else args.repeats
        if method == "score_cam":  # a tight aim (≤ 0.80): one pair's ratio moves ±0.1 here
            repeats = args.score_cam_repeats
        params = dict(PARAMS.get(method, {}))
        spec = cw.engine.attribution.get_method(method)
        kw = {"layer": layer} if spec.layer else {}
        peer_name, peer_fn = theirs.get(method, ("—", None))
        ours, peer, ratios = timed_pair(lambda: cw.attribute(model, image, method, target=TARGET,
                                                             progress=False, **kw, **params),
                                        peer_fn, repeats)
        ratio = f"{statistics.median(ratios):10.2f}" if peer else f"{'—':>10}"
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if peer else "—"
        peer_s = f"{peer:8.2f}" if peer else f"{'—':>8}"
        print(f"{method:22} {ours:8.2f} {ours / floor:8.1f} {peer_s} {ratio} "
              f"{aim(method) if peer else '':>7} {repeats:5d} {spread:>11}  {peer_name}", flush=True)
        rows.append((method, ours, peer))
    return rows


OCCLUSION_SETTINGS = ((32, 16), (16, 8))  # (window, stride), the two
HEAD = (20, 60, 210, 200)  # the cat's head in the 224 px crop (x0, y0, x1, y1; notebook 02)


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two maps (pixels ranked; ties broken by position)."""
    import numpy as np

    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def occlusion_rows(model_name, args):
    """Occlusion at the two settings: ours exact (incremental inference) and approximate
    (``exact=False``, default threshold and drill-down) and Captum's ``Occlusion`` (same window,
    stride, zero baseline, 32 copies per pass) in rounds of alternating order (one untimed call
    of each first, except with ``--quick``; ours / Captum is the median of the rounds' ratios);
    then how far the
    approximate map is from the exact one (Spearman's rank correlation, the pointing game of
    both on the cat's head) and, for one batch of 32 copies, where the exact mode's time goes
    (:func:`where_time_goes`)."""
    import captum.attr as ca

    torch.manual_seed(0)
    model = cw.load_model(model_name, pretrained=model_name == "efficientnet_lite0")
    net = model.module
    image = cw.sample_image("cat")
    x, _ = model.prepare(image)
    weights = "trained weights" if model_name == "efficientnet_lite0" else "RANDOM weights"
    print(f"\n## occlusion, {model_name} ({weights}) at 224 px, 32 copies per pass")
    print(f"{'window/stride':14} {'mode':12} {'ours s':>8} {'Captum s':>9} {'ours/Captum':>12} "
          f"{'aim':>7} {'pairs':>5} {'pair ratios':>11}")
    for window, stride in args.settings:
        maps = {}

        def captum(window=window, stride=stride):
            ca.Occlusion(net).attribute(x, sliding_window_shapes=(3, window, window),
                                        strides=(3, stride, stride), baselines=0.0,
                                        target=TARGET, perturbations_per_eval=32)

        def ours(mode, window=window, stride=stride):
            def run():
                maps[mode] = cw.attribute(model, image, "occlusion", target=TARGET,
                                          progress=False, window=window, stride=stride,
                                          baseline="zeros", batch_size=32,
                                          exact=mode == "exact")
            return run

        times = timed_rounds({"exact": ours("exact"), "approximate": ours("approximate"),
                              "Captum": captum}, args.slow_repeats, warm=not args.quick)
        for mode, goal in (("exact", "≤ 0.20"), ("approximate", "≤ 0.05")):
            ratios = [a / b for a, b in zip(times[mode], times["Captum"])]
            print(f"{f'{window}/{stride}':14} {mode:12} {statistics.median(times[mode]):8.2f} "
                  f"{statistics.median(times['Captum']):9.2f} {statistics.median(ratios):12.3f} "
                  f"{goal:>7} {len(ratios):5d} {min(ratios):.3f}–{max(ratios):.3f}", flush=True)
        exact, approx = maps["exact"], maps["approximate"]
        hits = [cw.metrics.pointing_game(a, HEAD).hit for a in (exact, approx)]
        print(f"{'':14} approximate vs exact: rank correlation "
              f"{rank_correlation(approx.map, exact.map):.3f} (aim ≥ 0.95); pointing game on "
              f"the head: exact {'hit' if hits[0] else 'miss'}, approximate "
              f"{'hit' if hits[1] else 'miss'}", flush=True)
        batched, alone = speedup_bounds(model, x, window, stride, 32)
        print(f"{'':14} bound (multiply-adds of the full network ÷ of the incremental passes, "
              f"every window): {batched:.2f}× in batches of 32, {alone:.2f}× window by window",
              flush=True)
    where_time_goes(model, x)


DRILL_IMAGES = ("cat", "coffee", "astronaut", "rocket")
DRILL_SHARES = (0.0, 0.05, 0.1, 0.25, 0.4)
THRESHOLDS = (0.9, 0.8, 0.6)


def drill_orders(model_name, args):
    """How close the approximate map comes to the exact one, for each drill-down order
    (:data:`~cnnwidgets.engine.attribution.perturbation.DRILL_ORDERS`) and share, and for
    Krypton's threshold τ (every window): accuracy only, no timing — what a variant costs is
    the share of windows it runs (and, for τ, the multiply-adds bound: the full network ÷ the
    passes). The exact drops of every window are computed once per image (incremental, exact);
    a drill-down variant then runs :func:`~cnnwidgets.engine.attribution.perturbation.drill`
    on them (with τ = 1 a window's drop is the exact one, so this is the approximate mode's
    map). Rank correlation to the exact map (Spearman, pixels) and whether the map's maximum
    lies within 15 px of the exact map's (``peak``; the pointing game on the head: the cat's).
    Images: the four sample photos, target the cat's 281 and the others' top-1 class."""
    from cnnwidgets.engine import fast, incremental, targets
    from cnnwidgets.engine.attribution.perturbation import (DRILL_ORDERS, drill, window_means,
                                                            window_starts)
    from cnnwidgets.engine.hooks import restored
    from cnnwidgets.engine.incremental import cost

    import numpy as np

    model = cw.load_model(model_name, pretrained=model_name == "efficientnet_lite0")
    net = model.module

    def peak(a, b):
        ra, ca = np.unravel_index(int(np.argmax(a)), a.shape)
        rb, cb = np.unravel_index(int(np.argmax(b)), b.shape)
        return "peak" if np.hypot(ra - rb, ca - cb) <= 15 else "moved"

    print(f"\n## drill-down orders and thresholds, {model_name} at 224 px (accuracy only)")
    print("(windows: the share run; MACs: the passes' multiply-adds ÷ the exact mode's, from the "
          "boxes — a drill-down variant costs about its share of windows)")
    print(f"{'image':10} {'w/s':6} {'variant':26} {'windows':>7} {'MACs':>6} {'rank corr':>9}  peak")
    for name in DRILL_IMAGES:
        image = cw.sample_image(name)
        x, _ = model.prepare(image)
        base = torch.zeros_like(x)
        with restored(net, frozen=True), torch.no_grad():
            y_all = fast.logits(model, x)
            target = targets.resolve(model, TARGET if name == "cat" else int(y_all.argmax()))
            y = float(target.score(y_all)[0])
            for window, stride in args.settings:
                rows, cols = (window_starts(s, window, stride) for s in x.shape[-2:])
                cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
                memo: dict = {}

                def drops_at(tau):
                    out, passes = [], []
                    for lo in range(0, len(cells), 32):
                        boxes = [(rows[i], cols[j]) for i, j in cells[lo:lo + 32]]
                        out.append(fast.occluded_scores(model, target, x, boxes,
                                                        (window, window), base, tau, memo))
                        run = memo.get(("incremental", "fold" in fast.ENABLED))
                        passes.append((len(boxes), dict(run.sizes) if run else {}))
                    grid = (y - torch.cat(out)).reshape(len(rows), len(cols)).double()
                    bound = cost.speedup_bound(run, passes) if run else float("nan")
                    return grid, bound

                exact, exact_bound = drops_at(1.0)
                shape = tuple(x.shape[-2:])
                heat = window_means(exact, rows, cols, (window, window), shape).numpy()
                hit = cw.metrics.pointing_game(heat, HEAD).hit if name == "cat" else None

                def row(variant, grid, share, macs):
                    got = window_means(grid, rows, cols, (window, window), shape).numpy()
                    game = "" if hit is None else (f"; pointing game: exact "
                                                   f"{'hit' if hit else 'miss'}, this "
                                                   f"{'hit' if cw.metrics.pointing_game(got, HEAD).hit else 'miss'}")
                    cost_ = f"{macs:6.2f}" if macs is not None else f"{'—':>6}"
                    print(f"{name:10} {f'{window}/{stride}':6} {variant:26} {share:7.0%} "
                          f"{cost_} {rank_correlation(got, heat):9.3f}  "
                          f"{peak(got, heat)}{game}", flush=True)

                for order in DRILL_ORDERS:
                    for share in DRILL_SHARES:
                        if share == 0.0 and order != "magnitude":
                            continue  # the coarse pass alone: the same for every order
                        runs: list = []
                        todo = torch.full_like(exact, float("nan"))

                        def occlude(part, todo=todo, runs=runs):
                            runs.extend(part)
                            for c in part:
                                todo[c] = exact[c]

                        grid = drill(todo, occlude, share, order)
                        label = "coarse only" if share == 0.0 else f"{order} {share:g}"
                        row(label, grid, len(runs) / len(cells), None)
                for tau in THRESHOLDS:
                    grid, bound = drops_at(tau)
                    row(f"τ {tau:g}, every window", grid, 1.0, exact_bound / bound)


def speedup_bounds(model, x, window, stride, batch):
    """The best speed-up exact incremental inference can give over running the network on every
    occluded copy, counted in multiply-adds from the boxes the engine computes
    (:func:`cnnwidgets.engine.incremental.cost.speedup_bound`): with the windows in batches of
    ``batch`` in the occlusion's order (one box size per batch, the largest), and one window at
    a time (each its own box: the bound of the method, whatever the implementation)."""
    from cnnwidgets.engine import incremental
    from cnnwidgets.engine.attribution.perturbation import window_starts
    from cnnwidgets.engine.hooks import restored
    from cnnwidgets.engine.incremental import cost

    net = model.module
    rows, cols = (window_starts(s, window, stride) for s in x.shape[-2:])
    boxes = [(r, c) for r in rows for c in cols]
    base = torch.zeros_like(x)
    out = []
    with restored(net, frozen=True), torch.no_grad():
        run = incremental.session(net, x)
        if run is None:
            return float("nan"), float("nan")
        for size in (batch, 1):
            passes = []
            for lo in range(0, len(boxes), size):
                part = boxes[lo:lo + size]
                run.run(incremental.occluded_input(x, base, part, (window, window)))
                passes.append((len(part), dict(run.sizes)))
            out.append(cost.speedup_bound(run, passes))
    return tuple(out)


def timed_rounds(fns: dict, rounds: int, warm: bool = True) -> dict:
    """Seconds of each callable of ``fns`` over ``rounds`` rounds whose order alternates (as
    listed, then reversed, …), after one untimed call of each when ``warm``."""
    if warm:
        for fn in fns.values():
            _once(fn)
    times = {name: [] for name in fns}
    order = list(fns)
    for i in range(rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(_once(fns[name]))
    return times


def where_time_goes(model, x, window=32, stride=16, copies=32):
    """Each stage's share of one exact incremental pass over ``copies`` occluded copies, with
    the changed box against the map's size at the stage's end: where the box grows to the
    whole map, incremental inference saves nothing from there on. Beside the time: each stage's
    share of the pass's multiply-adds and its multiply-adds against the full network's there
    (:mod:`cnnwidgets.engine.incremental.cost`)."""
    from cnnwidgets.engine import incremental
    from cnnwidgets.engine.attribution.perturbation import window_starts
    from cnnwidgets.engine.hooks import restored

    net = model.module
    H = x.shape[-1]
    starts = window_starts(H, window, stride)
    boxes = [(r, c) for r in starts for c in starts][:copies]
    with restored(net, frozen=True), torch.no_grad():
        run = incremental.session(net, x)
        if run is None:
            print("(no incremental session for this network)")
            return
        start = incremental.occluded_input(x, torch.zeros_like(x), boxes, (window, window))
        run.run(start)  # warm-up
        seconds: dict = {}
        run.run(start, clock=lambda node, s: seconds.__setitem__(node, s))
        from cnnwidgets.engine import fast

        batch = x.repeat(copies, 1, 1, 1)
        fast.logits(model, batch)  # warm-up (builds the twin)
        full = time.perf_counter()
        fast.logits(model, batch)
        full = time.perf_counter() - full
    from cnnwidgets.engine.incremental import cost

    inside, whole_macs = cost.node_macs(run, run.sizes), cost.node_macs(run)
    stages: dict = {}
    for node, s in seconds.items():
        stage = _stage(node)
        entry = stages.setdefault(stage, [0.0, None, None, 0, 0])
        entry[0] += s
        size = run.sizes.get(node.name, "?")
        if size != "?":
            entry[1] = size
            entry[2] = tuple(run.clean[node].shape[-2:]) if run.clean[node].dim() == 4 else None
    for node, macs in inside.items():
        entry = stages.setdefault(_stage(node), [0.0, None, None, 0, 0])
        entry[3] += macs
        entry[4] += whole_macs[node]
    total, total_macs = sum(seconds.values()), sum(inside.values())
    print(f"\n   where the time goes, window {window} / stride {stride}, {copies} copies: "
          f"{total * 1000:.0f} ms incremental, {full * 1000:.0f} ms for the network's fast twin "
          f"on the copies ({full / total:.2f}×); multiply-adds {total_macs / 1e6:.0f} M per "
          f"copy of {sum(whole_macs.values()) / 1e6:.0f} M: bound "
          f"{sum(whole_macs.values()) / total_macs:.2f}× for this batch")
    print(f"   {'stage':28} {'ms':>7} {'share':>6} {'MACs':>6} {'of full':>7}  box at its end / map")
    for stage, (s, size, shape, macs, of_full) in stages.items():
        box = ("whole" if size is None else f"{size[0]}×{size[1]}") if size != "?" else "—"
        of = f" / {shape[0]}×{shape[1]}" if shape else ""
        share = f"{macs / total_macs:6.1%}" if of_full else f"{'—':>6}"
        part = f"{macs / of_full:7.0%}" if of_full else f"{'—':>7}"
        print(f"   {stage:28} {s * 1000:7.1f} {s / total:6.1%} {share} {part}  {box}{of}")


def _stage(node) -> str:
    """A node's stage: the block it belongs to (``layer2.1``, ``_blocks.7``), else its name."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    name = (str(node.target) if node.op == "call_module"
            else str(stack[-1][0]) if stack and isinstance(stack[-1], tuple) else node.name)
    if node.op == "call_module" and node.name != name.replace(".", "_"):
        name = node.name  # a module called twice (Lite0's _swish: after the stem, in the head)
    parts = name.replace("_blocks_", "_blocks.").split(".")
    if parts[0] in ("layer1", "layer2", "layer3", "layer4", "_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return "head" if parts[0] in ("avgpool", "fc", "_avg_pooling", "_fc", "_dropout", "flatten",
                                  "view", "size") else parts[0]


AB_METHODS = ("saliency", "smoothgrad", "integrated_gradients", "score_cam", "occlusion")


def ab(model_name, trick, args):
    """For each method, ``--ab-pairs`` pairs of calls with the speed trick ``trick`` of
    :mod:`cnnwidgets.engine.fast` on and off, alternating which runs first (on, off; off, on;
    …) so that drifts in the machine's speed fall on both; reports the median of the pairs'
    on / off ratios (< 1: the trick saves time) and each pair's ratio."""
    from cnnwidgets.engine import fast

    if trick not in fast.TRICKS:
        raise SystemExit(f"--ab: unknown trick {trick!r}; one of {', '.join(fast.TRICKS)}")
    torch.manual_seed(0)
    model = cw.load_model(model_name, pretrained=model_name == "efficientnet_lite0")
    image = cw.sample_image("cat")
    layer = LAYERS[model_name]
    was_on = trick in fast.ENABLED
    print(f"\n## {model_name}: {trick} on / off, {args.ab_pairs} pairs")
    print(f"{'method':22} {'on s':>8} {'off s':>8} {'on/off':>8}  pairs")
    for method in args.methods or AB_METHODS:
        kw = {"layer": layer} if cw.engine.attribution.get_method(method).layer else {}
        params = dict(PARAMS.get(method, {}))

        def run(on, method=method, kw=kw, params=params):
            (fast.ENABLED.add if on else fast.ENABLED.discard)(trick)
            try:
                cw.attribute(model, image, method, target=TARGET, progress=False, **kw, **params)
            finally:
                (fast.ENABLED.add if was_on else fast.ENABLED.discard)(trick)

        times = {True: [], False: []}
        for on in (True, False):  # untimed: each side's twin is built once
            _once(lambda: run(on))
        for i in range(args.ab_pairs):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                times[on].append(_once(lambda: run(on)))
        ratios = [a / b for a, b in zip(times[True], times[False])]
        print(f"{method:22} {statistics.median(times[True]):8.2f} "
              f"{statistics.median(times[False]):8.2f} {statistics.median(ratios):8.2f}  "
              + " ".join(f"{r:.2f}" for r in ratios), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, not a measurement: one pair per row, no settling "
                             "pause, and without --methods the fast rows only")
    parser.add_argument("--models", nargs="*", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=5,
                        help="pairs of the sampling methods (SmoothGrad, Integrated Gradients)")
    parser.add_argument("--slow-repeats", type=int, default=3,
                        help="pairs of the slow methods (Ablation-CAM, occlusion, RISE, and "
                             "SmoothGrad / Integrated Gradients on EfficientNet)")
    parser.add_argument("--score-cam-repeats", type=int, default=3,
                        help="pairs of Score-CAM (its aim is tight; single pairs measured "
                             "0.71-0.97 on ResNet-18 within one afternoon)")
    parser.add_argument("--single-repeats", type=int, default=15,
                        help="pairs of single-pass methods (~0.1 s each: on a shared two-core "
                             "machine five repeats leave ±15%% of noise)")
    parser.add_argument("--ab", metavar="TRICK", default=None,
                        help="time one speed trick of cnnwidgets.engine.fast on and off "
                             "(TRICKS there) instead of the comparison with the peers")
    parser.add_argument("--occlusion", action="store_true",
                        help="only the occlusion rows: exact and approximate against Captum at "
                             "window 32 / stride 16 and 16 / 8, agreement, where the time goes")
    parser.add_argument("--drill-orders", action="store_true",
                        help="accuracy only (no timing): the approximate occlusion map's rank "
                             "correlation to the exact one for each drill-down order and share "
                             "and each threshold, on the four sample photos")
    parser.add_argument("--settings", nargs="*", default=list(OCCLUSION_SETTINGS),
                        type=lambda v: tuple(int(p) for p in v.split("/")),
                        help="with --occlusion: the window/stride settings (default 32/16 16/8)")
    parser.add_argument("--ab-pairs", type=int, default=5,
                        help="on / off pairs per method (1 with --quick)")
    parser.add_argument("--out", default=None,
                        help="also write everything printed to this file (the raw output to "
                             "commit beside a README table, e.g. benchmarks/results/"
                             "attribution-<date>.txt)")
    args = parser.parse_args()
    counts = ("repeats", "single_repeats", "slow_repeats", "score_cam_repeats")
    if args.quick:
        global SETTLE
        SETTLE = 0.0
        for name in counts + ("ab_pairs",):
            setattr(args, name, 1)
    elif min(getattr(args, name) for name in counts) < MIN_PAIRS:
        parser.error(f"every row needs at least {MIN_PAIRS} pairs (use --quick for a smoke run)")
    warnings.filterwarnings("ignore")
    with tee(args.out):
        print(f"# {' '.join(['python'] + sys.argv)}")
        print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f} (the machine is shared: absolute times vary)")
        if args.quick:
            print("# --quick: a smoke run (one pair per row, no settling pause); not a measurement")
        if args.drill_orders:
            print("# accuracy only (no timing): every window's exact drop once per image and "
                  "setting, each variant's map from them (τ: every window run with the threshold)")
        elif args.occlusion:
            print(f"# protocol: ours exact, ours approximate and Captum in {args.slow_repeats} "
                  "rounds of alternating order, one untimed call of each first "
                  f"{'(skipped: --quick)' if args.quick else ''}")
        else:
            print(f"# protocol: every row one warm-up call per side, then pairs in alternating order "
                  f"(ours-peer, peer-ours, ...); pairs: single-pass {args.single_repeats}, "
                  f"SmoothGrad / IG {args.repeats}, slow {args.slow_repeats}, "
                  f"Score-CAM {args.score_cam_repeats}")
        start = time.perf_counter()
        for name in args.models:
            if args.ab:
                ab(name, args.ab, args)
            elif args.drill_orders:
                drill_orders(name, args)
            elif args.occlusion:
                occlusion_rows(name, args)
            else:
                bench(name, args)
        print(f"\n# {time.perf_counter() - start:.0f} s in all; load average at the end "
              f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
