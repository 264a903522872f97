"""Adversarial examples, and where in the network they take hold: ``cw.attack`` and
``cw.layer_drift``.

The attacks work on the crop the network sees, in pixel space ([0, 1]), with the model's own
normalisation applied before each pass, and follow the standard definitions (as torchattacks
implements them, which the tests check to 1e-6):

* **FGSM** (Goodfellow et al. 2015): ``x′ = clip₀¹(x + ε · sign ∇ₓ L)``, one step.
* **PGD** (Madry et al. 2018): from a uniform random start in the ε-ball (clipped to [0, 1]),
  ``steps`` steps ``x′ ← Π(x′ + α · sign ∇ₓ′ L)``, Π the projection onto the ε-ball around ``x``
  and onto [0, 1].

``L`` is the cross-entropy of the class to move away from (untargeted: the clean top-1 or a given
``source`` class), or minus that of the ``target`` class (targeted). The model is put back as it
was after success, error and cancellation (:func:`~.hooks.restored`); no hook is used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_float, check_int
from .hooks import capture, restored
from .model import Model, as_model
from .preprocess import Pixels
from .progress import Progress

__all__ = ["ATTACKS", "Adversarial", "Drift", "attack", "layer_drift"]

#: the attacks :func:`attack` knows
ATTACKS = ("fgsm", "pgd")


@dataclass
class Adversarial:
    """The result of :func:`attack`. Pass it as an ``image`` anywhere (``cw.attribute(model,
    adv)``, ``cw.fixations(model, adv)``, ``model.predict(adv)``): the adversarial pixels reach
    the network exactly, neither resized nor rounded to 8 bits. ``adv.clean`` does the same for
    the clean crop."""

    image: np.ndarray  #: the adversarial crop H×W×3, float32 in [0, 1]
    original: np.ndarray  #: the clean crop the network sees (``model.prepare(image)[1]``)
    perturbation: np.ndarray  #: ``image − original`` (H×W×3, each value within ±epsilon)
    method: str  #: "fgsm" or "pgd"
    epsilon: float  #: the L∞ budget, in pixel units (1 = the whole [0, 1] range)
    steps: int  #: gradient steps taken (1 for FGSM)
    step_size: float  #: α, the size of each step (= epsilon for FGSM)
    source: int  #: the class moved away from: the clean top-1 unless ``source`` was given
    target: int | None  #: the class moved towards (targeted attack), or None
    before: list  #: top-k ``(index, label, probability)`` of the clean image
    after: list  #: top-k of the adversarial image
    success: bool  #: untargeted: the top-1 is no longer ``source``; targeted: it is ``target``
    linf: float  #: max |perturbation|
    l2: float  #: ‖perturbation‖₂ over all pixels and colours
    seed: int  #: seed of PGD's random start
    losses: list = field(default_factory=list)  #: the loss before each step
    seconds: float = 0.0  #: wall-clock time

    def __cw_pixels__(self) -> torch.Tensor:
        return torch.from_numpy(self.image).permute(2, 0, 1)

    @property
    def clean(self) -> Pixels:
        """The clean crop as an exact ``image`` argument."""
        return Pixels(self.original)

    def __repr__(self) -> str:
        top = lambda rows: f"{rows[0][1]!r} {rows[0][2]:.1%}" if rows else "-"  # noqa: E731
        aim = "" if self.target is None else f", target={self.target}"
        return (f"Adversarial({self.method}, epsilon={self.epsilon:.4g}{aim}: {top(self.before)}"
                f" → {top(self.after)}, success={self.success}, L∞={self.linf:.4g}, "
                f"L2={self.l2:.4g})")


def _method(method) -> str:
    if not isinstance(method, str) or method.lower() not in ATTACKS:
        raise ValueError(f"cw.attack: unknown method {method!r}; choose one of "
                         f"{', '.join(repr(m) for m in ATTACKS)}")
    return method.lower()


def _top(model: Model, logits: torch.Tensor, k: int) -> list:
    probs = logits.softmax(-1)[0]
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), model.label(int(i)), float(v)) for v, i in zip(values, indices)]


def attack(model, image, method: str = "fgsm", epsilon: float = 4 / 255, steps: int = 10,
           step_size: float | None = None, target=None, seed: int = 0, cancel=None,
           progress=None, *, source=None, k: int = 5) -> Adversarial:
    """An adversarial example of ``image`` for ``model``: :class:`Adversarial`.

    ``method``: ``"fgsm"`` (one step of size ``epsilon``; ``steps`` and ``step_size`` unused)
    or ``"pgd"`` (random start, ``steps`` steps of ``step_size``, default
    ``2.5 · epsilon / steps`` as Madry et al.). ``epsilon``: the L∞ budget in pixel units, from
    0 to 1 (4/255: four grey levels). ``target``: ``None`` (untargeted: away from ``source``,
    default the clean top-1), or a class index or label to move towards. ``seed``: PGD's random
    start. ``cancel`` / ``progress``: as in ``cw.attribute`` (checked before each step).
    ``k``: how many classes ``before`` / ``after`` list.

    The attack runs on the crop the network sees (``model.prepare(image)[1]``), normalised
    with the model's ``mean`` / ``std`` (a model with its own ``transform`` is attacked
    through those too). The model is left exactly as it was.
    """
    who = "cw.attack"
    model = as_model(model, who)
    method = _method(method)
    epsilon = check_float(epsilon, "epsilon", 0, 1, who=who)
    steps = check_int(steps, "steps", 1, 100_000, who=who)
    if step_size is not None:
        step_size = check_float(step_size, "step_size", 0, 1, low_open=True, who=who)
    seed = check_int(seed, "seed", 0, 2**63 - 1, who=who)
    k = check_int(k, "k", 1, None, who=who)
    x, display = model.prepare(image)
    x01 = torch.from_numpy(np.ascontiguousarray(display)).permute(2, 0, 1)[None]
    x01 = x01.to(x.device, x.dtype)
    n = 1 if method == "fgsm" else steps
    alpha = epsilon if method == "fgsm" else (step_size or 2.5 * epsilon / steps)
    losses: list[float] = []
    start = time.perf_counter()
    with restored(model.module, frozen=True):
        with torch.no_grad():
            clean = model.scores(x)
        away = int(clean[0].argmax()) if source is None else model.target_index(source)
        toward = None if target is None else model.target_index(target)
        label = torch.tensor([away if toward is None else toward], device=x.device)
        sign = 1.0 if toward is None else -1.0  # descend the target's loss
        adv = x01.clone()
        if method == "pgd":  # uniform start in the ε-ball, drawn on the CPU: any device agrees
            generator = torch.Generator().manual_seed(seed)
            noise = torch.empty(x01.shape, dtype=x01.dtype).uniform_(-epsilon, epsilon,
                                                                      generator=generator)
            adv = (adv + noise.to(x.device)).clamp(0, 1)
        with Progress(n, "attack", cancel=cancel, progress=progress,
                      what=f"cw.attack ({method})") as bar:
            for _ in bar.each(range(n)):
                adv.requires_grad_(True)
                with torch.enable_grad():
                    loss = sign * F.cross_entropy(model.scores(model.normalize(adv)), label)
                    bar.check()  # a stop asked during the forward pass skips the backward
                    (grad,) = torch.autograd.grad(loss, adv)
                losses.append(float(loss.detach()))
                adv = adv.detach() + alpha * grad.sign()
                if method == "pgd":
                    adv = x01 + (adv - x01).clamp(-epsilon, epsilon)
                adv = adv.clamp(0, 1)
                bar.advance()
        with torch.no_grad():
            after = model.scores(model.normalize(adv))
    top1 = int(after[0].argmax())
    success = top1 != away if toward is None else top1 == toward
    image_out = adv[0].permute(1, 2, 0).to("cpu", torch.float32).numpy().copy()
    original = np.asarray(display, dtype=np.float32)
    delta = (adv - x01)[0].to("cpu", torch.float64)
    return Adversarial(
        image=image_out, original=original, perturbation=image_out - original, method=method,
        epsilon=epsilon, steps=n, step_size=float(alpha), source=away, target=toward,
        before=_top(model, clean, k), after=_top(model, after, k), success=bool(success),
        linf=float(delta.abs().max()) if delta.numel() else 0.0,
        l2=float(delta.norm()), seed=seed, losses=losses,
        seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- drift
@dataclass
class Drift:
    """How far each layer's activations moved from one image to another (:func:`layer_drift`)."""

    layers: list  #: layer names, in forward order
    relative: np.ndarray  #: per layer ‖A(x′) − A(x)‖ / ‖A(x)‖ (Frobenius norms)
    #: layer → per channel ‖A_c(x′) − A_c(x)‖ / ‖A(x)‖ (their squares sum to ``relative²``)
    channels: dict = field(default_factory=dict)

    def most_moved(self) -> str:
        """The layer whose activations moved most (relative to their size)."""
        values = np.where(np.isfinite(self.relative), self.relative, -np.inf)
        return self.layers[int(np.argmax(values))]

    def top_channels(self, layer: str, n: int = 8) -> list[int]:
        """The ``n`` channels of ``layer`` that moved most, most first."""
        change = self.channels[layer]
        return [int(c) for c in np.argsort(-change, kind="stable")[:n]]


def default_drift_layers(model: Model) -> list[str]:
    """The convolutions that output a feature map, in forward order (every feature-map layer
    when the network has none of those)."""
    info = model.layer_info()
    maps = model.layers("maps")
    convs = [n for n in maps if info[n].conv]
    return convs or maps


def layer_drift(model, image, other, layers=None) -> Drift:
    """:class:`Drift` of the ``layers`` (default: :func:`default_drift_layers`) from ``image``
    to ``other`` (an :class:`Adversarial` is an exact image: ``layer_drift(model, adv.clean,
    adv)``). Both run in one batch of two; each layer's change is measured as it is computed,
    so no layer output is kept."""
    model = as_model(model, "cw.layer_drift")
    names = default_drift_layers(model) if layers is None else list(layers)
    for name in names:
        info = model.check_layer(name)
        if len(info.shape) != 3:
            raise ValueError(f"cw.layer_drift: layer {name!r} ({info.type}) is not a feature "
                             "map; model.layers() lists those that are")
    a, _ = model.prepare(image)
    b, _ = model.prepare(other)
    stats: dict[str, tuple[float, np.ndarray]] = {}

    def measure(name, out):
        if out.ndim == 4 and out.shape[0] == 2 and name not in stats:
            diff = (out[1] - out[0]).detach().double()
            base = float(out[0].detach().double().norm())
            per = diff.flatten(1).norm(dim=1).cpu().numpy()
            scale = base if base > 0 else float("nan")
            stats[name] = (float(diff.norm()) / scale, per / scale)
        return None

    with restored(model.module), torch.no_grad(), \
            capture(model.module, names, replace=measure, store=False):
        model.scores(torch.cat([a, b]))
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"cw.layer_drift: layers {missing} did not output a feature map")
    return Drift(names, np.array([stats[n][0] for n in names]),
                 {n: stats[n][1] for n in names})
