"""Click to pixels: from a control's change to the first new frame on the widget's canvas, in
JupyterLab in headless Chromium (the browser tests' setup: ``tests/browser/browserkit.py``).

    python benchmarks/latency.py                 # 20 changes per row
    python benchmarks/latency.py --changes 5     # a smoke run

Each row is measured on several copies of its explorer in one notebook, its changes
alternating between them: ``after`` (everything on), ``before`` (the canvas as ipympl has it,
nothing kept), and one copy per trick with only that trick off (``no image``: frames go through
ipympl's canvas, not an image widget under it; ``no push``: the kernel waits for the front end
to ask for each frame; ``no frames``: a figure state drawn before (a layer, a method's view) is
drawn anew; ``no keep``: the AttributionExplorer computes every view anew). The ratio
after / before is the before / after table of the README; a trick stays where its own
``no …`` copy is ≥ 15 % slower than ``after``.

Rows (EfficientNet-Lite0, the cat, each explorer in its own cell of one notebook):

* ``FeatureMapExplorer`` layer switch, cached: back and forth between two layers already shown;
* ``FeatureMapExplorer`` layer switch, first visit: each change to a layer not shown before
  (the explorer may have prefetched it in the background: "first visit", not "uncached");
* ``AttributionExplorer`` quick-method switch: ``cam`` ↔ ``grad_cam``;
* ``AttributionExplorer`` colour map, first visit: each colour map once (only the map's panel
  changes; nothing kept helps: the row where only pushing frames can show).

How a change is timed, inside the page: the widget's figures are fingerprinted (a sample of
the pixels of each canvas and of each frame image under one), the ``<select>`` is changed and its ``change`` event dispatched, and the time is
read at the first animation frame whose fingerprint differs (so the resolution is one frame,
~16 ms). After each change the page is left to settle (no canvas change for ``--settle``
seconds) before the next. Reported: median and 90th percentile per row. The aims (issue 19):
median ≤ 100 ms for the cached layer switch and the quick-method switch, 90th percentile
≤ 150 ms, on two cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import browserkit as bk  # noqa: E402
from _output import tee  # noqa: E402

SETUP = """\
import cnnwidgets as cw
model = cw.load_model("efficientnet_lite0", device="cpu")
image = cw.sample_image("cat")"""
#: variant → what is switched off in it (canvas tricks of ``widgets.base``; ``keep``: the
#: AttributionExplorer's views computed before)
VARIANTS = {
    "after": (),
    "before": ("image_frames", "push_frames", "frames", "keep"),
    "no image": ("image_frames",),
    "no push": ("push_frames",),
    "no frames": ("frames",),
    "no keep": ("keep",),
}


def css_of(kind: str, variant: str) -> str:
    return f"cwlat-{kind}-{variant.replace(' ', '-')}"


def _cell(kind: str, variant: str) -> str:
    off = VARIANTS[variant]
    make = ("w = cw.FeatureMapExplorer(model, image)" if kind == "maps"
            else "w = cw.AttributionExplorer(model, image, method='cam')")
    canvases = ("[w.canvas]" if kind == "maps" else
                "[w.figures.single_canvas, w.figures.compare_canvas, w.figures.eval_canvas]")
    lines = [make]
    for trick in off:
        if trick == "keep":
            lines.append("w.keep = 0" if kind == "attr" else "")
        elif trick == "frames":
            lines.append(f"for c in {canvases}: c.frames = 0")
        else:
            lines.append(f"for c in {canvases}: c.{trick} = False")
    lines += [f"w.add_class({css_of(kind, variant)!r})", "w"]
    return "\n".join(line for line in lines if line)


CELLS = {css_of(kind, v): _cell(kind, v) for kind in ("maps", "attr") for v in VARIANTS
         if not (kind == "maps" and v == "no keep")}

# fingerprint what the figures show (each canvas, and each frame image under one: drawn into a
# scratch canvas, which decodes it), change the select, resolve at the first frame that differs
CHANGE_JS = """
async ([css, nth, value, limit]) => {
  const root = document.querySelector('.' + css);
  const select = Array.from(root.querySelectorAll('select'))
      .filter(s => s.getClientRects().length > 0)[nth];
  const shown = Array.from(root.querySelectorAll(
      '.jupyter-matplotlib-canvas-div canvas, .cw-figure > img.cw-frame'));
  const scratch = document.createElement('canvas');
  const pixels = el => {
    if (el.tagName !== 'IMG') {
      return el.width && el.height ? el.getContext('2d').getImageData(0, 0, el.width, el.height).data : null;
    }
    if (!el.complete || !el.naturalWidth || getComputedStyle(el).display === 'none') return null;
    scratch.width = el.naturalWidth; scratch.height = el.naturalHeight;
    const ctx = scratch.getContext('2d');
    ctx.drawImage(el, 0, 0);
    return ctx.getImageData(0, 0, scratch.width, scratch.height).data;
  };
  const sig = () => shown.map(el => {
    const d = pixels(el);
    if (!d) return '0';
    let h = 0;
    for (let i = 0; i < d.length; i += 61) h = (h * 31 + d[i]) | 0;
    return String(h);
  }).join(',');
  const before = sig();
  const t0 = performance.now();
  select.value = value;
  select.dispatchEvent(new Event('change', {bubbles: true}));
  return await new Promise(resolve => {
    const tick = () => {
      const t = performance.now() - t0;
      if (sig() !== before) resolve(t);
      else if (t > limit) resolve(-1);
      else requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  });
}"""

OPTIONS_JS = """
([css, nth]) => {
  const root = document.querySelector('.' + css);
  const select = Array.from(root.querySelectorAll('select'))
      .filter(s => s.getClientRects().length > 0)[nth];
  return Array.from(select.options).map(o => [o.value, o.textContent]);
}"""

SIGNATURE_JS = """
css => Array.from(document.querySelectorAll(
    '.' + css + ' .jupyter-matplotlib-canvas-div canvas, .' + css + ' .cw-figure > img.cw-frame'))
  .map(c => c.tagName === 'IMG' ? c.src
       : c.width && c.height ? c.toDataURL().length + ':' + c.toDataURL().slice(-64) : '0')
  .join(',')"""


def settle(page, css: str, quiet: float, limit: float = 60.0) -> None:
    """Wait until the widget's canvases have not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = page.evaluate(SIGNATURE_JS, css)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


def change(page, css: str, nth: int, value: str, settle_s: float, limit_ms: float = 30000):
    """Milliseconds from the change of ``select`` #``nth`` to ``value`` to new pixels."""
    ms = page.evaluate(CHANGE_JS, [css, nth, value, limit_ms])
    settle(page, css, settle_s)
    return ms


def summary(name: str, times: list, floor: list | None = None) -> str:
    got = sorted(t for t in times if t >= 0)
    missed = len(times) - len(got)
    if not got:
        return f"{name:52} no change seen ({missed} tries)"
    p90 = got[min(len(got) - 1, int(round(0.9 * (len(got) - 1))))]
    ratio = ""
    if floor:
        base = sorted(t for t in floor if t >= 0)
        if base:
            ratio = f"   {statistics.median(got) / statistics.median(base):5.2f} of after"
    return (f"{name:52} median {statistics.median(got):6.0f} ms   90th {p90:6.0f} ms   "
            f"n={len(got)}" + ratio + (f"  ({missed} without a change)" if missed else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="changes per row (≥ 20 to report)")
    parser.add_argument("--settle", type=float, default=0.8,
                        help="seconds without a canvas change before the next change")
    parser.add_argument("--out", default=None, help="also write the output to this file")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help="copies of each explorer on the page (default: all; a lighter "
                             "page: after before)")
    args = parser.parse_args()
    for name in [v for v in VARIANTS if args.variants and v not in args.variants]:
        del VARIANTS[name]
    CELLS.clear()
    CELLS.update({css_of(kind, v): _cell(kind, v) for kind in ("maps", "attr") for v in VARIANTS
                  if not (kind == "maps" and v == "no keep")})
    with tee(args.out), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"# {' '.join(['python'] + sys.argv)}")
        print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}; JupyterLab in headless Chromium")
        root = tmp / "root"
        root.mkdir()
        bk.write_notebook(root / "latency.ipynb", [SETUP, *CELLS.values()])
        (tmp / "server").mkdir()
        server = bk.start_server("lab", root, tmp / "server")
        try:
            with bk.chromium(tmp) as browser:
                page = bk.new_page(browser, width=1400, height=1000)
                bk.open_notebook(page, server, "latency.ipynb", timeout=180)
                bk.wait_all_cells_ran(page, 300)
                for css in CELLS:
                    page.locator(f".{css}").first.scroll_into_view_if_needed()
                    settle(page, css, 1.0, limit=180)
                rows = measure(page, args)
        finally:
            bk.stop_server(server)
        print()
        for (row, variant), times in rows.items():
            floor = rows.get((row, "after")) if variant != "after" else None
            print(summary(f"{row} [{variant}]", times, floor))


def measure(page, args) -> dict:
    """Each row's changes, alternating between the variants' copies of the explorer (so that
    a slower stretch of the machine falls on all of them alike)."""
    rows: dict = {}
    n = args.changes
    variants = list(VARIANTS)

    def alternate(row, kind, values_of, only=None):
        for v in only or variants:
            rows[(row, v)] = []
        for i in range(n):
            for v in (only or variants):
                css = css_of(kind, v)
                value, nth = values_of(v, i)
                if value is None:
                    continue
                page.locator(f".{css}").first.scroll_into_view_if_needed()
                rows[(row, v)].append(change(page, css, nth, value, args.settle))

    # FeatureMapExplorer: its first select is the layer
    layers = [v for v, _ in page.evaluate(OPTIONS_JS, [css_of("maps", "after"), 0])]
    a, b = layers[-1], layers[-2]
    maps_variants = [v for v in variants if css_of("maps", v) in CELLS]
    for v in maps_variants:  # both shown once: cached from now on
        css = css_of("maps", v)
        page.locator(f".{css}").first.scroll_into_view_if_needed()
        for value in (a, b):
            change(page, css, 0, value, args.settle)
    alternate("FeatureMapExplorer layer, cached", "maps", lambda v, i: ((a, b)[i % 2], 0),
              only=maps_variants)
    fresh = layers[:-2]
    alternate("FeatureMapExplorer layer, first visit", "maps",
              lambda v, i: (fresh[i] if i < len(fresh) else None, 0),
              only=[v for v in ("after", "before") if v in maps_variants])
    # AttributionExplorer: its first select is the method
    options = page.evaluate(OPTIONS_JS, [css_of("attr", "after"), 0])
    pick = {text.split()[0]: value for value, text in options}
    cam, grad_cam = pick["cam"], pick["grad_cam"]
    attr_variants = [v for v in variants if css_of("attr", v) in CELLS]
    for v in attr_variants:
        css = css_of("attr", v)
        page.locator(f".{css}").first.scroll_into_view_if_needed()
        change(page, css, 0, grad_cam, args.settle)
        change(page, css, 0, cam, args.settle)
    alternate("AttributionExplorer method cam <-> grad_cam", "attr",
              lambda v, i: ((grad_cam, cam)[i % 2], 0), only=attr_variants)
    # the colour map: only the map's panel changes (each one shown for the first time, so
    # nothing comes from kept frames: at most one change per colour map)
    css = css_of("attr", "after")
    nth = next(k for k in range(12)
               if "viridis" in [t for _, t in page.evaluate(OPTIONS_JS, [css, k])])
    maps = [v for v, t in page.evaluate(OPTIONS_JS, [css, nth]) if t != "auto"]
    alternate("AttributionExplorer colour map, first visit", "attr",
              lambda v, i: (maps[i] if i < len(maps) else None, nth),
              only=[v for v in attr_variants if v in ("after", "before")])
    return rows


if __name__ == "__main__":
    main()
