"""``cw.attribute`` and the shared machinery every method uses.

A method is a function ``fn(ctx, **params)`` registered in :mod:`.registry`. It receives a
:class:`Context` — the prepared input, the resolved target and layer, and a few primitives
that run the model (scores, input gradients and their sums, layers and their gradients, masked
scores, batches with progress, cancellation and memory fitting) — and returns
its raw output (optionally with the 2-D map to show). :func:`attribute` does everything else:
validation, target and layer resolution, putting the model back as it was, upsampling and
normalising the map.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import fast
from ..checks import check_progress
from ..hooks import cancel_points, layer_not_found, resolve, restored, this_thread
from ..memory import fit_batch
from ..model import Model, as_model, check_dtype
from ..progress import PROGRESS_DELAY, Cancelled, check_cancel, is_cancelled
from .registry import get_method
from ..relu_rules import relu_rule
from .. import targets as targets_



@dataclass
class Attribution:
    """The result of :func:`attribute`."""

    #: float32 H×W at the model's input resolution, aligned with ``model.prepare(image)[1]``:
    #: the method's heat, scaled but never clipped (its order is the method's own order).
    #: Signed maps are divided by their largest magnitude (in [-1, 1]), unsigned pixel-level
    #: maps by their maximum (in [0, 1], zero kept), the others stretched min–max to [0, 1].
    #: How it is shown (percentile clipping of pixel-level maps, colour limits) is the render
    #: layer's choice: :mod:`cnnwidgets.render.attribution`.
    map: np.ndarray
    #: the method's own output before any reduction, upsampling or normalisation
    #: (3×H×W for gradient and occlusion methods, the h×w layer map for CAM methods, H×W for RISE)
    raw: np.ndarray
    method: str  #: registered method name
    #: what was explained: the class index for one class of a classifier (as before); else the
    #: target as it can be passed again (a list of classes, a ``cw.targets.Region`` with its
    #: mask, a ``cw.targets.Box``, the callable)
    target: Any
    layer: str | None  #: layer read by a CAM method (``"name:input"`` = that module's input)
    params: dict = field(default_factory=dict)  #: every parameter value used, defaults included
    label: str = ""  #: the target's class label (or name, for other targets)
    image: np.ndarray | None = None  #: the display image H×W×3 in [0, 1] the map aligns with
    signed: bool = False  #: whether ``map`` has a sign
    fine: bool = False  #: whether ``map`` is pixel-level (reduced from an input-shaped raw)
    score: float | None = None  #: the target's score (a logit) for the unperturbed input
    seconds: float = 0.0  #: wall-clock time of the computation

    def plot(self, ax=None, *, alpha: float = 0.5, cmap: str | None = None, title: bool = True):
        """Draw the map over the image on ``ax`` (a new figure when ``None``); returns the artists."""
        from ...render.attribution import plot_attribution  # matplotlib only when plotting

        return plot_attribution(self.map, self.image, ax=ax, alpha=alpha, cmap=cmap,
                                signed=self.signed, fine=self.fine,
                                title=self.title() if title else None)

    def title(self) -> str:
        where = f" @ {self.layer}" if self.layer else ""
        return f"{self.method}{where}\n{self.label}"

    def __repr__(self) -> str:
        return (f"Attribution(method={self.method!r}, target={self.target} ({self.label!r}), "
                f"layer={self.layer!r}, map={self.map.shape}, raw={self.raw.shape})")


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    """What a method gets: the input, target and layer, and the primitives it computes with.

    * :meth:`logits` / :meth:`score`: the model's output / the target's score of a batch
      (``target.score(output)`` reads it off an output: :mod:`..targets`);
    * :meth:`input_grad`: the gradient of the score at the input (optionally with a ReLU rule);
    * :meth:`input_grad_sum`: the (weighted) sum of input gradients over many inputs;
    * :meth:`layer_value`, :meth:`layer_and_grad`, :meth:`tap`: a layer's activations, their
      gradients, and a layer replaced;
    * :meth:`masked_scores`: the scores of the input masked by upsampled maps (Score-CAM);
    * :meth:`layer_scores`: the scores with the layer's value replaced (Ablation-CAM);
    * :meth:`occluded_scores`: the scores of the input with boxes occluded (occlusion);
    * :meth:`batches`: index ranges with progress, memory fitting and cancellation.

    How they run fast is not the method's concern (:mod:`..fast`)."""

    model: Model  #: the wrapped model
    x: torch.Tensor  #: 1×3×H×W prepared input on the model's device (no grad)
    #: the resolved target (:class:`..targets.Resolved`; an int or label given here is
    #: resolved); ``target.score(output)`` is its score per image, and for one class of a
    #: classifier it indexes like the class index (``logits[:, ctx.target]``)
    target: Any
    layer: str | None  #: resolved layer ("name" or "name:input") for layer methods
    method: str = ""  #: method name (for progress bars and errors)
    cancel: Any = None  #: ``threading.Event`` or callable returning True to stop
    progress: Any = None  #: True / False / None (auto) / callable(done, total)
    base_score: float | None = None  #: the target logit of ``x``, once computed
    memo: dict = field(default_factory=dict, repr=False)  #: what the primitives keep for ``x``

    def __post_init__(self):
        self.target = targets_.resolve(self.model, self.target)

    # ----------------------------------------------------------- running the model
    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if the run was asked to stop."""
        if is_cancelled(self.cancel):
            raise Cancelled(f"{self.method} was cancelled")

    def logits(self, batch: torch.Tensor):
        """The model's output for a prepared batch: class scores N×K, a dense map N×C×H×W…
        (graph kept when grad is enabled)."""
        return fast.logits(self.model, batch)

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        """The target's score for each image of the batch (N,)."""
        return self.target.score(self.logits(batch))

    def input_grad(self, batch: torch.Tensor, rule: str | None = None):
        """``(∂score/∂batch, score)`` for a batch in one forward and one backward pass,
        optionally with a ReLU backward rule (``"guided"``, ``"deconvnet"``)."""
        xb = batch.detach().requires_grad_(True)
        with torch.enable_grad(), (relu_rule(rule) if rule else contextlib.nullcontext()):
            s = self.score(xb)
            self.check_cancel()  # a stop asked during the forward pass skips the backward
            (g,) = torch.autograd.grad(s.sum(), xb)
        return g.contiguous(), s.detach()

    def input_grad_sum(self, inputs: Callable[[int, int], torch.Tensor], total: int,
                       batch_size: int, weights: torch.Tensor | None = None,
                       desc: str | None = None) -> torch.Tensor:
        """``Σᵢ wᵢ ∂score/∂xᵢ`` (C×H×W) over ``total`` inputs ``xᵢ``: ``inputs(a, b)`` returns
        ``xₐ … x_b₋₁`` as a batch (called in order, in :meth:`batches` of ``batch_size``);
        ``weights`` (``total``,), every ``wᵢ = 1`` when ``None``."""
        parts = ((inputs(a, b), None if weights is None else weights[a:b])
                 for a, b in self.batches(total, batch_size, desc))
        return fast.input_grad_sum(self.model, self.target, parts, self.x,
                                   check=self.check_cancel)

    def masked_scores(self, maps: torch.Tensor, batch_size: int,
                      desc: str | None = None) -> torch.Tensor:
        """The target's score (n,) for the input times each map of ``maps`` (n×h×w)
        upsampled to the input (bilinear, corners aligned) and scaled to [0, 1]
        (``(v − min) / (max − min + 1e-8)``): Score-CAM's masked copies."""
        return fast.masked_scores(self.model, self.target, self.x, maps,
                                  self.batches(maps.shape[0], batch_size, desc))

    def layer_scores(self, values: torch.Tensor) -> torch.Tensor:
        """The target's score (n,) of the input with the layer's value replaced by each of
        ``values`` (n×C×h×w): Ablation-CAM's copies. What comes before the layer runs once
        where the network allows it (:func:`..fast.scores_from_layer`); otherwise the network
        runs with the layer's output broadcast from a batch of one, or on n copies."""
        n = values.shape[0]
        out = fast.scores_from_layer(self.model, self.layer, self.x, values)
        if out is None and not self.memo.get("no_broadcast"):
            try:
                with self.tap(replace=lambda t: values):
                    out = self.logits(self.x)
            except (RuntimeError, ValueError):  # it does not broadcast (x.view(1, -1), say)
                out = None
            if not isinstance(out, torch.Tensor) or out.shape[0] != n:
                self.memo["no_broadcast"] = True  # not tried again for the next copies
        if not isinstance(out, torch.Tensor) or out.shape[0] != n:
            with self.tap(replace=lambda t: values):
                out = self.logits(self.x.expand(n, *self.x.shape[1:]))
        return self.target.score(out)

    def occluded_scores(self, boxes, size, baseline: torch.Tensor,
                        threshold: float = 1.0) -> torch.Tensor:
        """The target's score (n,) for the input with each box ``(top, left)`` of ``boxes``
        (``size`` = (h, w), clipped at the edge) showing ``baseline`` (1×C×H×W) instead.
        ``threshold`` τ < 1: Krypton's projective-field approximation (:mod:`..incremental`)."""
        return fast.occluded_scores(self.model, self.target, self.x, boxes, size, baseline,
                                    threshold, self.memo)

    def batches(self, total: int, batch_size: int, desc: str | None = None) -> Iterator[tuple]:
        """``(start, stop)`` index pairs covering ``range(total)`` in equal chunks of at most
        ``batch_size`` (fewer where memory is short: :func:`..memory.fit_batch`), checking for
        cancellation before each chunk and showing progress when it is slow."""
        batch_size = max(1, int(batch_size))
        if self.x.device.type == "cpu" and batch_size > 1:
            # no more than half the memory left (a 2 GB Binder container, say): see ..memory
            batch_size = fit_batch(batch_size, self.model.image_bytes())
        n = math.ceil(total / batch_size)
        bar = None
        callback = self.progress if callable(self.progress) else None
        show = self.progress is True or (self.progress is None and n >= 2)
        if show and callback is None:
            from tqdm.auto import tqdm

            # automatic (progress=None): the bar shows only once the run has lasted
            # PROGRESS_DELAY seconds, so quick runs print nothing and slow ones always say so
            bar = tqdm(total=total, desc=desc or self.method, leave=False, mininterval=0.5,
                       delay=0.0 if self.progress is True else PROGRESS_DELAY)
        try:
            for i in range(n):
                self.check_cancel()
                # equal chunks (25 in batches of 16 → 13 + 12, not 16 + 9): the same number
                # of passes, and none of them a small, inefficient one
                start, stop = i * total // n, (i + 1) * total // n
                yield start, stop
                if bar is not None:
                    bar.update(stop - start)
                if callback is not None:
                    callback(stop, total)
            self.check_cancel()
        finally:
            if bar is not None:
                bar.close()

    # ----------------------------------------------------------- layers
    @contextlib.contextmanager
    def tap(self, layer: str | None = None, replace: Callable | None = None):
        """Context manager yielding a dict whose ``"value"`` is the layer's tensor (attached to
        the graph) after a forward pass; ``replace(t)`` may return a tensor used instead.
        The hook is removed in ``finally``."""
        with tap(self.model.module, layer or self.layer, replace=replace) as box:
            yield box

    def layer_and_grad(self, layer: str | None = None):
        """``(A, ∂score/∂A, score)`` for the layer: 1×C×h×w activations and their gradient,
        backpropagating no further than the layer."""
        x = self.x.detach().requires_grad_(True)  # parameters may not require grad
        with torch.enable_grad(), self.tap(layer) as box:
            s = self.score(x)
        a = box["value"]
        (g,) = torch.autograd.grad(s.sum(), a)
        return a.detach(), g.detach(), s.detach()

    def layer_value(self, layer: str | None = None):
        """``(A, output)``: the layer's activations 1×C×h×w and the model's output, no grad."""
        with torch.no_grad(), self.tap(layer) as box:
            logits = self.logits(self.x)
        return box["value"].detach(), logits


@contextlib.contextmanager
def tap(module: nn.Module, layer: str, replace: Callable | None = None):
    """Hook one layer's output (``"name"``) or input (``"name:input"``); see Context.tap."""
    name, _, part = layer.partition(":")
    target = resolve(module, name)
    box: dict = {}
    if part == "input":
        def pre_hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            t = args[0]
            if replace is not None:
                new = replace(t)
                if new is not None:
                    box["value"] = new
                    return (new, *args[1:])
            box["value"] = t
            return None

        handle = target.register_forward_pre_hook(this_thread(pre_hook))
    else:
        def hook(mod, args, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer {layer!r} does not output a tensor; pick another layer")
            if replace is not None:
                new = replace(output)
                if new is not None:
                    box["value"] = new
                    return new
            box["value"] = output
            return None

        handle = target.register_forward_hook(this_thread(hook))
    try:
        yield box
    finally:
        handle.remove()
    if "value" not in box:
        raise ValueError(f"layer {layer!r} did not run in the model's forward pass")


# --------------------------------------------------------------------------- layers
_DEFAULT_LAYER: "weakref.WeakKeyDictionary[Model, str]" = weakref.WeakKeyDictionary()


def default_layer(model: Model) -> str:
    """The layer CAM methods use when ``layer=None``: the last feature map as the classifier
    sees it. When the network ends in global pooling, that is the pooling module's input
    (named after the module that produces it when one does, e.g. ``"layer4"``; otherwise
    ``"<pool>:input"``, as in EfficientNet-Lite whose last ReLU6 module is shared);
    otherwise the last layer with a feature map."""
    if model in _DEFAULT_LAYER:
        return _DEFAULT_LAYER[model]
    info = model.layer_info()
    last = model.last_map_layer()
    pools = [n for n, i in info.items() if i.calls == 1 and len(i.shape) == 3
             and tuple(i.shape[1:]) == (1, 1) and "pool" in i.type.lower()]
    choice = last
    if pools:
        pool = pools[-1]
        seen: dict = {}
        handles = []
        try:
            handles.append(resolve(model.module, last).register_forward_hook(
                this_thread(lambda m, a, o: seen.__setitem__("last", o))))
            handles.append(resolve(model.module, pool).register_forward_pre_hook(
                this_thread(lambda m, a: seen.__setitem__("pool", a[0] if a else None))))
            x = torch.zeros(1, 3, *model.input_size, device=model.device,
                            dtype=check_dtype(model.module))
            with restored(model.module), torch.no_grad():
                model.run(x)
        finally:
            for h in handles:
                h.remove()
        if seen.get("pool") is not None and seen.get("pool") is not seen.get("last"):
            choice = f"{pool}:input"
    _DEFAULT_LAYER[model] = choice
    return choice


def check_map_layer(model: Model, layer: str) -> str:
    """Validate ``"name"`` or ``"name:input"`` for a method that reads a feature map; returns
    it. A layer whose output is not a C×h×w map (a classifier, a pooled vector) is refused with
    the feature-map layers it could be."""
    if not isinstance(layer, str):
        raise ValueError(f"layer must be a layer name (a string), not {type(layer).__name__}")
    name, sep, part = layer.partition(":")
    if sep and part != "input":
        raise ValueError(f"layer {layer!r}: the only suffix allowed is ':input' (the module's input)")
    if name not in model.layer_info():
        raise layer_not_found(name, model.layers("all"))
    info = model.check_layer(name)
    if not sep and len(info.shape) != 3:
        maps = model.layers("maps")
        raise ValueError(
            f"layer {name!r} ({info.type}) outputs a vector of shape {tuple(info.shape)}, not a "
            f"C×h×w feature map; pick a feature-map layer, e.g. {', '.join(maps[-4:])} "
            "(model.layers() lists them all)")
    return layer


def class_weights(ctx, channels: int) -> torch.Tensor:
    """CAM's weights (C,) for the context's target: the final linear layer's rows of its
    classes, summed; a clear error for a target that is not classes of a classifier."""
    classes = ctx.target.classes
    if classes is None:
        from .registry import methods

        others = [m for m in methods() if m != "cam"]
        raise ValueError(
            f"cam reads the final linear classifier's weights of a class, so it explains class "
            f"scores only, not the target {ctx.target.name!r}; methods that explain any target: "
            f"{', '.join(others)}")
    return classifier_weights(ctx.model, channels)[list(classes)].sum(0)


def classifier_weights(model: Model, channels: int) -> torch.Tensor:
    """Weight matrix K×C of the final ``nn.Linear`` (for CAM), with a clear error if the
    model does not end in global pooling plus one linear layer over ``channels`` features."""
    info = model.layer_info()
    linears = [n for n, i in info.items() if i.type == "Linear" and i.calls == 1]
    if linears:
        fc = resolve(model.module, linears[-1])
        if isinstance(fc, nn.Linear) and fc.in_features == channels:
            return fc.weight.detach()
    raise ValueError(
        "CAM needs a network that ends in global average pooling and one linear layer over the "
        f"chosen layer's {channels} channels (ResNet, EfficientNet…); this model does not. "
        "Use grad_cam, which works on any layer"
    )


# --------------------------------------------------------------------------- attribute
@contextlib.contextmanager
def input_only(module: nn.Module):
    """:func:`restored` with every parameter's ``requires_grad`` off inside: gradients reach
    the input only (faster, and the parameters are never touched); all put back after."""
    with restored(module, frozen=True):
        yield module


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32)
    return torch.as_tensor(np.asarray(value), dtype=torch.float32)


def _to_map(heat: torch.Tensor, size, signed: bool, fine: bool = False) -> np.ndarray:
    heat = heat.detach().to("cpu", torch.float32)
    while heat.ndim > 2:
        heat = heat[0]
    if tuple(heat.shape) != tuple(size):
        heat = F.interpolate(heat[None, None], size=tuple(size), mode="bilinear",
                             align_corners=False)[0, 0]
    heat = torch.nan_to_num(heat)
    if fine:  # a pixel-level map keeps its zero: scaled by its largest magnitude
        scale = heat.abs().max()
        return (heat / scale if scale > 0 else heat).numpy().astype(np.float32)
    if signed:
        scale = heat.abs().max()
        heat = heat / scale if scale > 0 else heat
    else:
        low, high = heat.min(), heat.max()
        heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    return heat.numpy().astype(np.float32)


def default_heat(raw: torch.Tensor, signed: bool) -> torch.Tensor:
    """The 2-D map shown for a raw output: a C×H×W raw is reduced over channels (summed when
    signed, largest magnitude otherwise); a 2-D raw is shown as it is."""
    if raw.ndim == 4:
        raw = raw[0]
    if raw.ndim == 3:
        return raw.sum(0) if signed else raw.abs().amax(0)
    return raw


def attribute(
    model: Model,
    image,
    method: str = "grad_cam",
    target=None,
    layer: str | None = None,
    *,
    cancel=None,
    progress=None,
    **params,
) -> Attribution:
    """Explain ``model``'s score for ``target`` on ``image`` with an attribution ``method``.

    ``target``: ``None`` (top-1), a class index or a label, a list of classes (their sum), a
    ``cw.targets.Region`` / ``cw.targets.Box``, or a callable ``output -> one score per image``
    (see :mod:`cnnwidgets.engine.targets`). ``layer``: for CAM methods (default:
    the last feature map, see :func:`default_layer`); ``"name:input"`` reads a module's input.
    ``params``: the method's own parameters (``cw.methods()`` lists methods;
    ``cnnwidgets.engine.attribution.get_method(name).params`` their specs).
    ``cancel``: a ``threading.Event`` (or callable) that stops a running method with
    :class:`Cancelled` within one layer's work, in the forward or the backward pass
    (:func:`~cnnwidgets.engine.hooks.cancel_points`). ``progress``: ``None`` shows a tqdm bar once a batched
    method has run for a second (:data:`PROGRESS_DELAY`), ``True``/``False`` force it, a
    callable ``f(done, total)`` receives progress instead.
    The model is put back exactly as it was, after success and after errors.
    """
    spec = get_method(method)
    model = as_model(model, "cw.attribute")
    cancel = check_cancel(cancel)
    progress = check_progress(progress, who="cw.attribute")
    values = spec.resolve(params)
    if layer is not None and not spec.layer:
        raise ValueError(f"{spec.name} does not read a layer, so layer={layer!r} has no effect; "
                         "leave layer=None (CAM methods use it)")
    with cancel_points(cancel, spec.name):  # a stop answers within one layer's work
        layer_name = (default_layer(model) if layer is None else check_map_layer(model, layer)) \
            if spec.layer else None
        x, display = model.prepare(image)
        start = time.perf_counter()
        with input_only(model.module):
            def output():
                with torch.no_grad():
                    return model.run(x)

            goal = targets_.resolve(model, target, output)
            ctx = Context(model, x.detach(), goal, layer_name, spec.name, cancel, progress)
            out = spec.fn(ctx, **values)
    raw, heat = out if isinstance(out, tuple) else (out, None)
    raw = _as_tensor(raw)
    if raw.ndim == 4 and raw.shape[0] == 1:
        raw = raw[0]
    fine = heat is None and raw.ndim == 3  # a map reduced from an input-shaped raw output
    heat = default_heat(raw, spec.signed) if heat is None else _as_tensor(heat)
    size = tuple(x.shape[-2:])
    return Attribution(
        map=_to_map(heat, size, spec.signed, fine),
        raw=raw.numpy().astype(np.float32),
        method=spec.name,
        target=goal.index if goal.index is not None else goal.spec,
        layer=layer_name,
        params=values,
        label=goal.name,
        image=display,
        signed=spec.signed,
        fine=fine,
        score=ctx.base_score,
        seconds=time.perf_counter() - start,
    )
