"""WidgetBase: background results reach the figure on the kernel's main thread, in order."""
from __future__ import annotations

import asyncio
import threading
import time

import ipywidgets as widgets
import traitlets

from cnnwidgets.widgets.base import KEEP
from cnnwidgets.widgets.base import WidgetBase as _WidgetBase


class WidgetBase(_WidgetBase):
    """As inside a Jupyter kernel: the running loop (here asyncio.run's) is the main loop."""

    def __init__(self):
        super().__init__()
        self._loop = asyncio.get_running_loop()


def test_no_loop_outside_a_kernel():
    async def cell():
        return _WidgetBase()._loop

    assert asyncio.run(cell()) is None  # a loop runs, but it is not a Jupyter kernel's


def test_background_results_are_applied_on_the_main_thread():
    seen = []

    async def cell():  # like a notebook cell: the kernel's loop is running
        w = WidgetBase()
        w.submit(lambda cancel: (time.sleep(0.2), "old")[1], lambda r: seen.append(("old", r)))
        w.submit(lambda cancel: "new",
                 lambda r: seen.append((threading.current_thread().name, r)))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if seen and not w.task.running:
                break
        await asyncio.sleep(0.3)  # let the slow, stale result arrive too
        return w

    w = asyncio.run(cell())
    assert seen == [(threading.main_thread().name, "new")]  # the stale "old" was dropped
    assert w.errors.last_error is None


def test_background_errors_show_in_the_widget():
    async def cell():
        w = WidgetBase()
        w.submit(lambda cancel: 1 / 0, lambda r: None)
        w.task.wait(5)
        await asyncio.sleep(0.05)
        return w

    w = asyncio.run(cell())
    assert isinstance(w.errors.last_error, ZeroDivisionError)


def test_latest_on_main_keeps_only_the_newest_value():
    drawn = []

    async def cell():
        w = WidgetBase()
        push = w.latest_on_main(drawn.append)
        t = threading.Thread(target=lambda: [push(i) for i in range(50)])
        t.start()
        t.join()
        await asyncio.sleep(0.05)

    asyncio.run(cell())
    assert drawn and drawn[-1] == 49 and len(drawn) < 50


def test_wait_applies_the_result_inside_the_same_cell():
    async def cell():
        w = WidgetBase()
        got = []
        w.submit(lambda cancel: 42, got.append)
        w.wait()  # a notebook cell that reads the result at once: the loop has not run yet
        return got

    assert asyncio.run(cell()) == [42]


def test_a_frame_before_the_front_end_is_ready_is_kept_as_a_data_url():
    # ipympl keeps the last frame in `_data_url` for a front-end model created later; it must
    # be a loadable data URL (ipympl itself stores bare base64, which the browser loads as a
    # broken image and then fails on in drawImage)
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cnnwidgets.widgets.base import make_figure

    fig, canvas = make_figure(2, 1.5, dpi=50)
    canvas.image_frames = False  # frames through ipympl's canvas
    fig.add_subplot().imshow(np.arange(12.0).reshape(3, 4))
    assert canvas.syncing_data_url  # no front end here
    canvas.draw()
    url = canvas._data_url
    prefix = "data:image/png;base64,"
    assert isinstance(url, str) and url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert image.size == (100, 75)  # the whole figure: 2 × 1.5 in at 50 dpi


def test_a_draw_asked_for_during_a_render_is_asked_for_again_after_its_frame():
    # the front end ignores a "draw" while it waits for a frame; with ipykernel 7 a result
    # drawn on the main thread can come while a subshell thread renders: the "draw" it asks
    # for must come again after that frame, or the figure stays stale
    import numpy as np

    from cnnwidgets.widgets.base import make_figure

    fig, canvas = make_figure(2, 1.5, dpi=50)
    canvas.image_frames = False  # frames through ipympl's canvas
    image = fig.add_subplot().imshow(np.arange(12.0).reshape(3, 4))
    sent = []
    canvas.send_event = lambda kind, **kw: sent.append(kind) if kind == "draw" else None
    canvas.send_binary = lambda data: sent.append("frame")
    canvas.draw()
    assert sent == ["frame"]  # a render alone asks for nothing more (no endless redraws)

    def change_during_render(event):  # as the main thread would, while the render goes on
        canvas.mpl_disconnect(cid)
        image.set_data(np.zeros((3, 4)))
        canvas.draw_idle()

    sent.clear()
    cid = canvas.mpl_connect("draw_event", change_during_render)
    canvas.draw()
    assert sent == ["draw", "frame", "draw"]  # the first one ignored, the second one not
    sent.clear()
    canvas.draw_idle()  # outside a render: once
    assert sent == ["draw"]


def test_exit_stops_and_waits_for_background_work():
    """The interpreter's exit asks each widget with live background work to stop, then waits
    for its thread (a daemon thread still inside PyTorch at shutdown aborts the process)."""
    from cnnwidgets.widgets import tasks

    done = []
    w = _WidgetBase()
    w.submit(lambda cancel: (cancel.wait(30), done.append(cancel.is_set())), lambda _: None)
    assert not done
    tasks._finish_background(timeout=10)
    assert done == [True] and not w.task.running and not tasks._BACKGROUND


def test_a_script_that_ends_while_an_explorer_computes_exits_cleanly(tmp_path):
    """Regression: built an explorer, script ended mid-computation → "terminate called without
    an active exception", exit status 134."""
    import subprocess
    import sys

    script = tmp_path / "ends_early.py"
    script.write_text(
        "import time\n"
        "import torchvision\n"
        "import cnnwidgets as cw\n"
        "m = cw.Model(torchvision.models.resnet18(), input_size=(96, 96))\n"
        "w = cw.AttributionExplorer(m, cw.sample_image('cat'), method='score_cam')\n"
        "time.sleep(1.0)\n"
        "assert w.task.running, 'the computation should still be running'\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "terminate called" not in run.stderr


# ----------------------------------------------------------------------------- the binder
class Knob(_WidgetBase):
    """A traitlet that refuses values over 10, bound to a slider that goes to 100."""

    level = traitlets.Int(0)

    def __init__(self):
        super().__init__()
        self.changes = []  # every change the traitlet saw
        self.observe(lambda change: self.changes.append(change["new"]), "level")
        self.slider = widgets.IntSlider(min=0, max=100)
        self.bind(self.slider, "level")

    @traitlets.validate("level")
    def _valid_level(self, proposal):
        if proposal["value"] > 10:
            raise traitlets.TraitError(f"level must be at most 10, not {proposal['value']}")
        return proposal["value"]


def test_binding_goes_both_ways_without_echo():
    k = Knob()
    k.slider.value = 4  # the control sets the traitlet
    assert k.level == 4
    k.level = 7  # the traitlet moves the control
    assert k.slider.value == 7
    assert k.changes == [4, 7]  # each change reached the traitlet once: no echo back
    assert k.errors.last_error is None


def test_a_refused_value_puts_the_control_back_and_shows_why():
    k = Knob()
    k.slider.value = 4
    k.slider.value = 50  # refused by the validator
    assert k.level == 4 and k.slider.value == 4 and k.changes == [4]
    assert isinstance(k.errors.last_error, traitlets.TraitError)
    assert "at most 10, not 50" in k.errors.value and k.errors.layout.display != "none"
    k.slider.value = 6  # the next accepted value clears the refusal
    assert k.level == 6 and k.errors.last_error is None and k.errors.layout.display == "none"


def test_the_binder_clears_only_its_own_refusals():
    k = Knob()
    failure = RuntimeError("a computation failed")
    k.errors.show(failure)  # shown by other work (a foreground computation, say)
    k.slider.value = 3
    assert k.level == 3 and k.errors.last_error is failure


def test_converters_keep_and_unbind():
    k = Knob()
    menu = widgets.Dropdown(options=[("one", "1"), ("two", "2"), ("three", "3")])
    k.bind(menu, "level", to_trait=int, to_control=str)
    k.level = 2
    assert menu.value == "2" and k.slider.value == 2
    menu.value = "3"
    assert k.level == 3 and k.slider.value == 3
    k.level = 9  # not on the menu: the menu keeps what it shows, the slider follows
    assert menu.value == "3" and k.slider.value == 9 and k.errors.last_error is None
    text = widgets.Text()
    k.bind(text, "level", to_trait=lambda s: int(s) if s.isdigit() else KEEP,
           to_control=lambda _: KEEP)  # one way: typing sets the level, code leaves the text
    text.value = "5"
    assert k.level == 5 and menu.value == "3"
    text.value = "fiv"  # KEEP: nothing set, nothing refused
    assert k.level == 5 and text.value == "fiv" and k.errors.last_error is None
    k.unbind(menu)
    menu.value = "1"
    assert k.level == 5
    k.level = 2
    assert k.level == 2 and menu.value == "1"


# ----------------------------------------------------------------------------- bounded work
def _workers():
    return [t for t in threading.enumerate() if t.name.startswith("cnnwidgets-")]


def _join_workers():
    """Wait for every widget thread (also any a task lost track of)."""
    for t in _workers():
        t.join(10)


class Jobs:
    """Numbered works that record when they run, how many run at once and whether they were
    cancelled; work 0 holds until ``gate`` opens (or, with ``on_cancel``, until cancelled)."""

    def __init__(self, on_cancel: bool = False):
        self.gate = threading.Event()
        self.started = threading.Event()  # work 0 is running
        self.on_cancel = on_cancel
        self.log: list = []  # ("start" | "end", i)
        self.cancelled: dict = {}  # i → whether its cancel was set when it ended
        self.active = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, i):
        def work(cancel):
            with self._lock:
                self.active += 1
                self.most = max(self.most, self.active)
                self.log.append(("start", i))
            try:
                if i == 0:
                    self.started.set()
                    (cancel if self.on_cancel else self.gate).wait(30)
                return i
            finally:
                with self._lock:
                    self.cancelled[i] = cancel.is_set()
                    self.active -= 1
                    self.log.append(("end", i))

        return work

    def ran(self):
        return [i for kind, i in self.log if kind == "start"]


def test_a_burst_of_starts_runs_the_running_work_and_the_newest_only():
    """Sixty quick changes used to start sixty threads that all ran to the end at once: now
    one runs, the newest waits, the ones in between never run."""
    w = _WidgetBase()
    jobs, shown = Jobs(), []
    w.submit(jobs(0), shown.append)
    assert jobs.started.wait(10)
    for i in range(1, 51):
        w.submit(jobs(i), shown.append)
    assert len(_workers()) == 1 and w.task.running and w.task.queued
    assert jobs.ran() == [0] and w.task.cancel_event.is_set() is False
    jobs.gate.set()
    w.wait()
    _join_workers()
    assert jobs.ran() == [0, 50] and jobs.most == 1
    assert jobs.log.index(("end", 0)) < jobs.log.index(("start", 50))
    assert jobs.cancelled == {0: True, 50: False}  # the superseded one was asked to stop
    assert shown == [50] and not w.task.running and not w.task.queued and not _workers()


def test_the_newest_work_applies_on_the_main_thread_after_a_burst():
    seen = []

    async def cell():
        w = WidgetBase()
        jobs = Jobs(on_cancel=True)
        w.submit(jobs(0), lambda r: seen.append(("stale", r)))
        assert jobs.started.wait(10)
        for i in range(1, 20):
            w.submit(jobs(i), lambda r: seen.append((threading.current_thread().name, r)))
        w.wait()  # in the same cell: the results wait for the main thread, only the newest shows
        _join_workers()
        return jobs

    jobs = asyncio.run(cell())
    assert jobs.ran() == [0, 19] and jobs.most == 1
    assert seen == [(threading.main_thread().name, 19)]


def test_cancel_reaches_the_waiting_work():
    """The Cancel button while a newer selection waits: it runs with its cancel set (and says
    so in its ``done``) instead of computing in full."""
    w = _WidgetBase()
    jobs, shown = Jobs(), []
    w.submit(jobs(0), shown.append)
    assert jobs.started.wait(10)
    w.submit(jobs(1), shown.append)
    assert w.task.queued
    w.task.cancel()
    jobs.gate.set()
    w.wait()
    _join_workers()
    assert jobs.ran() == [0, 1] and jobs.cancelled == {0: True, 1: True} and shown == [1]


def test_a_foreground_start_waits_for_the_cancelled_work_and_drops_the_waiting_one():
    w = _WidgetBase()
    jobs, shown = Jobs(on_cancel=True), []
    w.submit(jobs(0), shown.append)
    assert jobs.started.wait(10)
    w.submit(jobs(1), shown.append)  # waits for work 0
    w.submit(jobs(2), shown.append, background=False)  # cancels 0, drops 1, runs here
    _join_workers()
    assert jobs.ran() == [0, 2] and jobs.most == 1
    assert jobs.log.index(("end", 0)) < jobs.log.index(("start", 2))
    assert shown == [2]


def test_exit_drops_the_waiting_work():
    from cnnwidgets.widgets import tasks

    w = _WidgetBase()
    jobs = Jobs(on_cancel=True)
    w.submit(jobs(0), lambda _: None)
    assert jobs.started.wait(10)
    w.submit(jobs(1), lambda _: None)
    tasks._finish_background(timeout=10)
    _join_workers()
    assert jobs.ran() == [0] and jobs.cancelled == {0: True}
    assert not w.task.running and not tasks._BACKGROUND


def test_a_failing_callback_does_not_stall_the_queue():
    """A ``failed`` callback that raises (in the worker, outside a kernel) shows its error in
    the widget, and the next works still run."""
    w = _WidgetBase()
    jobs, shown = Jobs(), []

    def explode(result):
        raise RuntimeError("a broken failed callback")

    w.submit(lambda cancel: 1 / 0, lambda r: None, failed=explode)
    w.wait()
    assert isinstance(w.errors.last_error, RuntimeError)  # shown, not lost in the thread
    w.submit(jobs(0), shown.append)
    assert jobs.started.wait(10)
    w.submit(jobs(1), shown.append)
    jobs.gate.set()
    w.wait()
    _join_workers()
    assert jobs.ran() == [0, 1] and shown == [1] and not w.task.running


def test_frames_are_pushed_once_the_front_end_is_there():
    # with a front end, draw_idle renders on the kernel's loop and sends the frame (no round
    # trip through the browser), once for any number of calls; without one it only asks
    import asyncio

    import numpy as np

    from cnnwidgets.widgets.base import make_figure

    fig, canvas = make_figure(2, 1.5, dpi=50)
    canvas.image_frames = False  # frames through ipympl's canvas
    image = fig.add_subplot().imshow(np.arange(12.0).reshape(3, 4))
    sent = []
    canvas.send_event = lambda kind, **kw: sent.append(kind) if kind == "draw" else None
    canvas.send_binary = lambda data: sent.append("frame")
    canvas.draw_idle()
    assert sent == ["draw"]  # no front end yet: it is asked to ask
    canvas.syncing_data_url = False  # what the front end's "initialized" message sets
    canvas.draw_idle()
    assert sent == ["draw", "draw"]  # its handshake is not over until it has asked once
    canvas.handle_draw({})  # the front end asks
    assert sent[-1] == "frame"

    async def cell():
        sent.clear()
        image.set_data(np.zeros((3, 4)))
        canvas.draw_idle()
        canvas.draw_idle()
        await asyncio.sleep(0)
        return list(sent)

    assert asyncio.run(cell()) == ["frame"]
    canvas.push_frames = False
    assert asyncio.run(cell()) == ["draw", "draw"]


def _png_pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


def test_frames_are_shown_by_the_image_under_the_canvas():
    # image_frames: the figure's frames go to an ipywidgets.Image laid under ipympl's canvas,
    # which gets transparent frames only (it takes the clicks)
    import asyncio

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cnnwidgets.widgets.base import make_figure

    fig, canvas = make_figure(2, 1.5, dpi=50)
    image = fig.add_subplot().imshow(np.arange(12.0).reshape(3, 4))
    assert list(canvas.view.children) == [canvas.frame_image, canvas]  # the canvas on top
    assert (canvas.frame_image.layout.width, canvas.frame_image.layout.height) == ("100px", "75px")
    sent, shown = [], []
    canvas.send_event = lambda kind, **kw: sent.append(kind) if kind == "draw" else None
    canvas.send_binary = lambda data: sent.append(_png_pixels(data))
    canvas.frame_image.observe(lambda change: shown.append(change["new"]), "value")

    canvas.handle_draw({})  # a view starts and asks for a frame
    (frame,) = sent
    assert frame.shape == (75, 100, 4) and not frame[..., 3].any()  # the canvas: transparent
    (png,) = shown
    FigureCanvasAgg.draw(canvas)  # the reference: the figure drawn now
    want = np.asarray(canvas.get_renderer().buffer_rgba())[..., :3]
    assert _png_pixels(png).shape == want.shape and (_png_pixels(png) == want).all()
    canvas.handle_draw({})  # asked again, nothing changed: no new image
    assert len(shown) == 1 and len(sent) == 2

    async def cell():  # draw_idle on the kernel's loop: one new image, nothing to ipympl
        sent.clear(), shown.clear()
        image.set_data(np.zeros((3, 4)))
        canvas.draw_idle()
        canvas.draw_idle()
        await asyncio.sleep(0)
        return list(sent), len(shown)

    assert asyncio.run(cell()) == ([], 1)
    assert (_png_pixels(shown[0]) != _png_pixels(png)).any()
    sent.clear(), shown.clear()
    image.set_data(np.ones((3, 4)))
    canvas.draw_idle()  # no loop (a script): the front end is asked to ask, as ipympl does
    assert sent == ["draw"] and shown == []
    canvas.handle_draw({})
    assert len(shown) == 1

    shown = canvas._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
    assert shown["model_id"] == canvas.view.model_id  # displayed alone: its view is shown

    canvas.image_frames = False  # the A/B switch: frames through ipympl's canvas again
    assert canvas.frame_image.layout.display == "none"
    shown = canvas._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
    assert shown["model_id"] == canvas.model_id
    sent.clear()
    canvas.handle_draw({})
    assert sent and sent[-1].shape == (75, 100, 4) and sent[-1][..., 3].all()  # opaque
