"""Hook capture: the one way every method reads a layer's input, output and gradient.

``capture(module, layers, ...)`` is a context manager that registers forward hooks (and, when
gradients are wanted, tensor hooks on the captured outputs) and removes every one of them in
``finally`` — after success and after an exception alike. ``restored(module)`` puts the module
back as it was: its training flags and each parameter's ``requires_grad``.

Full backward hooks are never used: they break on in-place ReLU.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .guard import guard
from .progress import Cancelled, is_cancelled


@dataclass
class Captured:
    """What one ``capture`` saw during the forward (and backward) passes inside it."""

    #: layer name → the layer's output (detached clone unless ``keep_graph``)
    outputs: dict = field(default_factory=dict)
    #: layer name → the layer's first positional input (detached clone), when asked for
    inputs: dict = field(default_factory=dict)
    #: layer name → gradient of the backward pass w.r.t. the layer's output, when asked for
    grads: dict = field(default_factory=dict)


def resolve(module: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``named_modules``), with a helpful error."""
    modules = dict(module.named_modules())
    if name in modules and name != "":
        return modules[name]
    raise layer_not_found(name, [n for n in modules if n])


class LayerNotFoundError(ValueError):
    """A layer name that the model does not have."""


def layer_not_found(name, names: Iterable[str]) -> LayerNotFoundError:
    import difflib

    names = list(names)
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    if not close:  # fall back to names that share the last part (e.g. "conv2")
        tail = str(name).split(".")[-1]
        close = [n for n in names if n.split(".")[-1] == tail][:5]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return LayerNotFoundError(
        f"the model has no layer {name!r}{hint} (model.layers() lists every layer name)"
    )


def this_thread(hook: Callable) -> Callable:
    """``hook`` bound to the calling thread: it does nothing (returns ``None``) when a forward
    pass on another thread runs the module.

    Module hooks are process-wide, and the widgets compute in background threads, on the same
    model, at the same time (a notebook of several explorers; Voila runs every cell before the
    page shows). Without this, a Grad-CAM tap would catch another thread's no-grad activation,
    and an ablation's replacement would change another method's forward pass.
    """
    owner = threading.get_ident()

    def bound(*args):
        if threading.get_ident() != owner:
            return None
        return hook(*args)

    bound.cw_thread = owner  # read by hooked(): this hook is silent on every other thread
    return bound


#: the hook tables of a module (forward, forward-pre, backward, backward-pre)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooked(module: nn.Module) -> bool:
    """Whether a hook that fires on this thread's passes is registered on ``module``, on any
    module inside it, or for every module (``torch.nn.modules.module.register_module_forward_hook``
    and its kin): any hook but those :func:`this_thread` bound to another thread. Such hooks
    are part of the network: nothing may run in place of a module that carries one (the fast
    paths of :mod:`.fast` then run the module itself)."""
    me = threading.get_ident()

    def fires(hooks) -> bool:
        return any(getattr(h, "cw_thread", me) == me and not getattr(h, "cw_inert", False)
                   for h in hooks.values())

    every = torch.nn.modules.module
    if any(fires(d) for d in (every._global_forward_hooks, every._global_forward_pre_hooks,
                              every._global_backward_hooks, every._global_backward_pre_hooks)):
        return True
    return any(fires(d) for m in module.modules() for d in
               (getattr(m, name, None) for name in HOOK_DICTS) if d)


# --------------------------------------------------------------------------- cancel points
_running = threading.local()  # .cancel: (cancel, what) of this thread's cancellable run
_install = threading.Lock()
_installed = False


def _stop_if_asked(cancel, what: str) -> None:
    if is_cancelled(cancel):
        raise Cancelled(f"{what} was cancelled")


def _cancel_point(module, args, output):
    """A process-wide forward hook: in a thread inside :func:`cancel_points`, stop when asked
    after each module's forward, and (by a tensor hook) before its backward."""
    run = getattr(_running, "cancel", None)
    if run is None:
        return None
    _stop_if_asked(*run)
    out = _first_tensor(output)
    if out is not None and out.requires_grad and torch.is_grad_enabled():
        out.register_hook(lambda grad: _stop_if_asked(*run))
    return None


_cancel_point.cw_inert = True  # changes no value: fast paths may run in its place (hooked())


@contextlib.contextmanager
def cancel_points(cancel, what: str):
    """Inside, this thread's forward and backward passes stop with :class:`Cancelled` within
    one module's work once ``cancel`` is set, however large the batch: a stop answers in
    milliseconds, not after a whole pass (SmoothGrad's 128 noisy copies in one batch take
    seconds on two cores). Nothing is registered without a ``cancel``.

    One process-wide hook (``register_module_forward_hook``), installed at the first
    cancellable run and never removed (removing it while another thread iterates the hook
    table would break that thread's pass); it reads this thread's run from a thread-local, so
    other threads' passes, and passes outside a cancellable run, only pay a lookup.
    """
    global _installed
    if cancel is None:
        yield
        return
    if not _installed:
        with _install:
            if not _installed:
                torch.nn.modules.module.register_module_forward_hook(_cancel_point)
                _installed = True
    outer = getattr(_running, "cancel", None)
    _running.cancel = (cancel, what)
    try:
        yield
    finally:
        _running.cancel = outer


def replacing(module: nn.Module) -> bool:
    """Whether a :func:`capture` that replaces layer outputs (``cw.ablate``) is active on this
    thread on ``module`` or a module inside it: the network then computes another function
    than its weights say, and results cached by weights (the activation cache) must not be
    read or written."""
    me = threading.get_ident()
    return any(getattr(h, "cw_replaces", False) and getattr(h, "cw_thread", None) == me
               for m in module.modules() for h in m._forward_hooks.values())


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


@contextlib.contextmanager
def capture(
    module: nn.Module,
    layers: Iterable[str],
    *,
    inputs: bool = False,
    grads: bool = False,
    keep_graph: bool = False,
    replace: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    store: bool = True,
):
    """Record the named layers' outputs (and optionally inputs and output gradients).

    ``keep_graph=True`` stores the outputs attached to the autograd graph (for methods that
    differentiate with respect to them); otherwise a detached clone is stored, safe from later
    in-place operations. ``replace(name, output)`` may return a tensor that replaces the
    layer's output in the forward pass (for ablation and masking methods). ``store=False``
    records no outputs (a replacement that lasts many passes: ``cw.ablate``).
    """
    record = Captured()
    handles = []
    names = list(dict.fromkeys(layers))
    try:
        for name in names:
            layer = resolve(module, name)

            def hook(mod, args, output, name=name):
                out = _first_tensor(output)
                if inputs:
                    x = _first_tensor(args)
                    if x is not None:
                        record.inputs[name] = x.detach().clone()
                if replace is not None and out is not None:
                    new = replace(name, out)
                    if new is not None:
                        output = new if isinstance(output, torch.Tensor) else output
                        out = new
                if out is not None and store:
                    record.outputs[name] = out if keep_graph else out.detach().clone()
                    if grads and out.requires_grad:

                        def save_grad(g, name=name):
                            record.grads[name] = g.detach().clone()

                        handles.append(out.register_hook(save_grad))
                if replace is not None:
                    return output
                return None

            bound = this_thread(hook)
            bound.cw_replaces = replace is not None  # read by replacing()
            handles.append(layer.register_forward_hook(bound))
        yield record
    finally:
        for h in handles:
            h.remove()


def restored(module: nn.Module, *, eval_mode: bool = True, frozen: bool = False):
    """Run the body with ``module`` in eval mode, then restore training flags and
    ``requires_grad`` exactly as they were, whatever happens inside. ``frozen=True`` turns
    every parameter's ``requires_grad`` off inside (gradients then reach the input only).

    Safe across threads and nesting (a widget computing in the background while the notebook
    calls ``predict``): the first block to enter saves the state, and the last one to leave
    restores it, so one block can never restore the other's temporary eval mode for good
    (:meth:`ModelGuard.restored <cnnwidgets.engine.guard.ModelGuard.restored>`).
    """
    return guard(module).restored(eval_mode=eval_mode, frozen=frozen)


def hook_count(module: nn.Module) -> int:
    """Number of forward / backward / pre-hooks registered on ``module`` and its children
    (for tests that check nothing was left behind)."""
    return sum(len(getattr(m, attr, None) or {}) for m in module.modules() for attr in HOOK_DICTS)
