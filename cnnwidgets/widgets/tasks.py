"""Background work of the widgets: one :class:`Task` per widget serves every explorer's
computations and the live optimisation runs.

A task runs ``work(cancel)`` in a thread, then ``done(result)`` on the kernel's main thread. A
new start supersedes the running work: its ``cancel`` event is set (work that checks it stops at
its next check) and its result, arriving later, is dropped. The new work waits for the old one
to end, and only the newest waiting work ever runs: however many starts come, a widget runs one
computation, with one more waiting. The interpreter's exit asks every task still running to
stop, drops what waits, and waits for the threads.
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

    The work is bounded, however fast the starts come: at most one work runs, in the task's
    one worker thread, and at most one waits — the newest. A start while work runs sets the
    running work's ``cancel`` (it stops at its next check) and queues itself in place of any
    work still waiting, which then never runs; the worker takes the waiting work when the
    running one ends. Sixty quick changes of a selection thus run the first and the last.
    """

    def __init__(self, owner):
        self.owner = owner
        self.generation = 0
        self.cancel_event = threading.Event()  #: the newest start's cancel event
        self.thread: threading.Thread | None = None  #: the last worker thread started
        self._lock = threading.Lock()
        self._busy = False  # a worker thread is running works (set and cleared under the lock)
        self._queued: Callable | None = None  # the newest start, waiting for the running work

    @property
    def running(self) -> bool:
        """Whether background work is running or waiting."""
        return self._busy

    @property
    def queued(self) -> bool:
        """Whether a start is waiting for the running work to end."""
        return self._queued is not None

    def start(self, work: Callable, done: Callable, *, background: bool = True,
              failed: Callable | None = None) -> int:
        """Supersede the running work with ``work(cancel)``; returns the generation number.

        In the background, ``work`` runs at once when nothing runs, else after the running
        work (cancelled now) has ended — unless a newer start replaces it first. With
        ``background=False`` it runs in the calling thread, after the running work has ended
        (any waiting work is dropped)."""
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

        if not background:
            with self._lock:
                self._queued = None
                worker = self.thread
            if worker is not None and worker is not threading.current_thread():
                worker.join()  # one computation at a time: the cancelled one ends first
            run()
            return generation
        with self._lock:
            if self._busy:
                self._queued = run  # replaces (drops) any start still waiting
                return generation
            self._busy = True
            previous = self.thread
        if previous is not None and previous is not threading.current_thread():
            previous.join()  # already past its last work: it is only ending
        with self._lock:
            self.thread = background_thread(owner, lambda: self._serve(run))
        return generation

    def _serve(self, job: Callable) -> None:
        """The worker thread: run ``job``, then whatever start is waiting, until none is."""
        try:
            while job is not None:
                try:
                    job()
                except Exception as exc:  # noqa: BLE001 - a failing callback: shown, go on
                    self.owner.on_main(self.owner.errors.show, exc)
                with self._lock:
                    job, self._queued = self._queued, None
                    if job is None:
                        self._busy = False
        finally:
            if job is not None:  # left by an exception that is not an Exception
                with self._lock:
                    self._queued, self._busy = None, False

    def supersede(self) -> int:
        """Cancel the running work and drop the waiting one, and drop their results, without
        starting any (the caller shows a result it already has). Returns the new generation."""
        with self._lock:
            self.cancel_event.set()
            self.cancel_event = threading.Event()
            self.generation += 1
            self._queued = None
            return self.generation

    def superseded(self, cancel) -> bool:
        """Whether the work given ``cancel`` has been superseded by a newer start."""
        return cancel is not self.cancel_event

    def cancel(self, *, drop_queued: bool = False) -> None:
        """Ask the newest work to stop at its next check of ``cancel`` (work still waiting
        runs with its ``cancel`` set, so that its ``done`` says it stopped). ``drop_queued``:
        the waiting work never runs (the interpreter's exit)."""
        with self._lock:
            self.cancel_event.set()
            if drop_queued:
                self._queued = None

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until the running and the waiting work have finished (their results may still
        wait for the main thread: ``WidgetBase.wait`` shows them)."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel the running work and wait for it to end."""
        self.cancel()
        self.wait(timeout)
