"""Background work of the widgets: one :class:`Task` per widget serves every explorer's
computations and the live optimisation runs.

A task runs ``work(cancel)`` in a thread, then ``done(result)`` on the kernel's main thread. A
new start supersedes the running work: its ``cancel`` event is set (work that checks it stops at
its next check) and its result, arriving later, is dropped. The interpreter's exit asks every
task still running to stop and waits for its thread.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable

#: background threads of the widgets still running, with their task (weakly)
_BACKGROUND: "dict[threading.Thread, weakref.ref]" = {}
_BACKGROUND_LOCK = threading.Lock()
EXIT_WAIT = 10.0  #: seconds the interpreter's exit waits for the widgets' background threads


def background_thread(owner, target: Callable) -> threading.Thread:
    """Start ``target`` in a daemon thread that the interpreter's exit stops and waits for.

    A daemon thread still inside PyTorch when the interpreter shuts down aborts the process
    ("terminate called without an active exception", exit status 134): a script that builds
    an explorer and ends while it computes, or a notebook kernel shut down mid-computation.
    At exit, each ``owner`` is asked to stop (its ``cancel_background()``) and its thread is
    waited for, up to :data:`EXIT_WAIT` seconds in all."""

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


class Task:
    """The background work of one widget (its ``owner``, a ``WidgetBase``).

    :meth:`start` runs ``work(cancel)`` — in a thread when ``background`` — and hands its result
    to ``done`` on the kernel's main thread (``owner.on_main``); an exception goes to the
    owner's error box instead, then to ``failed``. Each start gets a generation number: a result
    or error that arrives after a newer start is dropped, so an old selection never overwrites a
    newer one.
    """

    def __init__(self, owner):
        self.owner = owner
        self.generation = 0
        self.cancel_event = threading.Event()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether the latest background work is still running."""
        return self.thread is not None and self.thread.is_alive()

    def start(self, work: Callable, done: Callable, *, background: bool = True,
              failed: Callable | None = None) -> int:
        """Supersede the running work with ``work(cancel)``; returns the generation number."""
        with self._lock:
            self.cancel_event.set()  # the superseded work stops at its next check
            cancel = self.cancel_event = threading.Event()
            self.generation += 1
            generation = self.generation
        owner = self.owner

        def failure(exc):
            if generation == self.generation:
                owner.errors.show(exc)
                owner.status.value = ""
                if failed is not None:
                    failed(exc)

        def finish(result):
            if generation != self.generation:
                return
            try:
                done(result)
                owner.errors.clear()
            except Exception as exc:  # noqa: BLE001 - shown in the widget
                owner.errors.show(exc)

        def run():
            try:
                result = work(cancel)
            except Exception as exc:  # noqa: BLE001 - shown in the widget
                owner.on_main(failure, exc)
                return
            owner.on_main(finish, result)

        if background:
            self.thread = background_thread(owner, run)
        else:
            self.thread = None
            run()
        return generation

    def superseded(self, cancel) -> bool:
        """Whether the work given ``cancel`` has been superseded by a newer start."""
        return cancel is not self.cancel_event

    def cancel(self) -> None:
        """Ask the running work to stop at its next check of ``cancel``."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until the latest work has finished (its result may still wait for the main
        thread: ``WidgetBase.wait`` shows it)."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel the running work and wait for it to end."""
        self.cancel()
        self.wait(timeout)
