"""Activation maximisation, network inversion and DeconvNet projection.

Each optimiser is a generator (``optimize``, ``invert_steps``) that yields one :class:`Step`
per iteration and does no display or I/O: the caller decides what to show (``visualize`` and
``invert`` just run it to the end; the widgets refresh a figure every few steps).

Every step runs the network inside ``restored(model.module)`` (entered and left within the
step, under the network's optimisation lock) and differentiates with ``torch.autograd.grad``
with respect to the image only, so between steps (and after a run is stopped or fails) the
model is exactly as it was: no hook, same training flags, same ``requires_grad``, no ``.grad``.
The layers are read with forward hooks registered and removed inside each step
(``layer_outputs``, in ``try/finally``); the forward pass stops at the deepest layer an
objective needs (an exception raised from that hook), so early layers are cheap.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..guard import guard
from ..hooks import resolve, this_thread
from ..model import as_model
from ..progress import Progress, check_cancel, check_progress
from ..relu_rules import relu_rule
from . import objectives as obj
from .param import make_param
from .transforms import Robustness, identity


class _Stop(Exception):
    """Raised from a forward hook once the deepest needed layer has run."""


@contextlib.contextmanager
def _frozen(model):
    """``restored`` (eval mode inside, flags restored after) holding the network's optimisation
    lock (:meth:`~cnnwidgets.engine.guard.ModelGuard.optimising`): a step of a background run
    and a call from the notebook never interleave.

    Gradients are taken with ``torch.autograd.grad`` with respect to the image only, so the
    parameters never receive a ``.grad`` and their ``requires_grad`` is never touched — which
    also keeps a concurrent ``restored`` block elsewhere (``model.predict`` from the notebook
    while a widget optimises in the background) from saving and restoring a changed flag."""
    with guard(model.module).optimising() as module:
        yield module


class LayerPlan:
    """The layers one objective reads, validated and resolved once per run."""

    def __init__(self, model, layers):
        self.layers = list(dict.fromkeys(layers))
        names = [n for n in self.layers if n != obj.LOGITS]
        for n in names:
            model.check_layer(n)
        self.modules = [(n, resolve(model.module, n)) for n in names]
        self.logits = obj.LOGITS in self.layers
        order = model.layers("all")
        self.last = max(names, key=order.index) if names and not self.logits else None


def layer_outputs(model, x: torch.Tensor, layers, plan: LayerPlan | None = None) -> dict:
    """Run ``model`` on ``x`` and return ``{layer: output with graph}`` (plus ``"logits"`` when
    asked for). The forward pass stops after the deepest layer when logits are not needed.
    Call inside ``restored``/``_frozen``. Hooks are removed in ``finally``."""
    plan = plan or LayerPlan(model, layers)
    acts: dict = {}
    handles = []
    try:
        for name, module in plan.modules:

            def hook(mod, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    acts[name] = out
                if name == plan.last:
                    raise _Stop

            handles.append(module.register_forward_hook(this_thread(hook)))
        try:
            acts_logits = model.scores(x)
            if plan.logits:
                acts[obj.LOGITS] = acts_logits
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in plan.layers if n not in acts]
    if missing:
        raise ValueError(f"layers {missing} produced no tensor output in the forward pass")
    return acts


def _to_numpy_images(t: torch.Tensor) -> np.ndarray:
    return t.detach().clamp(0, 1).permute(0, 2, 3, 1).to("cpu", torch.float32).numpy()


@dataclass
class Step:
    """One optimisation step, as yielded by the generators."""

    step: int  #: 1-based step number
    steps: int  #: total number of steps
    loss: float  #: loss at this step (before the update)
    history: list  #: every loss so far (the same list object for the whole run)
    render: object = field(repr=False, default=None)  #: callable → current images N×H×W×3

    def images(self) -> np.ndarray:
        """The current images, N×H×W×3 float in [0, 1] (computed on demand, no graph)."""
        with torch.no_grad():
            return _to_numpy_images(self.render())

    def image(self) -> np.ndarray:
        """The current first image, H×W×3 float in [0, 1]."""
        return self.images()[0]


@dataclass
class Visualization:
    """The result of ``cw.visualize`` or ``cw.invert``."""

    image: np.ndarray  #: H×W×3 float32 in [0, 1] (the first image of the batch)
    history: list  #: the loss at every step
    images: np.ndarray = None  #: N×H×W×3, the whole batch
    objective: str = ""  #: what was optimised (objective name, or "invert <layer>")
    params: dict = field(default_factory=dict)  #: settings that produced it (seed, steps, …)

    def __post_init__(self):
        if self.images is None:
            self.images = self.image[None]


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def optimize(model, objective, *, steps: int = 256, param: str = "fft", size=128, batch: int = 1,
             lr: float = 0.05, seed: int = 0, decorrelate: bool = True,
             transforms: bool = True) -> Iterator[Step]:
    """Activation maximisation as a generator of :class:`Step` (Lucid / Lucent defaults).

    The image is parameterised (``param="fft"`` or ``"pixel"``, decorrelated colour, sigmoid),
    transformed at random each step (pad 12, jitter 8, scale 0.9–1.1, rotate ±10°, jitter 4;
    ``transforms=False`` switches it off), normalised as the model expects, and updated by Adam
    to minimise ``objective`` (see :mod:`cw.objectives`). Same seed → identical steps.
    """
    model = as_model(model, "cw.engine.optvis.optimize")
    objective = obj.parse(objective, model)
    for n in objective.layers:
        if n != obj.LOGITS:
            model.check_layer(n)
    steps = int(steps)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    gen = _generator(seed)
    image_param = make_param(param, batch=int(batch), size=size, decorrelated=decorrelate,
                             generator=gen).to(model.device)
    plan = LayerPlan(model, objective.layers)
    chain = Robustness() if transforms else identity
    opt = torch.optim.Adam(image_param.parameters(), lr=lr)
    history: list = []
    for i in range(1, steps + 1):
        with _frozen(model):
            img = image_param()
            x = model.normalize(chain(img, generator=gen))
            acts = layer_outputs(model, x, objective.layers, plan)
            loss = objective(acts, model)
            tensors = list(image_param.parameters())
            for t, g in zip(tensors, torch.autograd.grad(loss, tensors)):
                t.grad = g
            opt.step()
        history.append(float(loss.detach()))
        yield Step(i, steps, history[-1], history, image_param)


def _run(gen: Iterator[Step], steps: int, desc: str, what: str, cancel, progress) -> Step:
    """Run a step generator to its end and return its last :class:`Step`, checking ``cancel``
    before each step and reporting each step to ``progress`` (:class:`..progress.Progress`).
    A cancelled run raises :class:`Cancelled` between two steps, where the model is exactly
    as it was (each step enters and leaves ``restored`` itself)."""
    last = None
    try:
        with Progress(steps, desc, cancel=cancel, progress=progress, what=what) as bar:
            for last in bar.each(gen):
                bar.advance()
    finally:
        gen.close()
    return last


def visualize(model, objective, steps: int = 256, param: str = "fft", seed: int = 0,
              size=128, *, batch: int = 1, lr: float = 0.05, decorrelate: bool = True,
              transforms: bool = True, cancel=None, progress=None) -> Visualization:
    """Maximise ``objective`` (``"layer:channel"``, a class index or label, or a
    ``cw.objectives`` object) and return a ``cw.Visualization`` (``.image`` H×W×3 in [0, 1],
    ``.history`` of losses). See :func:`optimize` for the method.

    ``cancel``: a ``threading.Event`` (or a callable returning True) that stops the run between
    two steps with :class:`cnnwidgets.Cancelled`, the model as it was. ``progress``: ``None``
    shows a bar once the run has lasted a second, ``True`` / ``False`` force it, a callable
    ``f(step, steps)`` is called after each step instead (as in ``cw.attribute``)."""
    model = as_model(model, "cw.visualize")
    check_cancel(cancel)
    check_progress(progress)
    objective = obj.parse(objective, model)
    gen = optimize(model, objective, steps=steps, param=param, size=size, batch=batch, lr=lr,
                   seed=seed, decorrelate=decorrelate, transforms=transforms)
    last = _run(gen, steps, f"visualize {objective.name}", "visualize", cancel, progress)
    images = last.images()
    return Visualization(images[0], list(last.history), images, objective.name,
                         dict(steps=steps, param=param, seed=seed, size=size, batch=batch, lr=lr,
                              decorrelate=decorrelate, transforms=transforms))


# ---------------------------------------------------------------------- inversion
def tv_weight(model, layer: str, base: float = 0.5) -> float:
    """Default TV weight: heavier for deeper layers (× 1 at the input up to × 8 at the end)."""
    order = model.layers("all")
    depth = order.index(layer) / max(1, len(order) - 1)
    return base * (1.0 + 7.0 * depth)


def invert_steps(model, image, layer: str, *, steps: int = 200, seed: int = 0, lr: float = 0.05,
                 alpha: float = 6.0, beta: float = 2.0, lambda_alpha: float = 0.05,
                 lambda_tv: float | None = None, decay: float = 0.1) -> Iterator[Step]:
    """Mahendran & Vedaldi inversion as a generator of :class:`Step`.

    Minimises ``‖Φ(x) − Φ₀‖² / ‖Φ₀‖² + λ_α mean|x̄ / B|^α + λ_TV mean(((∂_h x)² + (∂_v x)²) / B_V²)^(β/2)``
    over the image ``x`` in [0, 1] display space, where ``x̄ = x − 0.5``, ``B = 0.5`` (so the
    α-norm acts as a soft box constraint) and ``B_V = B / 6.5`` (the paper's ratio). Start:
    0.5 + N(0, 0.01) noise. SGD with momentum 0.9; the learning rate is set from the first
    gradient so the first update moves the largest pixel by ``lr``, and decays exponentially
    to ``decay × `` that by the last step. ``lambda_tv=None`` → :func:`tv_weight` (heavier for
    deeper layers).
    """
    model = as_model(model, "cw.invert")
    info = model.check_layer(layer)
    del info
    x0, _ = model.prepare(image)
    steps = int(steps)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    lam_tv = tv_weight(model, layer) if lambda_tv is None else float(lambda_tv)
    with _frozen(model), torch.no_grad():
        target = layer_outputs(model, x0, [layer])[layer].detach()
    norm = target.pow(2).sum().clamp_min(1e-12)
    plan = LayerPlan(model, [layer])
    gen = _generator(seed)
    h, w = x0.shape[-2:]
    start = 0.5 + 0.01 * torch.randn(1, 3, h, w, generator=gen)
    x = torch.nn.Parameter(start.to(model.device))
    opt = torch.optim.SGD([x], lr=lr, momentum=0.9)
    B, BV = 0.5, 0.5 / 6.5
    history: list = []
    base_lr = None
    for i in range(1, steps + 1):
        with _frozen(model):
            acts = layer_outputs(model, model.normalize(x), [layer], plan)
            rec = (acts[layer] - target).pow(2).sum() / norm
            r_alpha = ((x - 0.5).abs() / B).pow(alpha).mean()
            dh = x[..., 1:, :-1] - x[..., :-1, :-1]
            dv = x[..., :-1, 1:] - x[..., :-1, :-1]
            r_tv = ((dh * dh + dv * dv) / BV ** 2 + 1e-8).pow(beta / 2).mean()
            loss = rec + lambda_alpha * r_alpha + lam_tv * r_tv
            (x.grad,) = torch.autograd.grad(loss, [x])
            if base_lr is None:
                base_lr = lr / float(x.grad.abs().max().clamp_min(1e-12))
            for group in opt.param_groups:
                group["lr"] = base_lr * decay ** ((i - 1) / max(1, steps - 1))
            opt.step()
        history.append(float(loss.detach()))
        yield Step(i, steps, history[-1], history, lambda: x)


def invert(model, image, layer: str, steps: int = 200, seed: int = 0, *,
           cancel=None, progress=None, **kwargs) -> Visualization:
    """Reconstruct ``image`` from ``layer``'s code (Mahendran & Vedaldi); ``.image`` is aligned
    with ``model.prepare(image)[1]``. Keyword arguments go to :func:`invert_steps`.
    ``cancel`` and ``progress`` as in :func:`visualize`."""
    model = as_model(model, "cw.invert")  # before the progress bar: a wrong model fails at once
    model.check_layer(layer)
    check_cancel(cancel)
    check_progress(progress)
    gen = invert_steps(model, image, layer, steps=steps, seed=seed, **kwargs)
    last = _run(gen, steps, f"invert {layer}", "invert", cancel, progress)
    img = last.image()
    return Visualization(img, list(last.history), img[None], f"invert {layer}",
                         dict(steps=steps, seed=seed, layer=layer, **kwargs))


# ---------------------------------------------------------------------- DeconvNet
class DeconvProjection(np.ndarray):
    """H×W×3 float in [0, 1]: a DeconvNet projection shown with 0.5 = zero
    (``0.5 + raw / (2 max|raw|)``), usable directly as an image. Attributes:

    * ``raw`` — the projection itself, H×W×3, in display-pixel units (∂/∂ display image);
    * ``layer``, ``channel`` — what was projected;
    * ``position`` — ``(row, col, value)`` of the projected activation (layer coordinates);
    * ``positions`` — k×3 array of the top-k ``(row, col, value)`` of the channel, strongest first;
    * ``input_positions`` — k×2 ``(row, col)`` of those positions in input pixels (cell centres);
    * ``box`` — ``(x0, y0, x1, y1)`` in input pixels around where the projection is non-zero.
    """

    _attrs = ("raw", "layer", "channel", "position", "positions", "input_positions", "box")

    def __new__(cls, display, **attrs):
        out = np.asarray(display, dtype=np.float32).view(cls)
        for k in cls._attrs:
            setattr(out, k, attrs.get(k))
        return out

    def __array_finalize__(self, src):
        for k in self._attrs:
            setattr(self, k, getattr(src, k, None))


def deconv(model, image, layer: str, channel: int | None = None, top_k: int = 5,
           rank: int = 0) -> DeconvProjection:
    """Zeiler & Fergus projection of one activation of ``layer`` to pixel space.

    The ``rank``-th strongest activation of ``channel`` (default: the channel whose maximum is
    largest) is kept with its value, every other activation of the layer is zeroed, and that
    is sent back to the input with autograd, every ReLU-like op using the DeconvNet rule
    ``relu(R)`` (:mod:`cnnwidgets.engine.relu_rules`; max-pool switches and transposed
    convolutions are what autograd's backward already does). Returns a
    :class:`DeconvProjection` (an H×W×3 image aligned with ``model.prepare(image)[1]``).
    """
    model = as_model(model, "cw.deconv")
    model.check_layer(layer)
    x, _ = model.prepare(image)
    x = x.detach().requires_grad_(True)
    with _frozen(model), relu_rule("deconvnet"):
        a = layer_outputs(model, x, [layer])[layer]
        if a.ndim != 4:
            raise ValueError(f"layer {layer!r} outputs shape {tuple(a.shape[1:])}, not a "
                             "feature map C×h×w; pick a convolutional layer")
        C, h, w = a.shape[1:]
        if channel is None:
            channel = int(a[0].detach().flatten(1).max(1).values.argmax())
        channel = int(channel)
        if not 0 <= channel < C:
            raise ValueError(f"channel {channel} is out of range for {layer!r} (0–{C - 1})")
        flat = a[0, channel].detach().flatten()
        k = max(1, min(int(top_k), flat.numel()))
        vals, idx = flat.topk(max(k, int(rank) + 1))
        pos = [(int(j) // w, int(j) % w, float(v)) for v, j in zip(vals, idx)]
        r, c, v = pos[int(rank)]
        seed = torch.zeros_like(a)
        seed[0, channel, r, c] = a[0, channel, r, c].detach()
        (grad,) = torch.autograd.grad(a, x, seed)
    # x = (d − mean) / std  ⇒  ∂/∂d = ∂/∂x / std
    std = torch.tensor(model.std, dtype=grad.dtype, device=grad.device).view(1, -1, 1, 1)
    raw = (grad / std)[0].permute(1, 2, 0).to("cpu", torch.float32).numpy()
    peak = float(np.abs(raw).max())
    display = 0.5 + raw / (2 * peak) if peak > 0 else np.full_like(raw, 0.5)
    mag = np.abs(raw).max(-1)
    ys, xs = np.nonzero(mag > 0.01 * peak) if peak > 0 else (np.array([0]), np.array([0]))
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    positions = np.array(pos[:k], dtype=np.float32)
    H, W = raw.shape[:2]
    scale = np.array([H / h, W / w], dtype=np.float32)
    input_positions = (positions[:, :2] + 0.5) * scale - 0.5
    return DeconvProjection(display, raw=raw, layer=layer, channel=channel, position=(r, c, v),
                            positions=positions, input_positions=input_positions, box=box)
