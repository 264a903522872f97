"""One object per network that keeps the threads using it apart: ``guard(module)``.

The widgets compute in background threads on the very model the notebook calls (several
explorers at once; Voila runs every cell before the page shows), so forward passes, state
restoration, optimisation steps and ``torch.fx`` tracing of one network meet across threads.
:class:`ModelGuard` is where they are coordinated; :func:`~cnnwidgets.engine.hooks.restored`
and the tracers go through it.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

from torch import nn


class _Gate:
    """Forward passes share the models; a ``torch.fx`` trace needs them to itself.

    While fx traces it patches ``nn.Module.__call__`` for every thread, so a forward pass
    running at the same time in another thread (a widget computing in the background) would
    get fx Proxies instead of tensors. ``restored`` holds the gate shared; tracing holds it
    exclusively (waiting for other threads' passes to end, never for its own thread's).

    A waiting trace goes first: while one waits, other threads start no new pass (a thread
    already inside one may nest another). Without that, two explorers computing one pass after
    another in background threads can always leave one pass running, and a trace (a
    FixationExplorer's first backtrack) waits out its whole timeout behind them.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._depth = 0
        self._waiting: dict[int, int] = {}  # threads waiting to hold the gate exclusively

    def _may_share(self, me: int) -> bool:
        if self._writer not in (None, me):
            return False
        return me in self._readers or not any(t != me for t in self._waiting)

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            while not self._may_share(me):
                self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 120.0):
        me = threading.get_ident()
        with self._cond:
            self._waiting[me] = self._waiting.get(me, 0) + 1
            try:
                ok = self._cond.wait_for(
                    lambda: self._writer in (None, me) and not any(t != me for t in self._readers),
                    timeout)
            finally:
                self._waiting[me] -= 1
                if not self._waiting[me]:
                    del self._waiting[me]
                self._cond.notify_all()  # passes held back by this wait may start
            if not ok:
                raise RuntimeError("another computation kept the model busy for over "
                                   f"{timeout:.0f} s; try again when it has finished")
            self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                self._cond.notify_all()


#: the process-wide gate between forward passes (shared) and fx tracing (exclusive)
GATE = _Gate()


def _snapshot(module: nn.Module) -> tuple[list, list]:
    """Every submodule's training flag and every parameter's ``requires_grad``, in one walk
    over the modules (walking a 300-module network costs ~1 ms)."""
    modules = list(module.modules())
    params = dict.fromkeys(p for m in modules for p in m._parameters.values() if p is not None)
    return [(m, m.training) for m in modules], [(p, p.requires_grad) for p in params]


def _put_back(saved: tuple[list, list]) -> None:
    """Restore a :func:`_snapshot`, setting only what changed: setting every flag costs ~10 ms
    on a 300-module net, which per-step callers (feature visualisation) pay at every step."""
    flags, grads = saved
    for m, flag in flags:
        if m.training != flag:
            m.training = flag
    for p, flag in grads:
        if p.requires_grad != flag:
            p.requires_grad_(flag)


class ModelGuard:
    """The locks and saved state of one network; get it with :func:`guard`.

    Which lock guards what:

    * :data:`GATE` (one for the whole process) keeps forward passes and ``torch.fx`` tracing
      apart: every :meth:`restored` block holds it shared, :meth:`tracing` exclusively. fx
      patches ``nn.Module.__call__`` for every thread *and every module* while it traces, so a
      trace must wait for the forward passes of all models, not only its own network's.
    * ``_lock`` (per network) guards the state :meth:`restored` saved — the training flags,
      each parameter's ``requires_grad`` — and the count of blocks open on it: the first block
      in saves it, the last one out puts it back.
    * ``optimisation`` (per network, re-entrant): optimisation steps (feature visualisation,
      inversion) run one at a time, each inside its own :meth:`restored` block (:meth:`optimising`).
    * ``twin_lock`` (per network) guards ``twin``, the network's twins of :mod:`.fast` (one per
      set of enabled tricks), and their building and refolding.
    * Hooks take no lock: each answers only the thread that registered it
      (:func:`~cnnwidgets.engine.hooks.this_thread`).

    The guard keeps only a weak reference to its network, so it lives as long as the network.
    """

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)
        self._lock = threading.Lock()
        self._open = 0  # restored() blocks open on the network
        self._saved: tuple[list, list] | None = None  # the state they will put back
        self.optimisation = threading.RLock()
        self.twin_lock = threading.Lock()
        self.twin = None  #: the twins of :mod:`.fast`, under ``twin_lock``

    @contextlib.contextmanager
    def restored(self, *, eval_mode: bool = True, frozen: bool = False):
        """A forward-pass block: the gate shared, the network in eval mode inside (and its
        parameters' ``requires_grad`` off when ``frozen``), and its training flags and
        ``requires_grad`` put back exactly as they were when the last open block leaves, so
        one thread can never restore another's temporary eval mode for good."""
        module = self._module()
        with GATE.shared():
            with self._lock:
                if self._saved is None:
                    self._saved = _snapshot(module)
                self._open += 1
                flags, grads = self._saved
                if eval_mode and any(m.training for m, _ in flags):
                    module.eval()
                if frozen:
                    for p, _ in grads:
                        if p.requires_grad:
                            p.requires_grad_(False)
            try:
                yield module
            finally:
                with self._lock:
                    self._open -= 1
                    if not self._open:
                        saved, self._saved = self._saved, None
                        _put_back(saved)

    @contextlib.contextmanager
    def optimising(self):
        """One optimisation step: :meth:`restored` under the ``optimisation`` lock, so a step
        of a background run and one from the notebook never interleave."""
        with self.optimisation, self.restored() as module:
            yield module

    def tracing(self, timeout: float = 120.0):
        """Hold off the forward passes of every model while fx traces this one (waiting at
        most ``timeout`` seconds for those already running; ``RuntimeError`` after)."""
        return GATE.exclusive(timeout)


_GUARDS: "weakref.WeakKeyDictionary[nn.Module, ModelGuard]" = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def guard(module: nn.Module) -> ModelGuard:
    """The one :class:`ModelGuard` of ``module`` (made on first use)."""
    with _GUARDS_LOCK:
        found = _GUARDS.get(module)
        if found is None:
            found = _GUARDS[module] = ModelGuard(module)
        return found
