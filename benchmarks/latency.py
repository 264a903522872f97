"""Click to pixels: from a control's change to the first new frame on the widget's canvas, in
JupyterLab in headless Chromium (the browser tests' setup: ``tests/browser/browserkit.py``).

    python benchmarks/latency.py                 # 20 changes per row
    python benchmarks/latency.py --changes 5     # a smoke run

Rows (EfficientNet-Lite0, the cat, each explorer in its own cell of one notebook):

* ``FeatureMapExplorer`` layer switch, cached: back and forth between two layers already shown;
* ``FeatureMapExplorer`` layer switch, first visit: each change to a layer not shown before
  (the explorer may have prefetched it in the background: "first visit", not "uncached");
* ``AttributionExplorer`` quick-method switch: ``cam`` ↔ ``grad_cam``.

How a change is timed, inside the page: the widget's canvases are fingerprinted (a sample of
their pixels), the ``<select>`` is changed and its ``change`` event dispatched, and the time is
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
CELLS = {
    "cwlat-maps": "w = cw.FeatureMapExplorer(model, image)\nw.add_class('cwlat-maps')\nw",
    "cwlat-attr": "w = cw.AttributionExplorer(model, image, method='cam')\n"
                  "w.add_class('cwlat-attr')\nw",
}

# fingerprint the canvases, change the select, resolve at the first frame that differs
CHANGE_JS = """
async ([css, nth, value, limit]) => {
  const root = document.querySelector('.' + css);
  const select = Array.from(root.querySelectorAll('select'))
      .filter(s => s.getClientRects().length > 0)[nth];
  const canvases = Array.from(root.querySelectorAll('.jupyter-matplotlib-canvas-div canvas'));
  const sig = () => canvases.map(c => {
    if (!c.width || !c.height) return '0';
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
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
css => Array.from(document.querySelectorAll('.' + css + ' .jupyter-matplotlib-canvas-div canvas'))
  .map(c => c.width && c.height ? c.toDataURL().length + ':' + c.toDataURL().slice(-64) : '0')
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


def summary(name: str, times: list) -> str:
    got = sorted(t for t in times if t >= 0)
    missed = len(times) - len(got)
    if not got:
        return f"{name:44} no change seen ({missed} tries)"
    p90 = got[min(len(got) - 1, int(round(0.9 * (len(got) - 1))))]
    return (f"{name:44} median {statistics.median(got):6.0f} ms   90th {p90:6.0f} ms   "
            f"n={len(got)}" + (f"  ({missed} without a change)" if missed else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="changes per row (≥ 20 to report)")
    parser.add_argument("--settle", type=float, default=0.8,
                        help="seconds without a canvas change before the next change")
    parser.add_argument("--out", default=None, help="also write the output to this file")
    args = parser.parse_args()
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
                    settle(page, css, 2.0, limit=180)
                rows = measure(page, args)
        finally:
            bk.stop_server(server)
        print()
        for name, times in rows.items():
            print(summary(name, times))


def measure(page, args) -> dict:
    rows: dict = {}
    n = args.changes
    # FeatureMapExplorer: its first select is the layer
    css = "cwlat-maps"
    page.locator(f".{css}").first.scroll_into_view_if_needed()
    layers = [v for v, _ in page.evaluate(OPTIONS_JS, [css, 0])]
    a, b = layers[-1], layers[-2]
    for value in (a, b):  # both shown once: cached from now on
        change(page, css, 0, value, args.settle)
    rows["FeatureMapExplorer layer, cached"] = [
        change(page, css, 0, (a, b)[i % 2], args.settle) for i in range(n)]
    fresh = [v for v in layers[:-2]][:n]
    rows["FeatureMapExplorer layer, first visit"] = [
        change(page, css, 0, v, args.settle) for v in fresh]
    # AttributionExplorer: its first select is the method
    css = "cwlat-attr"
    page.locator(f".{css}").first.scroll_into_view_if_needed()
    options = page.evaluate(OPTIONS_JS, [css, 0])
    pick = {text.split()[0]: value for value, text in options}
    cam, grad_cam = pick["cam"], pick["grad_cam"]
    change(page, css, 0, grad_cam, args.settle)
    change(page, css, 0, cam, args.settle)
    rows["AttributionExplorer method cam <-> grad_cam"] = [
        change(page, css, 0, (grad_cam, cam)[i % 2], args.settle) for i in range(n)]
    return rows


if __name__ == "__main__":
    main()
