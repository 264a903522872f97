"""Drive real Jupyter front ends (JupyterLab 4, Notebook 7, Voila) with headless Chromium.

Everything the browser tests share lives here: starting a server on 127.0.0.1 and killing
it (and every kernel it started) in ``finally``, launching Debian's ``chromium`` through
``playwright`` with a throw-away profile, running a notebook, finding a widget's ipympl
figures, screenshots and pixel comparison, driving controls, and the error detector.

The detector (:func:`find_problems`) is itself tested against a deliberately broken widget
(``test_detector_*`` in ``test_frontends.py``), so a green run means something.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"  # committed copies for the README

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
]

# Front-end failure messages (ipywidgets 8, the JupyterLab/Notebook/Voila widget managers).
WIDGET_FAILURES = re.compile(
    r"error widget|Click to show javascript error|Failed to load model class|Failed to load view class|Error displaying widget"
    r"|model not found|Could not create a (?:model|view)|Could not instantiate widget"
    r"|Error rendering|Class \S+ not found in module|is not registered"
    r"|No version of module \S+ is registered"
    r"|Error setting state"  # e.g. ipympl given a PNG the browser cannot decode
)
CONSOLE_FAILURES = WIDGET_FAILURES


def unavailable(reason: str):
    """Skip the test for want of ``reason`` -- or fail it where ``CNNWIDGETS_REQUIRE_BROWSER=1``
    (``.ci/run`` sets it): in CI the browser tests may never skip."""
    import pytest

    if os.environ.get("CNNWIDGETS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (CNNWIDGETS_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    env = os.environ.get("CNNWIDGETS_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- processes
def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (kernels are started in their own sessions, so a
    process-group kill alone would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate ``proc`` and everything it started; SIGKILL what is left after ``grace``."""
    if proc.poll() is None:
        pids = _descendants(proc.pid)
        for pid in [proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        for pid in [proc.pid, *pids]:
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                        break
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@dataclass
class Server:
    kind: str            # "lab" | "notebook" | "voila"
    base: str            # http://127.0.0.1:PORT
    token: str
    proc: subprocess.Popen
    log: Path
    root: Path
    ready_url: str | None = None

    def url(self, notebook: str) -> str:
        """The page a user opens to see ``notebook`` (a path relative to the root)."""
        if self.kind == "lab":  # a workspace per notebook: a second page restores no other tab
            stem = re.sub(r"[^A-Za-z0-9]+", "-", notebook)
            page = f"lab/workspaces/cw-{stem}/tree"
        else:
            page = {"notebook": "notebooks", "voila": "voila/render"}[self.kind]
        return f"{self.base}/{page}/{notebook}?token={self.token}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def server_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CNNWIDGETS_OFFLINE"] = "1"
    env["TORCH_HOME"] = str(ROOT / ".no-torch-home")
    # a private configuration: nothing from the user's ~/.jupyter changes what we test
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("IPYTHONDIR", "ipython")):
        env[var] = str(tmp / sub)
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    settings = tmp / "settings"
    # every cell in the DOM (no windowing), no news/update toasts over the page
    _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})
    _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
    env.pop("JUPYTER_TOKEN", None)
    return env


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def start_server(kind: str, root: Path, tmp: Path, timeout: float = 90.0) -> Server:
    """Start ``jupyter lab`` / ``jupyter notebook`` / ``voila`` on 127.0.0.1 and wait until
    it answers. The caller must ``stop_server`` in ``finally``."""
    return wait_ready(launch_server(kind, root, tmp), timeout)


def launch_server(kind: str, root: Path, tmp: Path) -> Server:
    """Start a server without waiting for it (several can then start side by side)."""
    port = free_port()
    token = os.urandom(12).hex()
    common = [f"--port={port}", "--no-browser"]
    if kind in ("lab", "notebook"):
        cmd = [sys.executable, "-m", "jupyter", kind, *common, "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--ServerApp.open_browser=False"]
        if kind == "lab":
            cmd.append("--LabApp.extension_manager=readonly")  # no PyPI look-ups from the UI
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
            cmd.append("--allow-root")
        ready = f"http://127.0.0.1:{port}/api/status?token={token}"
    elif kind == "voila":  # serving the folder: every notebook in it is an app
        cmd = [sys.executable, "-m", "voila", str(root), *common, "--Voila.ip=127.0.0.1",
               f"--token={token}", "--show_tracebacks=True", "--Voila.port_retries=0"]
        ready = None
    else:
        raise ValueError(kind)
    log = tmp / f"{kind}-server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=server_env(tmp), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(kind, f"http://127.0.0.1:{port}", token, proc, log, root)
    server.ready_url = ready
    return server


def wait_ready(server: Server, timeout: float = 90.0) -> Server:
    """Wait until a launched server answers; kill it if it does not."""
    proc, kind, ready = server.proc, server.kind, server.ready_url
    port = int(server.base.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited ({proc.returncode}):\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server not ready after {timeout}s:\n{server.log_tail()}")
            try:
                if ready:
                    with urllib.request.urlopen(ready, timeout=2) as resp:
                        if resp.status == 200:
                            break
                else:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
            except OSError:
                time.sleep(0.3)
    except BaseException:
        kill_tree(proc)
        raise
    return server


def stop_server(server: Server) -> None:
    kill_tree(server.proc)


# --------------------------------------------------------------------------- browser
@contextlib.contextmanager
def chromium(tmp: Path):
    """A playwright Chromium (Debian's binary) with a fresh profile; closed in ``finally``."""
    del tmp
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium found; run .ci/install-browser")
    with sync_playwright() as pw:
        # launch() gives every browser a fresh temporary profile, deleted on close
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, width: int = 1280, height: int = 900, scale: float = 1.0):
    """A page in its own context that can reach 127.0.0.1 only (Voila's page asks CDNs for
    fonts; offline CI must not wait on them)."""
    context = browser.new_context(viewport={"width": width, "height": height},
                                  device_scale_factor=scale)
    context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
    return context.new_page()


class PageWatch:
    """Collects console errors and uncaught page errors of one page."""

    def __init__(self, page):
        self.page = page
        self.console: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))

    def _on_console(self, msg):
        if msg.type in ("error", "warning"):
            self.console.append(f"{msg.type}: {msg.text}")


_PROBLEMS_JS = r"""
(args) => {
  const [scope, failures, exclude] = args;
  const rx = new RegExp(failures);
  let roots = [document.body];
  for (const sel of (scope || [])) {  // the first selector that matches anything
    const found = Array.from(document.querySelectorAll(sel));
    if (found.length) { roots = found; break; }
  }
  const out = [];
  const seen = new Set();
  const add = (kind, text) => {
    const key = kind + ':' + text.slice(0, 300);
    if (!seen.has(key)) { seen.add(key); out.push(kind + ': ' + text.slice(0, 1500)); }
  };
  const excluded = (el) => (exclude || []).some(x => el.closest(x));
  const all = (sel) => {
    const found = [];
    for (const r of roots) {
      if (r.matches && r.matches(sel)) found.push(r);
      found.push(...r.querySelectorAll(sel));
    }
    return found.filter(el => !excluded(el));
  };
  // error outputs and tracebacks on stderr (tqdm also writes to stderr: only tracebacks count)
  for (const el of all('[data-mime-type="application/vnd.jupyter.stderr"], ' +
                       '[data-mime-type="application/vnd.jupyter.error"], .jp-OutputArea-error')) {
    const t = el.innerText || el.textContent || '';
    if (/Traceback|Error\b|Exception\b/.test(t)) add('error output', t);
  }
  // widget manager failures rendered into the page
  for (const el of all('.jupyter-widgets-error-widget, .jp-OutputArea-output, .jupyter-widgets, ' +
                       '.widget-subarea, .jp-RenderedJavaScript, .jp-RenderedHTMLCommon')) {
    const t = el.innerText || el.textContent || '';
    const m = t.match(rx);
    if (m) add('widget failure', t);
  }
  // ipywidgets 8 replaces a widget it cannot create by an error widget ("Click to show
  // javascript error."); its hidden text holds the reason
  for (const el of all('.jupyter-widgets-error-widget')) {
    add('error widget', (el.textContent || '').replace(/\s+/g, ' ').trim() || 'error widget');
  }
  // a cnnwidgets ErrorBox: the widget caught an exception in a callback and shows it
  for (const el of all('summary')) {
    if ((el.textContent || '').trim() === 'traceback') {
      const box = el.closest('div');
      add('widget error box', box ? box.innerText : 'traceback');
    }
  }
  // Voila puts cell errors in its own markup
  for (const el of all('.voila-error, .error')) {
    const t = el.innerText || '';
    if (t.trim()) add('voila error', t);
  }
  return out;
}
"""


def find_problems(page, watch: PageWatch | None = None, scope: list | None = None,
                  exclude: list | None = None) -> list[str]:
    """Everything on the page (or under the first ``scope`` selector that matches) that says
    a cell or a widget failed:
    tracebacks, "Error displaying widget", "Failed to load model class", ipywidgets error
    widgets, a widget's own error box, and (with ``watch``) such messages in the console."""
    problems = list(page.evaluate(_PROBLEMS_JS, [scope, WIDGET_FAILURES.pattern, exclude]))
    if watch is not None:
        problems += [f"console {m}" for m in watch.console if CONSOLE_FAILURES.search(m)]
    return problems


# --------------------------------------------------------------------------- pixels
def png_array(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


CHANGED = 0.002  # a figure changed when more than this fraction of its pixels did


def pixel_change(a: bytes, b: bytes) -> float:
    """Fraction of pixels that differ (by more than a rounding step) between two PNGs."""
    x, y = png_array(a), png_array(b)
    if x.shape != y.shape:
        return 1.0
    return float((np.abs(x - y).max(axis=2) > 8).mean())


def looks_drawn(png: bytes) -> bool:
    """True once a canvas shows a picture, not a blank/uniform rectangle."""
    arr = png_array(png)
    return arr.size > 0 and arr.min() != arr.max() and float(arr.std()) > 2.0


# A figure "looks drawn" when, inside its axes (not its ticks, labels, title or frame), the
# browser shows a picture. Image axes (``imshow``): the pixels there, all image axes together,
# must not be one flat colour -- at least IMAGE_VARIED of them away (by more than a shading
# step) from the commonest colour. Other axes (bars, curves, text): at least PLOT_INK of the
# area inside their frames, legends left out, must be ink -- far from the background colour,
# which faint grid lines are not. A figure with both kinds must pass both. Each kind is judged
# over all its axes together: one panel may rightly be nearly flat (FixationExplorer's fc-layer
# panel: one point, 0.1% of its pixels). Measured on every case of the suite in Lab, Notebook 7
# and Voila: images 0.46-0.92 varied, plots 0.025-0.48 ink (the loss curve and the deletion /
# insertion curves are the thinnest); a hidden image (ticks on empty axes), a flat image and
# FeatureVisualizer's grey placeholder before Start: 0.
INSET = 3             # pixels trimmed inside each region: the axes' frame and its antialiasing
SHADE_STEP = 12       # a colour further than this (max over R, G, B) from another is different
INK_STEP = 64         # ink is further than this from the background (grid lines at alpha 0.3: ~24)
IMAGE_VARIED = 0.02   # fraction of image pixels away from the commonest colour
PLOT_INK = 0.002      # fraction of plot pixels that are ink


@dataclass
class FigureShot:
    """One figure as the browser shows it: its canvas bitmap and, from ``figtags``' classes on
    its canvas widget, its identity and where its axes are (fractions of the figure, y down)."""
    png: bytes
    key: str | None = None                               # "cwfig-N"; None: not tagged
    regions: list = field(default_factory=list)          # [(kind "i" | "p", x0, y0, x1, y1)]
    excluded: list = field(default_factory=list)         # legends: [(x0, y0, x1, y1)]

    @classmethod
    def parse(cls, png: bytes, classes) -> "FigureShot":
        shot = cls(png)
        for name in classes:
            kind, _, rest = name.partition("-")
            parts = rest.split("-")
            if kind == "cwfig":
                shot.key = name
            elif kind == "cwax" and len(parts) == 5:
                shot.regions.append((parts[0], *(int(p) / 10000 for p in parts[1:])))
            elif kind == "cwex" and len(parts) == 4:
                shot.excluded.append(tuple(int(p) / 10000 for p in parts))
        return shot


def _pixel_box(box, shape, inset: int = 0) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x0, y0, x1, y1 = box
    return (int(np.ceil(x0 * width)) + inset, int(np.ceil(y0 * height)) + inset,
            int(np.floor(x1 * width)) - inset, int(np.floor(y1 * height)) - inset)


def _region_pixels(arr: np.ndarray, shot: FigureShot, kind: str, only=None) -> np.ndarray:
    """The pixels inside ``shot``'s axes of ``kind`` (frames trimmed, legends left out), N x 3."""
    inside = np.zeros(arr.shape[:2], bool)
    for j, (k, *box) in enumerate(shot.regions):
        if k == kind and (only is None or j == only):
            x0, y0, x1, y1 = _pixel_box(box, arr.shape, INSET)
            if x1 > x0 and y1 > y0:
                inside[y0:y1, x0:x1] = True
    for box in shot.excluded:
        x0, y0, x1, y1 = _pixel_box(box, arr.shape, -1)
        inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = False
    return arr[inside]


def _commonest(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(np.int32) >> 2
    codes = p[:, 0] * 4096 + p[:, 1] * 64 + p[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    return pixels[codes == values[counts.argmax()]][0]


_STEPS = {"i": SHADE_STEP, "p": INK_STEP}


def _far_fraction(pixels: np.ndarray, step: int) -> float:
    """The fraction of ``pixels`` further than ``step`` from their commonest colour."""
    if len(pixels) == 0:
        return 0.0
    return float((np.abs(pixels - _commonest(pixels)).max(axis=1) > step).mean())


def drawn_measures(shot: FigureShot) -> dict:
    """For each kind of axes in the figure: ``"image"``, the fraction of its pixels away from
    the commonest colour; ``"plot"``, the fraction of ink. Empty when the figure has no axes."""
    arr = png_array(shot.png)
    return {name: _far_fraction(_region_pixels(arr, shot, kind), _STEPS[kind])
            for kind, name in (("i", "image"), ("p", "plot"))
            if any(k == kind for k, *_ in shot.regions)}


def each_region_measure(shot: FigureShot) -> list:
    """``drawn_measures`` of each axes alone, as (kind, fraction) (an artefact for tuning)."""
    arr = png_array(shot.png)
    return [(kind, _far_fraction(_region_pixels(arr, shot, kind, only=j), _STEPS[kind]))
            for j, (kind, *_) in enumerate(shot.regions)]


def judge_drawn(shot: FigureShot) -> str | None:
    """None when the figure looks drawn inside its axes; otherwise why not."""
    if shot.key is None:
        return "the figure was never drawn by the kernel (no figtags classes on its canvas)"
    if not shot.regions:
        return "the figure has no visible axes"
    measures = drawn_measures(shot)
    bad = []
    if "image" in measures and measures["image"] < IMAGE_VARIED:
        bad.append(f"its images are one flat colour ({measures['image']:.2%} of their pixels "
                   f"differ, fewer than {IMAGE_VARIED:.0%})")
    if "plot" in measures and measures["plot"] < PLOT_INK:
        bad.append(f"its plot axes are empty ({measures['plot']:.2%} ink inside the frames, "
                   f"less than {PLOT_INK:.1%})")
    return "; ".join(bad) or None


def judged_png(shot: FigureShot) -> bytes:
    """The figure with the regions ``judge_drawn`` looks at outlined (images blue, plots
    orange, legends left out in grey): an artefact to check that the right area is judged."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(shot.png)) as im:
        im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    shape = (im.height, im.width)
    for kind, *box in shot.regions:
        x0, y0, x1, y1 = _pixel_box(box, shape, INSET)
        colour = (0, 90, 255) if kind == "i" else (255, 140, 0)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour)
    for box in shot.excluded:
        x0, y0, x1, y1 = _pixel_box(box, shape, -1)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(128, 128, 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_png(png: bytes, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    return path


def publish(path: Path) -> None:
    """Copy an artefact to the committed screenshots folder (CNNWIDGETS_UPDATE_SCREENSHOTS=1)."""
    if os.environ.get("CNNWIDGETS_UPDATE_SCREENSHOTS") == "1":
        from PIL import Image

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:  # a 256-colour palette: a third of the bytes, same look
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                SCREENSHOTS / path.name, optimize=True)


# --------------------------------------------------------------------------- notebook pages
@dataclass
class Case:
    """One widget in the browser tests: a notebook cell that builds ``w`` and a control to move.

    ``control`` is one of ``("select", nth, option)`` (choose ``option`` -- a label, an
    index or ``"next"`` -- in the ``nth`` ``<select>`` of the widget), ``("slider", nth, pixels)`` (drag the
    ``nth`` slider's handle right by that many pixels with the mouse: Notebook 7 takes arrow
    keys pressed on a handle for its own shortcuts), ``("button", label)`` (click the button with that
    text), ``("checkbox", nth)`` (click the ``nth`` checkbox), ``("tab", index)`` (click a tab of
    an ipywidgets Tab), ``("canvas", nth, fx, fy)`` (click the ``nth`` figure at a fractional
    position), ``("drag", nth, fx0, fy0, fx1, fy1)`` (press the left button at the first
    fractional point of the ``nth`` figure, move to the second, let go). Controls are counted
    among the widget's visible ones (those a user can move).
    ``prepare``: controls moved first, each followed by a wait until every figure looks drawn
    (e.g. open a tab, whose figures then appear: appearing is not a change, a control inside
    the tab then must change them).
    ``again``: controls moved before ``control`` is moved a second time on the same page (the
    classroom test), where repeating it alone would rightly draw the same picture: Start with
    unchanged settings and seed reproduces the last image.
    """
    id: str
    widget: str                       # public cnnwidgets name; the case is skipped without it
    code: str                         # a cell that ends with the widget as ``w``
    control: tuple
    timeout: float = 90.0             # seconds for the figure to change
    figure: int | None = None         # which figure must change (None: any of them)
    prepare: tuple = ()               # controls moved before ``control`` (see above)
    starts_blank: bool = False        # shows a placeholder until ``control`` is moved (Start)
    again: tuple = ()                 # controls moved before ``control`` is repeated (see above)
    marks: list = field(default_factory=list)

    @property
    def css(self) -> str:
        return f"cwtest-{self.id}"


def case_cell(case: Case) -> str:
    return f"{case.code.rstrip()}\nw.add_class({case.css!r})\nw"


def write_notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nb, path)


def open_notebook(page, server: Server, notebook: str, timeout: float = 120.0) -> None:
    """Load the notebook and run every cell (Voila runs it on load)."""
    page.goto(server.url(notebook), wait_until="domcontentloaded", timeout=timeout * 1000)
    if server.kind == "voila":
        return
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
    wait_kernel_idle(server, notebook, timeout)
    page.wait_for_function(
        "() => { const el = document.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return !el || el.getAttribute('data-status') === 'idle'; }", timeout=timeout * 1000)
    # use the menu exactly as a user would: Run > Run All Cells; check that it started
    for _attempt in range(3):
        run_all(page)
        try:
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('.jp-InputPrompt'))"
                ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))", timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - the kernel was not connected yet: try again
            time.sleep(1)
    raise AssertionError(f"{server.kind}: Run All Cells did not start any cell")


def collapse_left_sidebar(page) -> None:
    """JupyterLab: close the file browser (a click on its open tab), giving the notebook the
    width a presenter gives it."""
    tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if tab.count():
        tab.first.click()
        page.wait_for_timeout(300)


def wait_all_cells_ran(page, timeout: float) -> None:
    """Lab/Notebook: every code cell has an execution number (none waiting or running)."""
    page.wait_for_function(
        "() => { const ps = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'));"
        " return ps.length > 0 && ps.every(p => /\\[\\d+\\]/.test(p.textContent)); }",
        timeout=timeout * 1000)


def wait_kernel_idle(server: Server, notebook: str, timeout: float) -> None:
    """Wait until the server reports the notebook's kernel session, idle (the page starts
    it; before that, the front end may show 'idle' without a kernel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{server.base}/api/sessions?token={server.token}",
                                        timeout=5) as resp:
                sessions = json.load(resp)
            if any(s.get("path", "").endswith(notebook)
                   and s.get("kernel", {}).get("execution_state") == "idle" for s in sessions):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{server.kind}: no idle kernel after {timeout}s\n{server.log_tail()}")


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()


def case_scope(case: Case) -> list[str]:
    """Selectors for a case's output: its output area (stderr, error box), else the widget."""
    return [f".jp-OutputArea:has(.{case.css})", f".{case.css}"]


def widget_root(page, case: Case):
    return page.locator(f".{case.css}").first


def figures(page, case: Case):
    return widget_root(page, case).locator(".jupyter-matplotlib-canvas-div")


def wait_rendered(page, case: Case, timeout: float, watch: PageWatch | None = None,
                  exclude: list | None = None, ignore: str | None = None) -> None:
    """Wait until the widget is on the page and every one of its figures looks drawn (for a
    case that ``starts_blank``: shows anything at all). Fails at once (not at the timeout)
    when the page reports an error (other than under ``exclude`` or mentioning ``ignore``)."""
    deadline = time.monotonic() + timeout
    root = widget_root(page, case)
    while True:
        if root.count() and figures(page, case).count():
            break
        problems = [p for p in find_problems(page, watch, exclude=exclude)
                    if not (ignore and ignore in p)]
        if problems:
            raise AssertionError(f"{case.id}: the page reports errors before the widget "
                                 f"rendered:\n" + "\n".join(problems))
        if time.monotonic() > deadline:
            raise AssertionError(f"{case.id}: no widget with figures after {timeout}s")
        time.sleep(0.5)
    if not case.starts_blank:
        wait_drawn(page, case, max(deadline - time.monotonic(), 1.0), what="rendered")
        return
    while not (figures(page, case).evaluate_all(_SHOWN_JS)
               and all(looks_drawn(shot.png) for shot in figure_shots(page, case))):
        if time.monotonic() > deadline:
            raise AssertionError(f"{case.id}: figures never showed within {timeout}s")
        time.sleep(0.5)


# the figures laid out on the page (not in a hidden tab): at least one, none collapsed or hidden
_SHOWN_JS = """
divs => { const shown = divs.filter(d => d.getClientRects().length > 0);
  return shown.length > 0 && shown.every(d => { const r = d.getBoundingClientRect();
    return r.width > 10 && r.height > 10 && getComputedStyle(d).visibility !== 'hidden'; }); }"""


def undrawn(shots: list[FigureShot]) -> list[str]:
    """One line per figure that does not look drawn (``judge_drawn``)."""
    return [f"figure #{i} ({shot.key or 'untagged'}): {why}"
            for i, shot in enumerate(shots) if (why := judge_drawn(shot))]


def wait_drawn(page, case: Case, timeout: float, what: str = "") -> list[FigureShot]:
    """Wait until every one of the widget's figures looks drawn inside its axes
    (``judge_drawn``) and is visible on the page; AssertionError naming the figures that are
    still blank after ``timeout``. The figures' judged regions are saved as artefacts then."""
    deadline = time.monotonic() + timeout
    while True:
        show_figures(page, case)
        shots = figure_shots(page, case)
        bad = undrawn(shots) if shots else ["no figure"]
        if not bad:
            if figures(page, case).evaluate_all(_SHOWN_JS):
                return shots
            bad = ["no figure is visible on the page, or one is shown collapsed or hidden"]
        if time.monotonic() > deadline:
            kind = next((k for k, part in (("lab", "/lab/"), ("notebook", "/notebooks/"),
                                            ("voila", "/voila/")) if part in page.url), "page")
            for i, shot in enumerate(shots):
                save_png(judged_png(shot), f"{kind}-{case.id}-undrawn-fig{i}-judged.png")
            raise AssertionError(f"{case.id}: figures do not look drawn{' ' + what if what else ''}"
                                 f" within {timeout:.0f}s:\n" + "\n".join(bad))
        time.sleep(0.5)


def show_figures(page, case: Case) -> None:
    """Scroll the widget's figures into view (a front end may lay out, and ipympl size and
    draw, only what is near the viewport)."""
    figs = figures(page, case)
    for i in range(figs.count()):
        fig = figs.nth(i)
        if fig.is_visible():  # a figure in a hidden tab cannot be shown
            with contextlib.suppress(Exception):
                fig.scroll_into_view_if_needed(timeout=2_000)


def figure_shots(page, case: Case) -> list[FigureShot]:
    """What each of the widget's figures shows, with where its axes are (see ``figtags``).

    Read from the figure's own bitmaps (its frame image, its canvas over it) rather than a
    screenshot of the page, so that a hover toolbar, a focus ring or the mouse over the
    figure can never pass for a change of the figure. ``wait_rendered`` also checks that the
    figures are visible on the page.
    """
    return canvas_shots(figures(page, case))


_ALIGNED_JS = """
divs => divs.filter(d => d.getClientRects().length > 0).map(d => {
  const c = d.querySelector('canvas');
  const box = d.closest('.cw-figure');
  const img = box ? box.querySelector(':scope > img.cw-frame') : null;
  if (!c) return null;
  if (!img || getComputedStyle(img).display === 'none') return [];
  const a = c.getBoundingClientRect(), b = img.getBoundingClientRect();
  return [a.x, a.y, a.width, a.height, b.x, b.y, b.width, b.height];
}).filter(r => r !== null)"""


def misaligned(figure_divs, tolerance: float = 0.5) -> list[str]:
    """Figures whose frame image (what the user sees) is not exactly under ipympl's canvas
    (what takes the clicks): a click would land on another place of the figure. A figure
    shown without its frame image (a canvas placed alone, not its ``view``) is one too."""
    bad = []
    for i, box in enumerate(figure_divs.evaluate_all(_ALIGNED_JS)):
        if not box:
            bad.append(f"figure #{i}: no frame image under its canvas (placed without its view?)")
            continue
        cx, cy, cw, ch, ix, iy, iw, ih = box
        if max(abs(cx - ix), abs(cy - iy), abs(cw - iw), abs(ch - ih)) > tolerance:
            bad.append(f"figure #{i}: canvas at ({cx:.1f}, {cy:.1f}) {cw:.1f}×{ch:.1f}, its "
                       f"frame image at ({ix:.1f}, {iy:.1f}) {iw:.1f}×{ih:.1f}")
    return bad


def canvas_pngs(figure_divs) -> list[bytes]:
    """PNGs of what each ``.jupyter-matplotlib-canvas-div`` of a locator shows (its frame
    image under its main canvas)."""
    return [shot.png for shot in canvas_shots(figure_divs)]


# what the figure shows: its frame image (``image_frames``: an <img> under the canvas) with
# ipympl's canvas over it, composed as the page shows them; an image not yet loaded is nothing
_SHOTS_JS = """
divs => divs.map(d => {
  const c = d.querySelector('canvas');
  const tagged = d.closest('[class*="cwfig-"]');
  const classes = tagged ? Array.from(tagged.classList) : [];
  if (!(c && c.width && c.height)) return {url: '', classes};
  const box = d.closest('.cw-figure');
  const img = box ? box.querySelector(':scope > img.cw-frame') : null;
  if (!img || getComputedStyle(img).display === 'none') return {url: c.toDataURL('image/png'), classes};
  const both = document.createElement('canvas');
  both.width = c.width; both.height = c.height;
  const ctx = both.getContext('2d');
  if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, c.width, c.height);
  ctx.drawImage(c, 0, 0);
  return {url: both.toDataURL('image/png'), classes};
})"""


def canvas_shots(figure_divs) -> list[FigureShot]:
    """Each ``.jupyter-matplotlib-canvas-div`` of a locator: what it shows as a PNG (its frame
    image with its main canvas over it), and
    the figure's identity and axes from the ``figtags`` classes on its canvas widget."""
    shots = []
    for item in figure_divs.evaluate_all(_SHOTS_JS):
        url = item["url"]
        shots.append(FigureShot.parse(base64.b64decode(url.split(",", 1)[1]) if url
                                      else _EMPTY_PNG, item["classes"]))
    return shots


def _empty_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buf, format="PNG")
    return buf.getvalue()


_EMPTY_PNG = _empty_png()


def settled_shots(page, case: Case, timeout: float = 30.0, quiet: float = 1.5) -> list[FigureShot]:
    """The figures once they have stopped changing for ``quiet`` seconds (background
    computations may still be redrawing just after a render or a control change)."""
    deadline = time.monotonic() + timeout
    last = figure_shots(page, case)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = figure_shots(page, case)
        if [s.key for s in now] == [s.key for s in last] and all(
                pixel_change(a.png, b.png) == 0 for a, b in zip(now, last)):
            if time.monotonic() - since >= quiet:
                return now
        else:
            last, since = now, time.monotonic()
    return last


def figure_change(before: list[FigureShot], after: list[FigureShot],
                  key: str | None = None) -> float:
    """The largest pixel change of a figure shown both before and after (matched by its
    ``figtags`` identity, or only the figure ``key``). A figure that appeared or went away
    counts for nothing: a new tab or a figure added below is not a change of what was there."""
    old = {shot.key: shot for shot in before if shot.key}
    return max((pixel_change(old[shot.key].png, shot.png) for shot in after
                if shot.key in old and (key is None or shot.key == key)), default=0.0)


def move_control(page, case: Case, control: tuple | None = None) -> str:
    """Operate the case's control (or ``control``) through the DOM, counting only visible
    controls; returns a description for messages."""
    root = widget_root(page, case)
    kind, *args = control or case.control
    if kind == "select":
        nth, option = args
        select = root.locator("select:visible").nth(nth)
        select.scroll_into_view_if_needed()
        if isinstance(option, int) or option == "next":
            values = select.locator("option").evaluate_all("os => os.map(o => o.value)")
            if option == "next":  # the option after the current one
                option = values[(values.index(select.input_value()) + 1) % len(values)]
            else:
                option = values[option % len(values)]
            select.select_option(value=option)
        else:
            select.select_option(label=option)
        return f"select #{nth} -> {option!r}"
    if kind == "slider":
        nth, pixels = args
        handle = root.locator(".noUi-handle:visible, input[type=range]:visible").nth(nth)
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + pixels, y, steps=5)
        page.mouse.up()
        return f"slider #{nth} dragged {pixels}px"
    if kind == "button":
        (label,) = args
        root.get_by_role("button", name=label).first.click()
        return f"button {label!r}"
    if kind == "checkbox":
        (nth,) = args
        box = root.locator("input[type=checkbox]:visible").nth(nth)
        box.scroll_into_view_if_needed()
        box.click()
        return f"checkbox #{nth}"
    if kind == "tab":
        (index,) = args
        tab = root.locator(".lm-TabBar-tab:visible").nth(index)
        tab.scroll_into_view_if_needed()
        tab.click()
        return f"tab #{index}"
    if kind == "canvas":
        nth, fx, fy = args
        canvas = widget_root(page, case).locator(".jupyter-matplotlib-canvas-div:visible").nth(nth)
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        return f"click figure #{nth} at ({fx:.2f}, {fy:.2f})"
    if kind == "drag":
        nth, fx0, fy0, fx1, fy1 = args
        canvas = widget_root(page, case).locator(".jupyter-matplotlib-canvas-div:visible").nth(nth)
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        x0, y0 = box["x"] + fx0 * box["width"], box["y"] + fy0 * box["height"]
        x1, y1 = box["x"] + fx1 * box["width"], box["y"] + fy1 * box["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x1, y1, steps=8)  # motion events on the way, as a hand makes them
        page.mouse.up()
        return f"drag on figure #{nth} from ({fx0:.2f}, {fy0:.2f}) to ({fx1:.2f}, {fy1:.2f})"
    raise ValueError(f"unknown control {(control or case.control)!r}")


def prepare(page, case: Case) -> None:
    """Move the case's ``prepare`` controls, each followed by a wait until every figure of the
    widget looks drawn and has settled."""
    for control in case.prepare:
        move_control(page, case, control)
        page.wait_for_timeout(500)
        wait_drawn(page, case, case.timeout, what=f"after {control!r}")
        settled_shots(page, case)


def wait_changed(page, case: Case, before: list[FigureShot], timeout: float) -> list[FigureShot]:
    """Poll the figures until one that was there before (or ``case.figure``, an index into
    ``before``) differs from ``before``."""
    deadline = time.monotonic() + timeout
    key = None if case.figure is None else before[case.figure].key
    show_figures(page, case)
    while True:
        now = figure_shots(page, case)
        if figure_change(before, now, key) > CHANGED:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{case.id}: moving the control ({case.control!r}) did not change the figure "
                f"within {timeout}s")
        time.sleep(0.5)
