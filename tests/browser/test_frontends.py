"""Every widget, in a real browser, in JupyterLab 4, Notebook 7 and Voila.

For each front end a server is started on 127.0.0.1 with a notebook that builds every widget
present in this checkout (plus a bare ipympl ``probe``), headless Chromium runs it through the
front end's own UI (Run > Run All Cells; Voila runs it on load), and for each widget we check:

* its figures render: every ipympl canvas looks drawn *inside its axes* -- an image that is
  not one flat colour, plots with ink inside their frames; ticks on empty axes are not a
  drawing (``browserkit.judge_drawn``; the notebook's first cell, ``figtags``, tags each
  canvas with where its axes are),
* moving its control in the DOM (select an option, press a slider, click a figure) changes the
  pixels of a figure that was there before (one appearing or going away is no change), and
  afterwards every figure still looks drawn,
* no error appears: no traceback, no "Error displaying widget", no "Failed to load model
  class", no ipywidgets error widget, no error box inside the widget, none in the console.

Adding a widget = one ``Case`` in ``CASES``. Widgets not in this checkout are skipped.
The detector is tested too: ``test_detector_*`` runs widgets whose canvas front-end model
cannot load, whose control is wired to nothing, and whose figure goes blank when clicked, and
asserts that the checks above report all three.

Screenshots go to test-artifacts/browser/ (``*-judged.png``: each figure with the regions
judged outlined -- images blue, plots orange, legends left out grey -- and their measures in
``drawn-measures.txt``); ``CNNWIDGETS_UPDATE_SCREENSHOTS=1`` also copies the README's ones
into tests/browser/screenshots/. ``CNNWIDGETS_BROWSER_BREAK=1`` breaks the
canvas front-end model in the widgets notebook itself (the suite must then fail).
"""
from __future__ import annotations

import os
import time
import warnings

import pytest

import browserkit as bk
from browserkit import Case

pytestmark = pytest.mark.browser

SETUP = """\
import cnnwidgets as cw
model = cw.load_model("efficientnet_lite0")
image = cw.sample_image("cat")"""

# A bare ipympl canvas from cnnwidgets' make_figure with a dropdown wired to redraw it: proves
# the plumbing (ipywidgets + ipympl front ends) in every front end, whatever widgets exist.
PROBE_CODE = """\
import numpy as np, ipywidgets as W
from cnnwidgets.widgets.base import make_figure
_fig, _canvas = make_figure(3, 2)
_im = _fig.add_subplot().imshow(np.random.default_rng(0).random((8, 8)))
_dd = W.Dropdown(options=["a", "b", "c"])
def _redraw(change):
    _im.set_data(np.random.default_rng(ord(change.new)).random((8, 8)))
    _canvas.draw_idle()
_dd.observe(_redraw, "value")
w = W.VBox([_dd, _canvas.view])"""

# EfficientNet-Lite0 as a dense classifier (as in the fixations notebook): a 7×7 output map
DENSE_CODE = """\
import torch
class _DenseLite0(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, fc = net, net._fc
        self.head = torch.nn.Conv2d(fc.in_features, fc.out_features, 1)
        with torch.no_grad():
            self.head.weight.copy_(fc.weight[:, :, None, None])
            self.head.bias.copy_(fc.bias)
    def forward(self, x):
        return self.head(self.net.extract_features(x))
dense = cw.Model(_DenseLite0(model.module), labels=model.labels, name="Lite0, dense")"""

QUICKSTART = "01_quickstart.ipynb"

PROBE = Case("probe", widget="", code=PROBE_CODE, control=("select", 0, "next"), timeout=60)

# One entry per widget: the cell that builds ``w`` and the control a user would move.
# Controls of widgets still on other branches are the obvious first control; adjust on merge.
CASES = [
    PROBE,
    Case("feature_maps", "FeatureMapExplorer", "w = cw.FeatureMapExplorer(model, image)",
         control=("select", 0, "next")),
    Case("feature_maps_click", "FeatureMapExplorer",
         "w = cw.FeatureMapExplorer(model, image)", control=("canvas", 0, 0.2, 0.2)),
    Case("attribution", "AttributionExplorer", "w = cw.AttributionExplorer(model, image)",
         control=("select", 0, "next"), timeout=120),
    # the "deletion / insertion curves" checkbox: a figure of curves appears under the maps
    # (it must look drawn); then the next method must redraw those curves (figure #1)
    Case("attribution_evaluate", "AttributionExplorer",
         "w = cw.AttributionExplorer(model, image)", prepare=(("checkbox", 0),),
         control=("select", 0, "next"), figure=1, timeout=180),
    # a dense output (Lite0's linear layer as a 1×1 convolution: 1000×7×7 scores), whose region
    # a click-and-drag on the input panel chooses; letting go explains it (saliency: the map
    # follows the region; Grad-CAM at the 1×1 head would only rescale it)
    Case("attribution_drag", "AttributionExplorer", DENSE_CODE + "\n"
         "w = cw.AttributionExplorer(dense, image, 'saliency')",
         control=("drag", 0, 0.2, 0.3, 0.32, 0.6), timeout=120),
    # live occlusion: the method's window / stride sliders (its parameters' controls); a
    # coarse grid (window and stride 56: 16 windows) answers in seconds; the stride slider
    # (#1, after window) moved 8 steps to 64 puts the windows elsewhere: a new map
    Case("attribution_occlusion", "AttributionExplorer",
         "w = cw.AttributionExplorer(model, image, 'occlusion')\n"
         "w.params = {**w.params, 'window': 56, 'stride': 56}",
         control=("slider", 1, 12), timeout=120),
    # the target dropdown: a new backtrack redraws every panel. (The backtrack-step slider,
    # moved with ArrowRight, changed the figure in Lab and Voila but not in Notebook 7, where
    # the key press did not reach the slider; the step itself is covered by the widget tests.)
    Case("fixations", "FixationExplorer", "w = cw.FixationExplorer(model, image)",
         control=("select", 0, "next"), timeout=120),
    # a small dissection of one block on the synthetic concepts; the unit dropdown
    Case("dissection", "DissectionExplorer",
         "result = cw.dissect(model, cw.datasets.SyntheticConcepts(24, 64), ['_blocks.10'], "
         "progress=False)\nw = cw.DissectionExplorer(result)", control=("select", 1, "next"),
         timeout=120),
    # a small evaluation (6 offline images, localisation and pointing only); the method
    # dropdown must redraw the bars' outline and the gallery
    Case("evaluation", "EvaluationExplorer",
         "ev = cw.evaluate(model, cw.datasets.SyntheticBoxes(6, seed=0), ['grad_cam', "
         "'saliency'], ['localization', 'pointing'], progress=False)\n"
         "w = cw.EvaluationExplorer(ev, model)", control=("select", 0, "next"), timeout=150),
    # grey until Start (by design); Start must form the picture and draw the loss curve. A
    # small, short run: the figure is judged when it settles, the run may still be going on
    Case("feature_vis", "FeatureVisualizer",
         "w = cw.FeatureVisualizer(model, steps=16, size=64, preview_every=2)",
         control=("button", "Start"), starts_blank=True, timeout=120,
         again=(("button", "neuron"),)),
    # the second tab is built when first shown (its figures must look drawn); then its
    # method dropdown must change them
    Case("explorer", "Explorer", "w = cw.Explorer(model, image)", prepare=(("tab", 1),),
         control=("select", 0, "next"), timeout=120),
    # the attack menu: FGSM → PGD redraws the adversarial image, maps, fixations and drift
    Case("attack", "AttackExplorer", "w = cw.AttackExplorer(model, image)",
         control=("select", 0, "next"), timeout=150),
    # the layer menu: the curves of the next layer and the image with its units off
    Case("pruning", "PruningExplorer",
         "w = cw.PruningExplorer(model, cw.datasets.sample_variants(4), "
         "layers=['_blocks.4._bn0', '_blocks.10._bn0'], fractions=(0, 0.5, 1))",
         control=("select", 0, "next"), timeout=150),
    # a small CNN on the synthetic shapes: the curves are empty until Start (by design); Start
    # trains in the background, the curves grow and the panels follow the newest snapshot
    Case("training_monitor", "TrainingMonitor",
         "import torch; from cnnwidgets.engine.training import small_cnn\ntorch.manual_seed(0)\n"
         "w = cw.TrainingMonitor(small_cnn(), cw.datasets.SyntheticShapes(512, 32), every=4, "
         "epochs=1)", control=("button", "Start"), starts_blank=True, timeout=120),
    # Lite0 against a random ResNet-18: the layer-A menu takes the next layer pair
    Case("compare", "CompareExplorer",
         "w = cw.CompareExplorer(model, cw.load_model('resnet18', pretrained=False), image)",
         control=("select", 0, "next"), timeout=120),
]

# The break used by the detector test (and by CNNWIDGETS_BROWSER_BREAK=1): every ipympl canvas
# created afterwards names a front-end module that does not exist.
BREAK = """\
import traitlets, ipympl.backend_nbagg as _nbagg
class _BrokenCanvas(_nbagg.Canvas):
    _model_module = traitlets.Unicode("cnnwidgets-no-such-module").tag(sync=True)
_nbagg.Canvas = _BrokenCanvas  # make_figure() now builds canvases the browser cannot load
"""

UNWIRED = Case("unwired", widget="", control=("select", 0, "next"), code="""\
import numpy as np, ipywidgets as W
from cnnwidgets.widgets.base import make_figure
_fig2, _canvas2 = make_figure(3, 2)
_fig2.add_subplot().imshow(np.random.default_rng(1).random((8, 8)))
w = W.VBox([W.Dropdown(options=["a", "b", "c"]), _canvas2.view])  # the dropdown drives nothing""")

# An image whose click hides it (the bug): the figure changes, and what is left is empty axes
# with their ticks -- the drawn check must report it.
BLANK = Case("blank", widget="", control=("canvas", 0, 0.5, 0.5), code="""\
import numpy as np, ipywidgets as W
from cnnwidgets.widgets.base import make_figure
_fig4, _canvas4 = make_figure(3, 2)
_ax4 = _fig4.add_subplot()
_im4 = _ax4.imshow(np.random.default_rng(2).random((8, 8)))
def _blank(event):
    _im4.set_visible(False)
    _canvas4.draw_idle()
_canvas4.mpl_connect("button_press_event", _blank)
w = W.VBox([_canvas4.view])""")

# A canvas whose front-end model cannot load (its JS module does not exist), in a VBox.
BROKEN = Case("broken", widget="", control=("select", 0, "next"), code="""\
import traitlets, ipywidgets as W
from matplotlib.figure import Figure
from ipympl.backend_nbagg import Canvas as _Canvas, FigureManager as _Manager
class _BrokenCanvas(_Canvas):
    _model_module = traitlets.Unicode("cnnwidgets-no-such-module").tag(sync=True)
_fig3 = Figure(figsize=(3, 2))
_fig3.add_subplot().plot([0, 1], [1, 0])
_canvas3 = _BrokenCanvas(_fig3)
_Manager(_canvas3, 0)
w = W.VBox([W.Dropdown(options=["a", "b"]), _canvas3])""")


def available(case: Case) -> bool:
    if not case.widget:
        return True
    import cnnwidgets

    try:
        getattr(cnnwidgets, case.widget)
    except (AttributeError, ImportError):
        return False
    return True


def present_cases() -> list[Case]:
    return [c for c in CASES if available(c)]


# The widgets notebook's first cell: every figure's canvas then says where its axes are.
FIGTAGS = (f"import sys; sys.path.insert(0, {str(bk.HERE)!r})\n"
           "import figtags; figtags.install()  # test instrumentation: tags canvases with axes")


def notebook_cells() -> list[str]:
    cells = [FIGTAGS]
    if os.environ.get("CNNWIDGETS_BROWSER_BREAK") == "1":
        cells.append(BREAK)
    if any(c.widget for c in present_cases()):
        cells.append(SETUP)
    # the detector's own cases come last: BROKEN breaks every canvas made after it
    return cells + [bk.case_cell(c) for c in present_cases() + [UNWIRED, BLANK, BROKEN]]


# what test_page_has_no_errors leaves to the detector test: the deliberately broken case
BROKEN_SCOPE = bk.case_scope(BROKEN)
BROKEN_MODULE = "cnnwidgets-no-such-module"


def _shot_widget(page, case: Case, name: str, publish: bool = False) -> None:
    root = bk.widget_root(page, case)
    root.scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # no hover toolbar in the picture
    page.wait_for_timeout(400)
    path = bk.save_png(root.screenshot(animations="disabled"), name)
    # the README shows one picture per widget and front end: the widget's first case
    first = next(c for c in CASES if c.widget == case.widget)
    if publish and case.widget and first is case:
        bk.publish(path)


def _save_judged(shots, prefix: str) -> None:
    """Each figure with its judged regions outlined, and its measures (for tuning the check)."""
    bk.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(bk.ARTIFACTS / "drawn-measures.txt", "a") as log:
        for i, shot in enumerate(shots):
            bk.save_png(bk.judged_png(shot), f"{prefix}-fig{i}-judged.png")
            measures = " ".join(f"{k}={v:.4f}" for k, v in bk.drawn_measures(shot).items())
            each = " ".join(f"{k}:{v:.3f}" for k, v in bk.each_region_measure(shot))
            log.write(f"{prefix}-fig{i} {shot.key} {measures} | {each}\n")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_widget_renders_and_control_changes_figure(frontend, case):
    if not available(case):
        bk.unavailable(f"cw.{case.widget} is not in this checkout")
    page, kind = frontend.page, frontend.kind
    bk.wait_rendered(page, case, timeout=case.timeout + 120, watch=frontend.watch,
                     exclude=BROKEN_SCOPE, ignore=BROKEN_MODULE)
    bk.prepare(page, case)
    before = bk.settled_shots(page, case)
    _save_judged(before, f"{kind}-{case.id}-before")
    _shot_widget(page, case, f"{kind}-{case.id}-before.png")
    problems = bk.find_problems(page, scope=bk.case_scope(case))
    assert not problems, f"{kind}/{case.id} shows errors after rendering:\n" + "\n".join(problems)
    off = bk.misaligned(bk.figures(page, case))  # what is seen is where the clicks go
    assert not off, f"{kind}/{case.id}: a frame image is not under its canvas:\n" + "\n".join(off)

    what = bk.move_control(page, case)
    bk.wait_changed(page, case, before, timeout=case.timeout)
    bk.settled_shots(page, case)
    after = bk.wait_drawn(page, case, timeout=30, what=f"after {what}")
    _save_judged(after, f"{kind}-{case.id}-after")
    _shot_widget(page, case, f"{kind}-{case.id}.png", publish=True)
    key = None if case.figure is None else before[case.figure].key
    changed = bk.figure_change(before, after, key)
    assert changed > bk.CHANGED, f"{kind}/{case.id}: {what} changed only {changed:.4%} of pixels"
    problems = bk.find_problems(page, scope=bk.case_scope(case))
    assert not problems, f"{kind}/{case.id} shows errors after {what}:\n" + "\n".join(problems)


def test_page_has_no_errors(frontend):
    """The whole page and the browser console, after every case ran."""
    problems = bk.find_problems(frontend.page, frontend.watch, exclude=BROKEN_SCOPE)
    problems = [p for p in problems if BROKEN_MODULE not in p]
    assert not problems, f"{frontend.kind}: " + "\n".join(problems)


@pytest.mark.parametrize("frontend", ["lab"], indirect=True)
def test_classroom_projector_with_large_font(frontend):
    """1280x720 (a projector) with a 20 px font: every control visible, inside the screen,
    not overlapping another, and still working."""
    page = frontend.page
    page.set_viewport_size({"width": 1280, "height": 720})
    bk.collapse_left_sidebar(page)
    page.add_style_tag(content="body { --jp-ui-font-size1: 20px; --jp-content-font-size1: 20px;"
                               " --jp-code-font-size: 20px; --jp-widgets-font-size: 20px; }")
    # pointer controls are left out: a click or a drag repeated at the same place rightly
    # draws the same picture (and the positions differ at this size)
    cases = [c for c in present_cases() if c.control[0] not in ("canvas", "drag")]
    for case in cases:
        root = bk.widget_root(page, case)
        root.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        layout = root.evaluate(_LAYOUT_JS)
        bad = []
        for ctl in layout["controls"]:
            if ctl["w"] < 4 or ctl["h"] < 4:
                bad.append(f"{ctl['what']} is not visible ({ctl['w']:.0f}x{ctl['h']:.0f})")
            if ctl["x"] < 0 or ctl["x"] + ctl["w"] > 1280 + 0.5:
                bad.append(f"{ctl['what']} leaves the screen (x={ctl['x']:.0f}, w={ctl['w']:.0f})")
            if ctl["font"] < 19 and ctl["type"] not in ("checkbox", "radio"):  # no text
                bad.append(f"{ctl['what']} ignores the large font ({ctl['font']}px)")
        clipped = [c["what"] for c in layout["controls"] if c.get("clipped")]
        if clipped:  # readable but cut: worth knowing, not a failure
            warnings.warn(f"{case.id} at 20px font: option text cut in {', '.join(clipped)}")
        right = min(1280, layout["area_right"])
        for fig in layout["figures"]:
            if fig["x"] + fig["w"] > 1280 + 0.5:
                bad.append(f"a figure leaves the screen (right edge {fig['x'] + fig['w']:.0f}px)")
            elif fig["x"] + fig["w"] > right + 0.5:  # scrolls sideways in its output: a warning
                warnings.warn(f"{case.id} at 1280x720: a figure's right edge "
                              f"{fig['x'] + fig['w']:.0f}px is past the output area's "
                              f"{right:.0f}px (it scrolls sideways)")
        bad += [f"{a} overlaps {b}" for a, b in layout["overlaps"]]
        assert layout["controls"], f"{case.id}: no controls found"
        assert not bad, f"{case.id} at 1280x720, 20px font:\n" + "\n".join(bad)
        _shot_widget(page, case, f"lab-{case.id}-classroom.png", publish=True)
        # still usable: the control still changes the figure at this size (the case's own test
        # already moved its ``prepare`` controls on this page), and every figure stays drawn
        for control in case.again:  # a repeat would rightly draw the same picture
            bk.move_control(page, case, control)
        before = bk.settled_shots(page, case, timeout=15)
        what = bk.move_control(page, case)
        bk.wait_changed(page, case, before, timeout=case.timeout)
        bk.wait_drawn(page, case, timeout=30, what=f"after {what} at 1280x720")
        problems = bk.find_problems(page, scope=bk.case_scope(case))
        assert not problems, f"{case.id} at 1280x720:\n" + "\n".join(problems)


_LAYOUT_JS = r"""
(root) => {
  const sel = 'select, input:not([type=hidden]), textarea, .noUi-target, ' +
              'button:not(.jupyter-matplotlib-button)';
  const controls = [];
  for (const el of root.querySelectorAll(sel)) {
    if (el.closest('.jupyter-matplotlib-toolbar')) continue;
    if (el.getClientRects().length === 0) continue;  // in a hidden tab: not on screen at all
    const cs = getComputedStyle(el);
    if (cs.display === 'none' || cs.visibility === 'hidden' || el.closest('[style*="display: none"]')) continue;
    const r = el.getBoundingClientRect();
    const label = (el.tagName === 'SELECT' && el.selectedIndex >= 0
                   ? el.options[el.selectedIndex].text
                   : (el.getAttribute('title') || el.innerText || el.value || '')).trim().slice(0, 30);
    // does the chosen option's text fit in the select (minus its arrow)?
    let clipped = false;
    if (el.tagName === 'SELECT' && el.selectedIndex >= 0) {
      const ctx = document.createElement('canvas').getContext('2d');
      ctx.font = cs.font;
      const text = el.options[el.selectedIndex].text;
      clipped = ctx.measureText(text).width > el.clientWidth - 24;
    }
    controls.push({what: `${el.tagName.toLowerCase()} "${label}"`, x: r.x, y: r.y, w: r.width,
                   h: r.height, font: parseFloat(cs.fontSize), clipped, type: el.type || ''});
  }
  const figures = Array.from(root.querySelectorAll('.jupyter-matplotlib-canvas-div'))
                       .filter(el => el.getClientRects().length > 0).map(el => {
    const r = el.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height};
  });
  const overlaps = [];
  for (let i = 0; i < controls.length; i++) for (let j = i + 1; j < controls.length; j++) {
    const a = controls[i], b = controls[j];
    const ix = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x);
    const iy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    if (ix > 2 && iy > 2) overlaps.push([a.what, b.what]);
  }
  const area = root.closest('.jp-OutputArea-output') || root.parentElement || root;
  const ar = area.getBoundingClientRect();
  return {controls, figures, overlaps, area_right: ar.x + ar.width};
}
"""


@pytest.mark.parametrize("frontend", ["lab"], indirect=True)
def test_quickstart_notebook_runs(frontend):
    """The README's first command: the quickstart, opened and run in JupyterLab by the UI."""
    if not (frontend.server.root / "notebooks" / QUICKSTART).is_file():
        bk.unavailable(f"notebooks/{QUICKSTART} is not in this checkout")
    page = bk.new_page(frontend.browser)
    watch = bk.PageWatch(page)
    try:
        bk.open_notebook(page, frontend.server, f"notebooks/{QUICKSTART}")
        bk.wait_all_cells_ran(page, timeout=300)
        figs = page.locator(".jupyter-matplotlib-canvas-div")
        assert figs.count() >= 1, "the quickstart shows no widget figure"
        deadline = time.monotonic() + 60
        while True:
            shots = bk.canvas_pngs(figs)
            if all(bk.looks_drawn(s) for s in shots):
                break
            assert time.monotonic() < deadline, "a quickstart figure never drew"
            page.wait_for_timeout(500)
        problems = bk.find_problems(page, watch)
        assert not problems, "\n".join(problems)
        bk.save_png(shots[0], "lab-quickstart-fig0.png")
    finally:
        page.context.close()


def test_detector_catches_broken_front_end_model_and_dead_control(frontend):
    """The checks above must fail on a widget whose front-end model cannot load, and on a
    control that changes nothing -- otherwise a green run proves nothing."""
    page, kind = frontend.page, frontend.kind
    page.set_viewport_size({"width": 1280, "height": 900})
    # a dropdown wired to nothing: the pixel check must report it
    bk.wait_rendered(page, UNWIRED, timeout=120)
    before = bk.settled_shots(page, UNWIRED, timeout=10, quiet=0.8)
    bk.move_control(page, UNWIRED)
    with pytest.raises(AssertionError, match="did not change the figure"):
        bk.wait_changed(page, UNWIRED, before, timeout=4)
    # a frame image moved off its canvas, then none at all: the alignment check must say so
    figs = bk.figures(page, UNWIRED)
    assert bk.misaligned(figs) == []
    frame = bk.widget_root(page, UNWIRED).locator("img.cw-frame")
    margin = frame.evaluate("img => img.style.marginLeft")  # the layout's, inline
    frame.evaluate("img => { img.style.marginLeft = '10px'; }")
    assert "its frame image at" in "".join(bk.misaligned(figs))
    frame.evaluate("(img, m) => { img.style.marginLeft = m; img.classList.remove('cw-frame'); }",
                   margin)
    assert "no frame image" in "".join(bk.misaligned(figs))
    frame = bk.widget_root(page, UNWIRED).locator("img.widget-image")
    frame.evaluate("img => img.classList.add('cw-frame')")
    assert bk.misaligned(figs) == []
    # a click that leaves empty axes with their ticks: the figure changes, but the drawn
    # check must report it (and it passed the same figure before the click)
    bk.wait_rendered(page, BLANK, timeout=120)
    before = bk.settled_shots(page, BLANK, timeout=10, quiet=0.8)
    assert not bk.undrawn(before), bk.undrawn(before)
    what = bk.move_control(page, BLANK)
    bk.wait_changed(page, BLANK, before, timeout=30)
    with pytest.raises(AssertionError, match="do not look drawn") as blank:
        bk.wait_drawn(page, BLANK, timeout=3, what=f"after {what}")
    assert "plot axes are empty" in str(blank.value), blank.value
    # the canvas whose model class cannot load: the detector must report it, in the
    # widget's output and in the console
    with pytest.raises(AssertionError, match=bk.WIDGET_FAILURES.pattern) as failed:
        bk.wait_rendered(page, BROKEN, timeout=90, watch=frontend.watch)
    scoped = bk.find_problems(page, scope=BROKEN_SCOPE)
    console = [p for p in bk.find_problems(page, frontend.watch) if p.startswith("console")]
    (bk.ARTIFACTS / f"{kind}-detector.txt").write_text(
        "\n\n".join([str(failed.value), *scoped, *console, *frontend.watch.console]))
    root = bk.widget_root(page, BROKEN)
    root.scroll_into_view_if_needed()
    bk.save_png(root.screenshot(), f"{kind}-broken.png")
    assert any(bk.WIDGET_FAILURES.search(p) for p in scoped), (scoped, console)
    assert any(BROKEN_MODULE in p for p in console), console
