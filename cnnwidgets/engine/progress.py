"""``cancel=`` and ``progress=`` of the long computations (``cw.visualize``, ``cw.invert``,
``cw.dissect``), with the meaning ``cw.attribute`` gives them:

* ``cancel``: ``None``, a ``threading.Event`` or a callable returning True to stop; a set
  event stops the run at its next check with :class:`Cancelled` (the class ``cw.attribute``
  raises), the model left exactly as it was.
* ``progress``: ``None`` shows a tqdm bar once the run has lasted :data:`PROGRESS_DELAY`
  seconds (quick runs print nothing), ``True`` / ``False`` always / never show one, and a
  callable ``f(done, total)`` is called after each unit of work instead of a bar.

:class:`Progress` checks both arguments once, at the start, with an error that says what they
accept, so a wrong value fails at once rather than at the first check.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from .checks import check_progress

__all__ = ["Cancelled", "PROGRESS_DELAY", "Progress", "check_cancel", "check_progress",
           "is_cancelled"]


#: seconds a run lasts before its automatic progress bar shows
PROGRESS_DELAY = 1.0


class Cancelled(RuntimeError):
    """Raised when a computation is stopped through its ``cancel`` event or callable."""


def check_cancel(cancel) -> Any:
    """``cancel`` if it is ``None``, an object with ``is_set()`` (``threading.Event``) or a
    callable; a ``TypeError`` that says what it accepts otherwise."""
    if cancel is None or callable(getattr(cancel, "is_set", None)) or callable(cancel):
        return cancel
    raise TypeError(f"cancel must be a threading.Event or a callable returning True to stop, "
                    f"not {cancel!r} ({type(cancel).__name__}); e.g. stop = threading.Event(), "
                    "cancel=stop, then stop.set() from another thread")


def is_cancelled(cancel) -> bool:
    """Whether ``cancel`` (see :func:`check_cancel`) asks to stop now."""
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if callable(is_set) else cancel())


class Progress:
    """Cancellation checks and progress reports for one run of ``total`` units of work.

    >>> with Progress(steps, "visualize", cancel=cancel, progress=progress) as p:
    ...     for i in p.each(range(steps)):   # checks for cancellation before each item
    ...         step(i)
    ...         p.advance()                  # one unit done: the bar or f(done, total)

    ``what`` names the computation in :class:`Cancelled`'s message (default: ``desc``);
    ``show=False`` suppresses the bar (not the callable) — e.g. on every rank but the first.
    """

    def __init__(self, total: int, desc: str, *, cancel=None, progress=None,
                 what: str | None = None, show: bool = True):
        self.cancel = check_cancel(cancel)
        progress = check_progress(progress)
        self.total = total
        self.done = 0
        self.what = what or desc
        self.callback: Callable | None = progress if callable(progress) else None
        self.bar = None
        if show and self.callback is None and progress is not False:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, leave=False, mininterval=0.5,
                            delay=0.0 if progress is True else PROGRESS_DELAY)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the run was asked to stop."""
        if is_cancelled(self.cancel):
            raise Cancelled(f"{self.what} was cancelled")

    def each(self, items: Iterable) -> Iterator:
        """The items, checking for cancellation before each one is made (before a generator
        runs its next step) and once after the last."""
        it = iter(items)
        while True:
            self.check()
            try:
                item = next(it)
            except StopIteration:
                return
            yield item

    def advance(self, n: int = 1) -> None:
        """``n`` more units done: update the bar, or call ``progress(done, total)``."""
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(int(n))
        if self.callback is not None:
            self.callback(self.done, self.total)

    def describe(self, desc: str) -> None:
        """Change the bar's label (a new phase of the run)."""
        if self.bar is not None:
            self.bar.set_description_str(desc, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
