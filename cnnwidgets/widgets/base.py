"""What every cnnwidgets widget shares: ipympl canvases, shown errors, controls bound to
traitlets, background work (:mod:`.tasks`), save.

Widgets are thin: they observe traitlets, call the public engine API, hand arrays to
``cnnwidgets.render`` and place the canvases in an ipywidgets layout. No maths here.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import html
import threading
import traceback
from typing import Callable

import ipywidgets as widgets
import traitlets
from matplotlib.figure import Figure

from .tasks import Task


def encode_png(rgba) -> bytes:
    """An H×W×4 uint8 array as PNG bytes: rows unfiltered, zlib at level 1.

    PIL's encoder filters every row adaptively, which on a figure of ~900×400 takes ~27 ms at
    its fastest level; unfiltered rows compress to about the same size (diff frames are
    mostly zeros) in ~15 ms, and every PNG reader decodes them the same.
    """
    import struct
    import zlib

    import numpy as np

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    h, w = rgba.shape[:2]
    rows = np.zeros((h, 1 + 4 * w), dtype=np.uint8)  # a filter byte (0: none) before each row
    rows[:, 1:] = rgba.reshape(h, 4 * w)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b""))


def _canvas_class():
    """ipympl's canvas, made quicker from a change to new pixels in the browser.

    Three things ipympl does not do (each switchable per canvas, for the A/B run of
    ``benchmarks/latency.py``):

    * ``push_frames``: once the front end is there, a ``draw_idle`` renders the figure on the
      kernel's event loop and sends the frame at once, instead of asking the front end to ask
      for it (a round trip through the browser per change). Without a front end (scripts,
      tests, nbconvert) nothing is rendered until one asks, as before.
    * ``partial``: only the axes that changed are drawn again (matplotlib marks them stale),
      over the pixels of the last frame; the others keep theirs. The region an axes is drawn
      in is cleared to the figure's background first: the union of what it covered in the
      last frame and what it covers now (titles and tick labels included); an axes whose
      pixels lie in that region is drawn again too. Anything else that changed (the figure's
      own artists, its size, a layout engine) draws the whole figure.
    * ``fast_png``: frames encoded by :func:`encode_png` (PIL's encoder otherwise, zlib level 1).
    * ``frame_key`` (set by a widget whose figure is a function of a few traitlets): a callable
      returning that state (None: one it cannot name); the last ``frames`` frames are kept by it, and a state shown
      before (the layer switched back to) puts its pixels back instead of drawing anything.

    Until the front end says it is initialised, ipympl keeps the last frame in the synced
    ``_data_url`` trait for a front-end model created later — but ipympl 0.9–0.10 stores the
    bare base64 there, without ``data:image/png;base64,``. A model created from that state
    loads a broken image, and its next resize throws in ``drawImage`` ("The HTMLImageElement
    provided is in the 'broken' state"), which stops the figure from ever drawing: the
    intermittent "figures never drew" of the browser tests when a widget's first frame came
    before its front end was ready. The frame is kept here as a proper data URL.

    The front end asks for one frame at a time and ignores a "draw" that comes while it waits
    for one. With ipykernel 7 the canvas's messages are handled in a subshell thread, so a
    result drawn on the main thread can change the figure while that thread renders the
    frame asked for just before (a drag's outline): the frame shows the figure before the
    change, and the change's own "draw" was ignored: the figure stayed stale for good. A
    "draw" asked for during a render is therefore asked for again once its frame is sent.
    """
    import asyncio
    import threading

    from base64 import b64encode
    from io import BytesIO

    import numpy as np
    from ipympl.backend_nbagg import Canvas
    from matplotlib.backend_bases import DrawEvent
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    def pixel_box(bbox, width, height, margin=2):
        """A display-space Bbox as (row0, row1, col0, col1) of the buffer (rows downwards),
        grown by ``margin`` pixels for antialiasing, clipped to the canvas."""
        x0, y0, x1, y1 = bbox.extents
        c0, c1 = max(0, int(np.floor(x0)) - margin), min(width, int(np.ceil(x1)) + margin)
        r0 = max(0, int(np.floor(height - y1)) - margin)
        r1 = min(height, int(np.ceil(height - y0)) + margin)
        return (r0, r1, c0, c1) if r1 > r0 and c1 > c0 else None

    def union(a, b):
        if a is None or b is None:
            return a or b
        return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))

    def overlap(a, b) -> bool:
        return (a is not None and b is not None and a[0] < b[1] and b[0] < a[1]
                and a[2] < b[3] and b[2] < a[3])

    class FastCanvas(Canvas):
        png_compress_level = 1
        push_frames = True
        partial = True
        fast_png = True
        _rendering = 0  # renders going on (any thread)
        _draw_again = False  # a draw_idle came during one of them
        _render_lock = threading.Lock()
        _push_pending = False
        _whole_next = False
        frame_key = None  # a callable: the state the figure is drawn from (or None)
        frames = 16  # frames kept by state when there is a frame_key
        _drawn = None  # after a draw: (renderer, {axes: pixel box it covers}, background, n)
        _draws = 0  # draw events so far (savefig's draws included)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._frame_lock = threading.RLock()  # one render at a time (main or subshell)
            self._kept_frames: dict = {}  # state → (pixels, axes' pixel boxes)
            self.mpl_connect("draw_event", self._count_draw)

        def _count_draw(self, event):
            self._draws += 1

        # ------------------------------------------------------------ frames on demand
        def draw(self):
            self._render(keep=True)

        def handle_draw(self, event):
            # asked by the front end: maybe on another thread than the one changing the
            # figure, so maybe half a change: shown (the change's own frame follows), not kept
            self._render(keep=False)

        def _render(self, keep: bool):
            with self._render_lock:
                self._rendering += 1
            try:
                with self._frame_lock:
                    self._png_is_old = True
                    key = self._state()
                    whole, self._whole_next = self._whole_next, False
                    try:
                        if whole or not (self._frame_back(key) or self._draw_changed_axes()):
                            self._drawn = None
                            FigureCanvasAgg.draw(self)
                    finally:
                        self.manager.refresh_all()  # sends the frame
                    if self._drawn is None and (key is not None or (
                            self.partial and len(self.figure.axes) > 1)):
                        self._remember_extents()
                    if keep:
                        self._keep_frame(key)
            finally:
                with self._render_lock:
                    self._rendering -= 1
                    again = self._draw_again and not self._rendering
                    if again:
                        self._draw_again = False
                if again:  # after the frame: the front end, no longer waiting, asks anew
                    super().draw_idle()

        def draw_idle(self):
            with self._render_lock:
                if self._rendering:
                    self._draw_again = True
                    # changed while a render went on (another thread): what it marked as
                    # drawn may not be, so the next render draws the whole figure
                    self._whole_next = True
            if self.push_frames and not self.syncing_data_url and self._push():
                return
            super().draw_idle()

        def _push(self) -> bool:
            """Render on this thread's event loop soon (once for any number of calls until
            then); False where this thread runs no loop."""
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            if not self._push_pending:
                self._push_pending = True
                loop.call_soon(self._push_now)
            return True

        def _push_now(self):
            self._push_pending = False
            self.draw()

        # ------------------------------------------------------------ frames kept by state
        def _state(self):
            if self.frame_key is None or not self.frames:
                return None
            state = self.frame_key()
            if state is None:  # a state the widget cannot name: nothing kept
                return None
            renderer = self.get_renderer()
            return (int(renderer.width), int(renderer.height), state)

        def _frame_back(self, key) -> bool:
            """Put back the pixels of a state shown before; False where there are none (or
            the figure changed beyond its state: its own artists, a layout engine)."""
            kept = self._kept_frames.get(key) if key is not None else None
            fig = self.figure
            if (kept is None or self._drawn is None or fig.get_layout_engine() is not None
                    or any(a.stale for a in fig.get_children() if a not in fig.axes)):
                return False
            renderer, _, background, _ = self._drawn
            if self.get_renderer() is not renderer:
                return False
            pixels, boxes = kept
            np.copyto(np.asarray(renderer.buffer_rgba()), pixels)
            for ax in fig.axes:
                ax.stale = False
            fig.stale = False
            DrawEvent("draw_event", self, renderer)._process()
            self._drawn = (renderer, dict(boxes), background, self._draws)
            return True

        def _keep_frame(self, key) -> None:
            if key is None or self._drawn is None:
                return
            renderer, boxes = self._drawn[0], self._drawn[1]
            self._kept_frames.pop(key, None)
            self._kept_frames[key] = (np.asarray(renderer.buffer_rgba()).copy(), dict(boxes))
            while len(self._kept_frames) > self.frames:
                self._kept_frames.pop(next(iter(self._kept_frames)))

        # ------------------------------------------------------------ partial redraws
        def _remember_extents(self):
            """After a whole-figure draw: where each axes' pixels lie, and the background."""
            fig = self.figure
            renderer = self.get_renderer()
            if fig.get_layout_engine() is not None:
                return
            h, w = int(renderer.height), int(renderer.width)
            boxes = {ax: self._extent(ax, renderer, w, h) for ax in fig.axes}
            for ax in fig.axes:  # measuring marks them stale (aspect, ticks): they are drawn
                ax.stale = False
            fig.stale = False
            blank = type(renderer)(w, h, renderer.dpi)
            fig.patch.draw(blank)
            fig.patch.stale = False
            self._drawn = (renderer, boxes, np.asarray(blank.buffer_rgba()).copy(), self._draws)

        @staticmethod
        def _extent(ax, renderer, w, h):
            if not ax.get_visible():
                return None
            box = ax.get_tightbbox(renderer)
            return None if box is None else pixel_box(box, w, h)

        def _draw_changed_axes(self) -> bool:
            """Draw only the stale axes over the last frame; False where the whole figure
            must be drawn."""
            fig, drawn = self.figure, self._drawn
            if not self.partial or drawn is None:
                return False
            renderer, boxes, background, draws = drawn
            if (draws != self._draws  # drawn by someone else since (savefig)
                    or self.get_renderer() is not renderer or set(boxes) != set(fig.axes)
                    or fig.get_layout_engine() is not None
                    or any(a.stale for a in fig.get_children() if a not in boxes)):
                return False
            dirty = [ax for ax in fig.axes if ax.stale]
            if len(dirty) == len(fig.axes):
                return False  # everything changed: one whole draw is no dearer
            h, w = background.shape[:2]
            now = {ax: self._extent(ax, renderer, w, h) for ax in dirty}
            area = [union(boxes[ax], now[ax]) for ax in dirty]
            grown = True
            while grown:  # an axes with pixels in a cleared region is drawn again too
                grown = False
                for ax in fig.axes:
                    if ax not in now and any(overlap(boxes[ax], a) for a in area):
                        now[ax] = boxes[ax]  # unchanged: covers what it covered
                        area.append(boxes[ax])
                        grown = True
            if len(now) == len(fig.axes):
                return False
            pixels = np.asarray(renderer.buffer_rgba())
            for a in area:
                if a is not None:
                    r0, r1, c0, c1 = a
                    pixels[r0:r1, c0:c1] = background[r0:r1, c0:c1]
            for ax in sorted(now, key=lambda ax: (ax.get_zorder(), fig.axes.index(ax))):
                if ax.get_visible():
                    ax.draw(renderer)
                ax.stale = False
            boxes.update(now)
            fig.stale = False
            DrawEvent("draw_event", self, renderer)._process()
            self._drawn = (renderer, boxes, background, self._draws)
            return True

        # ------------------------------------------------------------ frames
        def _png(self, rgba) -> bytes:
            if self.fast_png:
                return encode_png(rgba)
            with BytesIO() as buffer:
                Image.fromarray(rgba).save(buffer, format="png",
                                           compress_level=self.png_compress_level)
                return buffer.getvalue()

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
            return self._png(out.view(np.uint8).reshape(*out.shape, 4))

        def send_binary(self, data):
            if not (getattr(self, "syncing_data_url", False) and hasattr(self, "_last_buff")):
                return super().send_binary(data)
            frame = self._last_buff.view(np.uint8).reshape(*self._last_buff.shape, 4)
            self._data_url = "data:image/png;base64," + b64encode(self._png(frame)).decode()
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


#: returned by a binding's converter: leave the control (or the traitlet) as it is
KEEP = object()


class WidgetBase(widgets.VBox):
    """Base container: an error box, a status line, controls bound to traitlets, background
    work and ``save(path)``.

    Subclasses set ``self.figure`` (the figure ``save`` writes), link each control to its
    traitlet with :meth:`bind`, run slow work with :meth:`submit` (``task`` is the widget's
    background :class:`~.tasks.Task`) and wrap other callbacks with :meth:`guarded`, so that an
    exception shows inside the widget instead of vanishing into the JupyterLab log.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.errors = ErrorBox()
        self.status = widgets.HTML(value="", layout=widgets.Layout(min_height="1.5em"))
        self.figure: Figure | None = None
        self.task = Task(self)
        self._lock = threading.Lock()
        self._loop = _running_loop()
        self._queue = collections.deque()
        self._bindings: dict = {}
        self._showing = False  # a binding is moving a control to its traitlet's value
        self._refusal: BaseException | None = None  # the last value a binding refused

    # ----------------------------------------------------------------- controls ↔ traitlets
    def bind(self, control: widgets.Widget, name: str, *, to_trait: Callable | None = None,
             to_control: Callable | None = None) -> None:
        """Link ``control.value`` and the traitlet ``name``, both ways.

        A new control value is set on the traitlet (through ``to_trait``). A value the widget
        refuses — its validator or one of its observers raises — puts the control back on the
        traitlet's value and shows the error in the widget; the next accepted value clears it.
        A traitlet set from code moves the control (through ``to_control``), without echo. A
        converter returns :data:`KEEP` to leave the other side as it is; a value the control
        cannot hold (not among a menu's options) leaves the control as it is too.
        """

        def show(value):
            shown = value if to_control is None else to_control(value)
            if shown is KEEP or control.value == shown:
                return
            with self.quietly():
                try:
                    control.value = shown
                except traitlets.TraitError:
                    pass  # not among the control's options: it keeps what it shows

        def from_control(change):
            if self._showing:
                return
            try:
                value = change["new"] if to_trait is None else to_trait(change["new"])
                if value is KEEP:
                    return
                setattr(self, name, value)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                show(getattr(self, name))
                self._refusal = exc
                self.errors.show(exc)
                return
            show(getattr(self, name))  # the value as the traitlet took it
            if self._refusal is not None and self.errors.last_error is self._refusal:
                self.errors.clear()

        def from_trait(change):
            show(change["new"])

        self.unbind(control)
        control.observe(from_control, "value")
        self.observe(from_trait, name)
        self._bindings[control] = (from_control, from_trait, name)
        show(getattr(self, name))

    def unbind(self, control: widgets.Widget) -> None:
        """Undo :meth:`bind` (for controls that are replaced, such as a method's parameters)."""
        if control in self._bindings:
            from_control, from_trait, name = self._bindings.pop(control)
            control.unobserve(from_control, "value")
            self.unobserve(from_trait, name)

    def resync(self, name: str) -> None:
        """Show the traitlet ``name`` again in its controls (after what their converters read
        has changed, such as the layers a slider steps through)."""
        for _, from_trait, bound in list(self._bindings.values()):
            if bound == name:
                from_trait({"new": getattr(self, name)})

    @contextlib.contextmanager
    def quietly(self):
        """Change controls (their options, their range) without the change reaching the
        traitlets they are bound to."""
        before, self._showing = self._showing, True
        try:
            yield
        finally:
            self._showing = before

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
    def guarded(self, fn: Callable, *, clear: bool = True) -> Callable:
        """Wrap a callback: exceptions are shown in the widget's error box, not raised.
        ``clear``: a call that succeeds clears the box (False where the callback starts work
        whose own error, shown in the foreground, must stay)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                self.errors.show(exc)
                return None
            if clear:
                self.errors.clear()
            return result

        return wrapper

    # ----------------------------------------------------------------- background work
    def submit(self, work: Callable, done: Callable, *, background: bool = True,
               failed: Callable | None = None) -> int:
        """Run ``work(cancel)`` (in a thread when ``background``), then ``done(result)`` on the
        kernel's main thread; see :meth:`.tasks.Task.start`. A newer submission cancels this
        one and drops its result; it runs once this one has ended, unless a still newer one
        replaces it first. Returns the generation number."""
        if self._loop is None:
            self._loop = _running_loop()
        return self.task.start(work, done, background=background, failed=failed)

    def cancel_background(self) -> None:
        """Ask the running background work to stop at its next check, and drop the work
        waiting for it (the interpreter's exit calls it before waiting for the widget's
        threads)."""
        self.task.cancel(drop_queued=True)

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until the latest background task has finished and its result is shown
        (for scripts, tests and notebook cells that read the result right away)."""
        self.task.wait(timeout)
        if threading.current_thread() is threading.main_thread():
            self._drain()

    # ----------------------------------------------------------------- output
    def save(self, path, dpi: int | None = None) -> None:
        """Write the widget's current figure to ``path`` (PNG unless the suffix says otherwise)."""
        if self.figure is None:
            raise RuntimeError("this widget has no figure to save yet")
        self.figure.savefig(path, dpi=dpi or self.figure.dpi)
