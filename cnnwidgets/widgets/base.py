"""What every cnnwidgets widget shares: ipympl canvases, shown errors, controls bound to
traitlets, background work (:mod:`.tasks`), save.

Widgets are thin: they observe traitlets, call the public engine API, hand arrays to
``cnnwidgets.render`` and place the canvases' views (``canvas.view``) in an ipywidgets
layout. No maths here.
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


def _canvas_class():
    """ipympl's canvas, made quicker from a change to new pixels in the browser.

    Three things ipympl does not do (each switchable per canvas, for the A/B run of
    ``benchmarks/latency.py``):

    * ``image_frames``: the figure's frames are shown by an ``ipywidgets.Image`` (``frame_image``)
      laid under the ipympl canvas (``view`` holds both, one over the other: widgets place
      ``canvas.view``), and ipympl's own canvas is sent transparent frames only (when its front
      end asks). ipympl stays the layer that takes the clicks, drags and keys. ipympl's front end
      encodes its whole canvas as a data URL on every frame it receives (~15 ms at 880×368,
      before it decodes the new one) and asks for each frame itself; an image widget's front end
      only decodes the PNG. The PNG is of the whole figure (no diff against the last frame) —
      frames kept by state (below) are kept as those PNG bytes, and put back without encoding.

    * ``push_frames``: a ``draw_idle`` renders the figure on the event loop of the thread that
      changed it and sends the frame at once, instead of asking the front end to ask for it (a
      round trip through the browser per change). Through ipympl's canvas (``image_frames``
      off) only once its front end is there and has asked for a frame since it (re)started (its
      own handshake — refresh, image mode, initialised, resize — left to ipympl); an image
      widget has no handshake: its value is state, shown whenever a view appears. Where the
      thread runs no event loop (scripts, tests) nothing is rendered until a front end asks.
    * ``frame_key`` (set by a widget whose figure is a function of a few traitlets): a callable
      returning that state (None: one it cannot name); the last ``frames`` frames drawn are
      kept by it, and a state drawn before (the layer switched back to) gets its pixels back
      instead of being drawn again. Frames the front end asks for are shown, not kept: it may
      ask from another thread, halfway through a change.

    Frames are PNGs at zlib level 1: matplotlib's level 6 takes ~2.5× longer for ~10% fewer
    bytes, the wrong trade for a local kernel.

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

    class FastCanvas(Canvas):
        png_compress_level = 1
        push_frames = True
        frame_key = None  # a callable: the state the figure is drawn from (or None)
        frames = 16  # frames kept by state when there is a frame_key
        frame_image = None  # the ipywidgets.Image showing the frames (set by make_figure)
        view = None  # what a widget places on the page: the image and the canvas over it
        _rendering = 0  # renders going on (any thread)
        _draw_again = False  # a draw_idle came during one of them
        _render_lock = threading.Lock()
        _push_pending = False
        _front_ready = False  # a front end is there and has asked for a frame since it started
        _image_frames = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._frame_lock = threading.RLock()  # one render at a time (main or subshell)
            self._kept_frames: dict = {}  # state → pixels (PNG bytes with image frames)
            self._clear = {}  # (height, width) → a transparent PNG

        @property
        def image_frames(self) -> bool:
            return self._image_frames and self.frame_image is not None

        @image_frames.setter
        def image_frames(self, on: bool) -> None:
            self._image_frames = bool(on)
            self._kept_frames.clear()  # pixels or PNGs: what is kept depends on the way
            self._force_full = True
            if self.frame_image is not None:
                self.frame_image.layout.display = None if on else "none"
                self.figure.stale = True
                self.draw_idle()

        def _repr_mimebundle_(self, **kwargs):
            # the canvas shown on its own (``display(canvas)``) would show nothing but its
            # transparent frames: what is shown is its view, the image under it
            if self.image_frames and self.view is not None:
                return self.view._repr_mimebundle_(**kwargs)
            return super()._repr_mimebundle_(**kwargs)

        # ------------------------------------------------------------ rendering
        def draw(self):
            self._render(keep=True)

        def handle_draw(self, event):
            self._render(keep=False)  # asked by the front end: shown, not kept
            # the front end has asked for a frame since it (re)started: its own handshake
            # (refresh, image mode, initialised, resize) is over, frames may be pushed now
            self._front_ready = not self.syncing_data_url

        def _handle_message(self, object, content, buffers):
            if content.get("type") in ("refresh", "initialized"):  # a view (re)starting
                self._front_ready = False
            super()._handle_message(object, content, buffers)

        def _render(self, keep: bool):
            with self._render_lock:
                self._rendering += 1
            try:
                with self._frame_lock:
                    if self.image_frames:
                        self._render_image(keep)
                    else:
                        self._render_canvas(keep)
            finally:
                with self._render_lock:
                    self._rendering -= 1
                    again = self._draw_again and not self._rendering
                    if again:
                        self._draw_again = False
                if again:  # after the frame: the front end, no longer waiting, asks anew
                    if not (self.image_frames and self.push_frames and self._push()):
                        super().draw_idle()

        def _render_canvas(self, keep: bool):
            self._png_is_old = True
            key = self._state()
            back = False
            try:
                back = self._frame_back(key)
                if not back:
                    FigureCanvasAgg.draw(self)
            finally:
                self.manager.refresh_all()  # sends the frame
            if keep and key is not None and not back:
                self._keep_frame(key, np.asarray(self.get_renderer().buffer_rgba()).copy())

        def _render_image(self, keep: bool):
            """The frame to the image widget; ipympl's canvas, when its front end asks
            (``keep`` False), gets a transparent one (it only takes the clicks)."""
            image = self.frame_image
            if keep or self.figure.stale or not image.value:
                key = self._state()
                if self._frame_back(key):
                    png = self._kept_frames[key]
                else:
                    FigureCanvasAgg.draw(self)
                    png = self._png(np.asarray(self.get_renderer().buffer_rgba())[:, :, :3])
                    if keep and key is not None:
                        self._keep_frame(key, png)
                self._show_image(png)
            if not keep:
                self._png_is_old = True
                self.manager.refresh_all()  # the transparent frame (``get_diff_image``)

        def _show_image(self, png: bytes) -> None:
            image, fig = self.frame_image, self.figure
            dpi = getattr(fig, "_original_dpi", fig.dpi)  # CSS pixels, whatever the screen's ratio
            width, height = (f"{round(v * dpi)}px" for v in fig.get_size_inches())
            if (image.layout.width, image.layout.height) != (width, height):
                image.layout.width, image.layout.height = width, height
            image.value = png

        def draw_idle(self):
            with self._render_lock:
                if self._rendering:
                    self._draw_again = True
            if (self.push_frames and (self.image_frames or self._front_ready)
                    and self._push()):
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
            if state is None:
                return None
            renderer = self.get_renderer()
            return (int(renderer.width), int(renderer.height), state)

        def _frame_back(self, key) -> bool:
            """Put back the frame kept for ``key``; False where there is none."""
            frame = self._kept_frames.pop(key, None) if key is not None else None
            if frame is None:
                return False
            self._kept_frames[key] = frame  # the most recent now (kept without a copy)
            renderer = self.get_renderer()
            if not self.image_frames:  # pixels (a PNG is shown as it is)
                np.copyto(np.asarray(renderer.buffer_rgba()), frame)
            self.figure.stale = False
            DrawEvent("draw_event", self, renderer)._process()
            return True

        def _keep_frame(self, key, frame) -> None:
            self._kept_frames.pop(key, None)
            self._kept_frames[key] = frame
            while len(self._kept_frames) > self.frames:
                self._kept_frames.pop(next(iter(self._kept_frames)))

        # ------------------------------------------------------------ frames
        def _png(self, pixels) -> bytes:
            with BytesIO() as buffer:
                Image.fromarray(pixels).save(buffer, format="png",
                                             compress_level=self.png_compress_level)
                return buffer.getvalue()

        def get_diff_image(self):
            needed = ("_png_is_old", "_force_full", "_last_buff", "set_image_mode")
            if not all(hasattr(self, a) for a in needed):  # a matplotlib we do not know
                return super().get_diff_image()
            if not self._png_is_old:
                return None
            renderer = self.get_renderer()
            shape = (int(renderer.height), int(renderer.width))
            if self.image_frames:  # the canvas over the image: transparent
                self.set_image_mode("full")
                self._last_buff = np.zeros(shape, np.uint32)
                self._force_full = True  # the next frame through the canvas: whole
                self._png_is_old = False
                if shape not in self._clear:
                    self._clear = {shape: self._png(np.zeros((*shape, 4), np.uint8))}
                return self._clear[shape]
            pixels = np.asarray(renderer.buffer_rgba())
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

    Place ``canvas.view`` in a layout (not the canvas alone, which shows transparent frames
    only): the frames are shown by an image under the canvas (see ``image_frames`` in
    :func:`_canvas_class`). ``display(canvas)`` shows the view.
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
    # the frames are shown by an image under the canvas (``image_frames``); the canvas over it
    # takes the clicks. The image sits where ipympl draws: 4 px in (its canvas div's margin
    # and the figure box's), checked in every front end by the browser tests
    canvas.layout.grid_area = "frame"
    canvas.frame_image = widgets.Image(format="png", layout=widgets.Layout(
        grid_area="frame", margin="4px", max_width="none", width=f"{width * dpi:.0f}px",
        height=f"{height * dpi:.0f}px"))
    canvas.frame_image.add_class("cw-frame")
    canvas.view = widgets.GridBox([canvas.frame_image, canvas], layout=widgets.Layout(
        grid_template_areas='"frame"', grid_template_columns="max-content",
        align_items="flex-start"))
    canvas.view.add_class("cw-figure")
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
