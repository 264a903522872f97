"""What every cnnwidgets widget shares: ipympl canvases, shown errors, background work, save.

Widgets are thin: they observe traitlets, call the public engine API, hand arrays to
``cnnwidgets.render`` and place the canvases in an ipywidgets layout. No maths here.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import html
import threading
import time
import traceback
import weakref
from typing import Callable

import ipywidgets as widgets
from matplotlib.figure import Figure


def _canvas_class():
    """ipympl's canvas, sending frames as fast-compressed PNGs.

    matplotlib encodes each frame at zlib level 6; level 1 encodes about 2.5× faster for
    ~10% more bytes, which on a local kernel is the better trade for interactive redraws.

    Until the front end says it is initialised, ipympl keeps the last frame in the synced
    ``_data_url`` trait for a front-end model created later — but ipympl 0.9–0.10 stores the
    bare base64 there, without ``data:image/png;base64,``. A model created from that state
    loads a broken image, and its next resize throws in ``drawImage`` ("The HTMLImageElement
    provided is in the 'broken' state"), which stops the figure from ever drawing: the
    intermittent "figures never drew" of the browser tests when a widget's first frame came
    before its front end was ready. The frame is kept here as a proper data URL.
    """
    from base64 import b64encode
    from io import BytesIO

    import numpy as np
    from ipympl.backend_nbagg import Canvas
    from PIL import Image

    class FastCanvas(Canvas):
        png_compress_level = 1

        def get_diff_image(self):
            needed = ("_png_is_old", "_force_full", "_last_buff", "set_image_mode")
            if not all(hasattr(self, a) for a in needed):  # a matplotlib we do not know
                return super().get_diff_image()
            if not self._png_is_old:
                return None
            pixels = np.asarray(self.get_renderer().buffer_rgba())
            frame = pixels.view(np.uint32).squeeze(2)
            full = (self._force_full or frame.shape != self._last_buff.shape
                    or bool((pixels[:, :, 3] != 255).any()))
            self.set_image_mode("full" if full else "diff")
            out = frame if full else np.where(frame != self._last_buff, frame, 0)
            self._last_buff = frame.copy()
            self._force_full = False
            self._png_is_old = False
            with BytesIO() as buffer:
                rgba = out.view(np.uint8).reshape(*out.shape, 4)
                Image.fromarray(rgba).save(buffer, format="png",
                                           compress_level=self.png_compress_level)
                return buffer.getvalue()

        def send_binary(self, data):
            if not (getattr(self, "syncing_data_url", False) and hasattr(self, "_last_buff")):
                return super().send_binary(data)
            frame = self._last_buff.view(np.uint8).reshape(*self._last_buff.shape, 4)
            with BytesIO() as png:
                Image.fromarray(frame).save(png, format="png",
                                            compress_level=self.png_compress_level)
                self._data_url = "data:image/png;base64," + b64encode(png.getvalue()).decode()
            self.send({"data": '{"type": "binary"}'}, buffers=[data])

    return FastCanvas


def make_figure(width: float = 6.0, height: float = 4.0, dpi: int = 100, layout=None,
                toolbar: bool = False):
    """A matplotlib ``Figure`` with an ipympl canvas widget, outside pyplot's global state.

    Nothing is registered with ``pyplot`` (no figure leaks, no double display), and it works
    whatever ``%matplotlib`` backend the notebook uses. ``layout`` is matplotlib's layout
    engine ("constrained", "tight" or None); None (fixed axes positions) redraws fastest.
    ``toolbar``: ipympl's pan/zoom toolbar. Off by default: it fades in over the left edge of
    the figure on hover, covering what users click, and pan/zoom modes swallow those clicks.
    """
    from ipympl.backend_nbagg import FigureManager

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    canvas = _CANVAS()(fig)
    FigureManager(canvas, 0)
    canvas.header_visible = False
    canvas.footer_visible = False
    canvas.toolbar_visible = "fade-in-fade-out" if toolbar else False
    canvas.toolbar_position = "left"
    canvas.resizable = False
    canvas.capture_scroll = False
    return fig, canvas


_CANVAS = functools.lru_cache(maxsize=1)(_canvas_class)


def _running_loop():
    """The Jupyter kernel's event loop when called from a notebook cell or widget callback;
    None elsewhere (scripts, tests — even where some other library runs an event loop, as
    playwright's sync API does: nothing would ever run the calls queued on it)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipywidgets depends on IPython
        return None
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


#: background threads of the widgets still running, with their widget (weakly)
_BACKGROUND: "dict[threading.Thread, weakref.ref]" = {}
_BACKGROUND_LOCK = threading.Lock()
EXIT_WAIT = 10.0  #: seconds the interpreter's exit waits for the widgets' background threads


def background_thread(owner: "WidgetBase", target: Callable) -> threading.Thread:
    """Start ``target`` in a daemon thread that the interpreter's exit stops and waits for.

    A daemon thread still inside PyTorch when the interpreter shuts down aborts the process
    ("terminate called without an active exception", exit status 134): a script that builds
    an explorer and ends while it computes, or a notebook kernel shut down mid-computation.
    At exit, each widget is asked to stop (:meth:`WidgetBase.cancel_background`) and its
    thread is waited for, up to :data:`EXIT_WAIT` seconds in all."""

    def run():
        try:
            target()
        finally:
            with _BACKGROUND_LOCK:
                _BACKGROUND.pop(threading.current_thread(), None)

    thread = threading.Thread(target=run, daemon=True, name=f"cnnwidgets-{type(owner).__name__}")
    with _BACKGROUND_LOCK:
        _BACKGROUND[thread] = weakref.ref(owner)
    thread.start()
    return thread


@atexit.register
def _finish_background(timeout: float | None = None) -> None:
    with _BACKGROUND_LOCK:
        live = list(_BACKGROUND.items())
    for _, ref in live:
        owner = ref()
        if owner is not None:
            try:
                owner.cancel_background()
            except Exception:  # noqa: BLE001 - exiting: stopping is best effort
                pass
    deadline = time.monotonic() + (EXIT_WAIT if timeout is None else timeout)
    for thread, _ in live:
        thread.join(max(0.0, deadline - time.monotonic()))


class ErrorBox(widgets.HTML):
    """A red box inside the widget that shows the last callback error (hidden when none)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layout.display = "none"
        self.last_error: BaseException | None = None

    def show(self, exc: BaseException) -> None:
        self.last_error = exc
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        self.value = (
            "<div style='color:#a40000;background:#fff0f0;border:1px solid #e0a0a0;"
            "padding:6px;font-family:monospace;white-space:pre-wrap;font-size:12px'>"
            f"<b>{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</b>\n"
            f"<details><summary>traceback</summary>{html.escape(tb)}</details></div>"
        )
        self.layout.display = None

    def clear(self) -> None:
        self.last_error = None
        self.value = ""
        self.layout.display = "none"


class WidgetBase(widgets.VBox):
    """Base container: an error box, a status line, ``save(path)`` and background tasks.

    Subclasses set ``self.figure`` (the figure ``save`` writes) and wrap their callbacks with
    :meth:`guarded` so that an exception shows inside the widget instead of vanishing into the
    JupyterLab log.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.errors = ErrorBox()
        self.status = widgets.HTML(value="", layout=widgets.Layout(min_height="1.5em"))
        self.figure: Figure | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._loop = _running_loop()
        self._queue = collections.deque()

    # ----------------------------------------------------------------- threads
    def on_main(self, fn: Callable, *args) -> None:
        """Call ``fn(*args)`` on the kernel's main thread.

        matplotlib and ipywidgets are not thread-safe: a figure drawn or a widget changed from a
        worker thread while the notebook builds another figure can leave that figure blank. So
        background work hands its results to the kernel's event loop (captured when the widget
        was built), through a queue that :meth:`wait` also drains. With no running loop
        (scripts, tests) ``fn`` runs at once.
        """
        loop = self._loop
        if (loop is None or loop.is_closed() or not loop.is_running()
                or threading.current_thread() is threading.main_thread()):
            fn(*args)
            return
        with self._lock:
            self._queue.append((fn, args))
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Run the calls queued by :meth:`on_main`, in order (on the main thread)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                fn, args = self._queue.popleft()
            fn(*args)

    def latest_on_main(self, fn: Callable) -> Callable:
        """A function ``push(value)`` that calls ``fn(value)`` on the main thread, dropping
        values that arrive while an earlier one is still waiting (live previews: only the
        newest frame is worth drawing)."""
        state = {"pending": False, "value": None}
        lock = threading.Lock()

        def run():
            with lock:
                if not state["pending"]:
                    return
                value, state["pending"] = state["value"], False
            fn(value)

        def push(value):
            with lock:
                state["value"] = value
                if state["pending"]:
                    return
                state["pending"] = True
            self.on_main(run)

        return push

    # ----------------------------------------------------------------- errors
    def guarded(self, fn: Callable) -> Callable:
        """Wrap a callback: exceptions are shown in the widget's error box, not raised."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                self.errors.show(exc)
                return None
            self.errors.clear()
            return result

        return wrapper

    # ----------------------------------------------------------------- background work
    def submit(self, compute: Callable, done: Callable, *, background: bool = True) -> int:
        """Run ``compute()`` (in a thread when ``background``), then ``done(result)``.

        Each submission gets a generation number; a result that arrives after a newer
        submission is dropped, so an old selection never overwrites a newer one. ``done`` and
        error reporting run on the kernel's main thread (see :meth:`on_main`).
        Returns the generation number.
        """
        with self._lock:
            self._generation += 1
            generation = self._generation
        if self._loop is None:
            self._loop = _running_loop()

        def failed(exc):
            if generation == self._generation:
                self.errors.show(exc)
                self.status.value = ""

        def finish(result):
            if generation != self._generation:
                return
            try:
                done(result)
                self.errors.clear()
            except Exception as exc:  # noqa: BLE001
                self.errors.show(exc)

        def run():
            try:
                result = compute()
            except Exception as exc:  # noqa: BLE001
                self.on_main(failed, exc)
                return
            self.on_main(finish, result)

        if background:
            self._thread = background_thread(self, run)
        else:
            run()
        return generation

    def cancel_background(self) -> None:
        """Ask the running background work to stop at its next check (the interpreter's exit
        calls it before waiting for the widget's threads). Widgets whose work can stop between
        steps override it."""

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until the latest background task has finished and its result is shown
        (for scripts, tests and notebook cells that read the result right away)."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout)
        if threading.current_thread() is threading.main_thread():
            self._drain()

    # ----------------------------------------------------------------- output
    def save(self, path, dpi: int | None = None) -> None:
        """Write the widget's current figure to ``path`` (PNG unless the suffix says otherwise)."""
        if self.figure is None:
            raise RuntimeError("this widget has no figure to save yet")
        self.figure.savefig(path, dpi=dpi or self.figure.dpi)
