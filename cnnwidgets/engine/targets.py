"""Targets: which number of the network's output a method explains.

Every attribution method and CNN Fixations explain *one score per image*. This module is the one
place where a user's ``target`` becomes that score (:func:`resolve` → :class:`Resolved`): the
methods ask ``target.score(output)`` (a batch's scores, N), ``target.probability(output)``
(RISE's weights), ``target.neurons(output)`` (the output neurons CNN Fixations starts from) and
``target.classes`` (the class rows of a linear classifier, for CAM). What a target may be:

* ``None``: the top-1 prediction — the highest class score of a classifier (N×K); for a dense
  output (N×C×H×W) the class that scores highest at the most pixels, over those pixels; for
  scored boxes the box with the highest score, for its best class;
* a class index or label: that class's score; on a dense output, its scores summed over the
  pixels where it scores highest (``Region(c)``);
* a list or tuple of classes: the sum of their scores (multi-label; on a dense output, each
  class over every pixel);
* :class:`Region` ``(class, mask)``: a dense output's class scores summed over a boolean H×W mask
  of output pixels (``mask=None``: the pixels where the class scores highest; ``"all"``: every
  pixel);
* :class:`Box` ``(index, cls=None)``: one box's score in a scored-box output;
* any callable ``output -> tensor (N,)``: one score per image, computed from whatever the model
  returns (after ``cw.Model(output=...)``), e.g. a matching rule over a detector's list of
  dicts. :class:`Score` wraps one with a name.

Output formats: a classifier's N×K scores; a dense N×C×H×W map of class scores (segmentation);
scored boxes N×B×(4+K) — B boxes per image, each row 4 coordinates (any convention) followed
by K class scores (DETR after its softmax, YOLOv8-style heads transposed to boxes-first); any
other output only through a callable target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .labels import class_index

__all__ = ["Box", "Region", "Resolved", "Score", "check", "class_of", "describe", "name_of",
           "rectangle", "resolve"]


@dataclass(frozen=True, eq=False)
class Region:
    """A dense output's class scores summed over a region of output pixels.

    ``cls``: a class index or label. ``mask``: boolean H×W (numpy, torch or nested lists) over
    the output's pixels; ``None``: the pixels where ``cls`` scores highest on the explained
    image; ``"all"``: every pixel."""

    cls: Any  #: class index or label
    mask: Any = None  #: H×W bool over output pixels, None (predicted pixels) or "all"

    def __repr__(self) -> str:
        if self.mask is None or isinstance(self.mask, str):
            return f"Region({self.cls!r}, {self.mask!r})"
        m = np.asarray(self.mask)
        return f"Region({self.cls!r}, mask {m.shape[0]}×{m.shape[-1]}, {int(m.astype(bool).sum())} px)"


@dataclass(frozen=True)
class Box:
    """One box's score in a scored-box output N×B×(4+K): ``index`` (the box), ``cls`` (class
    index or label; ``None``: the box's best class on the explained image)."""

    index: int  #: which box (row) of the output
    cls: Any = None  #: class index or label, or None for the box's best class


@dataclass(frozen=True)
class Score:
    """A callable target with a name: ``fn(output) -> tensor (N,)``, one score per image."""

    fn: Callable  #: output → one score per image
    name: str = ""  #: shown in titles and widgets

    def __call__(self, output):
        return self.fn(output)


def describe(target) -> str:
    """A short name of a target as given (for titles and menus)."""
    if isinstance(target, Resolved):
        return target.name
    if isinstance(target, Score):
        return target.name or getattr(target.fn, "__name__", "score")
    if isinstance(target, (Region, Box)):
        return repr(target)
    if callable(target):
        return getattr(target, "__name__", type(target).__name__)
    return repr(target)


class Resolved:
    """A target made concrete for one model and image: how to read its score off an output.

    ``kind``: ``"classes"`` (classifier N×K), ``"dense"`` (N×C×H×W), ``"boxes"`` (N×B×D) or
    ``"custom"`` (a callable). For the first three the score is the sum of the output neurons
    ``indices`` (flat indices into one image's output); ``shape`` is one image's output shape.
    """

    def __init__(self, kind: str, name: str, spec, *, indices=None, shape=None, classes=None,
                 pixels: int = 1, fn: Callable | None = None):
        self.kind = kind
        self.name = name  #: shown in titles
        self.spec = spec  #: the target as a user can pass it again (int, list, Region, Box, callable)
        self.indices = indices  #: LongTensor of flat output indices (None for a callable)
        self.shape = shape  #: one image's output shape the indices refer to
        #: class indices whose logits are summed, for a classifier's output (CAM); else None
        self.classes = classes
        self.pixels = pixels  #: output pixels in the region (probabilities are averaged over them)
        self.fn = fn

    # ------------------------------------------------------------------ compat
    @property
    def index(self) -> int | None:
        """The class index when the target is one class of a classifier, else None."""
        return self.classes[0] if self.classes is not None and len(self.classes) == 1 else None

    def __index__(self) -> int:  # ``logits[:, ctx.target]`` keeps working for one class
        if self.index is None:
            raise TypeError(f"the target {self.name!r} is not one class index; use "
                            "ctx.target.score(output) to read its score")
        return self.index

    def __repr__(self) -> str:
        return f"Resolved({self.kind}, {self.name!r})"

    # ------------------------------------------------------------------ scores
    def _check(self, output) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or tuple(output.shape[1:]) != tuple(self.shape):
            got = (f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                   else type(output).__name__)
            raise ValueError(f"target {self.name!r} was resolved for outputs of shape "
                             f"N×{'×'.join(map(str, self.shape))}; the model returned {got}")
        return output

    def score(self, output) -> torch.Tensor:
        """The target's score for each image of a batch's output: a tensor (N,)."""
        if self.kind == "custom":
            return _call(self.fn, output, self.name)
        output = self._check(output)
        if self.kind == "classes" and self.indices.numel() == 1:
            return output[:, int(self.indices[0])]
        flat = output.reshape(output.shape[0], -1)
        return flat.index_select(1, self.indices.to(flat.device)).sum(1)

    def probability(self, output) -> torch.Tensor:
        """A score in [0, 1] per image where the output has one (RISE's weights): the summed
        softmax probabilities of the classes (a classifier), their mean over the region's
        pixels (a dense output); the score itself for boxes and callables."""
        if self.kind == "classes":
            return Resolved.score(self, self._check(output).softmax(-1))
        if self.kind == "dense":
            return Resolved.score(self, self._check(output).softmax(1)) / self.pixels
        return self.score(output)

    def neurons(self, output: torch.Tensor) -> torch.Tensor:
        """Flat indices into one image's output (the first of the batch) of the neurons the
        score reads: where CNN Fixations starts its backtrack. For a callable, the neurons
        where the score's gradient with respect to the output is not zero."""
        if self.kind != "custom":
            self._check(output)
            return self.indices.to(output.device)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise ValueError(
                f"CNN Fixations starts from output neurons; the callable target {self.name!r} "
                f"reads a {type(output).__name__}, not one tensor. Use a gradient or perturbation "
                "method (saliency, grad_cam, occlusion…), or pick one tensor with cw.Model(output=...)")
        leaf = output[:1].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            s = _call(self.fn, leaf, self.name)
            (g,) = torch.autograd.grad(s.sum(), leaf, allow_unused=True)
        found = torch.zeros(0, dtype=torch.long, device=output.device) if g is None else \
            torch.nonzero(g[0].reshape(-1) != 0).reshape(-1)
        if found.numel() == 0:
            raise ValueError(f"the callable target {self.name!r} depends on no output neuron "
                             "(its gradient is zero everywhere), so CNN Fixations has nowhere to start")
        return found


def _call(fn, output, name) -> torch.Tensor:
    s = fn(output)
    n = _batch_of(output)
    if not isinstance(s, torch.Tensor):
        raise ValueError(f"the target callable {name!r} returned a {type(s).__name__}; it must "
                         f"return a tensor of one score per image, shape ({n},) for this batch")
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if tuple(s.shape) != (n,) or not s.is_floating_point():
        raise ValueError(f"the target callable {name!r} returned a {s.dtype} tensor of shape "
                         f"{tuple(s.shape)}; it must return one floating-point score per image, "
                         f"shape ({n},) for this batch (e.g. out[:, 3], or out[:, 3].sum((1, 2)) "
                         "for a dense output)")
    return s


def _batch_of(output) -> int | None:
    if isinstance(output, torch.Tensor):
        return int(output.shape[0])
    if isinstance(output, (list, tuple)):
        if output and isinstance(output[0], torch.Tensor) and output[0].dim() >= 1 \
                and not isinstance(output, list):
            return int(output[0].shape[0])
        return len(output)
    if isinstance(output, dict) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return int(first.shape[0])
    return None


# --------------------------------------------------------------------------- resolve
def resolve(model, target, output: Callable[[], Any] | None = None) -> Resolved:
    """``target`` (see the module docstring) made concrete for ``model`` (a ``cw.Model``).

    ``output()``: the model's output for the explained image (1 image), asked only when needed
    (``None`` targets, regions without a mask, boxes without a class); ``None`` when no image
    is at hand. A ``Resolved`` passes through. Errors say what is wrong and what to pass."""
    if isinstance(target, Resolved):
        return target
    shape = model.output_shape  # one image's output shape from the dry run, None: not a tensor
    if isinstance(target, Score) or (callable(target) and not isinstance(target, type)
                                     and not isinstance(target, (Region, Box))):
        name = describe(target)
        return Resolved("custom", name, target, fn=target)
    if shape is None:
        raise ValueError(
            f"the model's output is not a tensor of scores, so target={target!r} cannot be read "
            "off it. Pass output=... to cw.Model to pick the scores (e.g. output='out' or "
            "output=lambda out: out['logits']), or a callable target output -> one score per image")
    kind = {1: "classes", 3: "dense", 2: "boxes"}.get(len(shape))
    if kind is None:
        raise ValueError(f"the model's output has shape N×{'×'.join(map(str, shape))}; targets "
                         "read class scores N×K, dense maps N×C×H×W or boxes N×B×(4+K). Pass a "
                         "callable target output -> one score per image")
    if isinstance(target, Region):
        return _region(model, target, shape, output)
    if isinstance(target, Box):
        return _box(model, target, shape, output)
    if isinstance(target, (list, tuple)):
        return _classes(model, list(target), shape, kind)
    if target is None:
        return _top(model, shape, kind, output)
    if kind == "dense":
        return _region(model, Region(target), shape, output)
    if kind == "boxes":
        raise ValueError("the model returns scored boxes N×B×(4+K): pass cw.targets.Box(index, "
                         "cls) to pick one box's score, not a class alone")
    return _classes(model, [target], shape, kind)


def _class(model, c, count: int) -> int:
    return class_index(c, lambda: count, lambda: model.labels)


def _classes(model, items: list, shape, kind) -> Resolved:
    if kind == "dense":
        if not items:
            raise ValueError("an empty list of classes has no score; give at least one class")
        parts = [_region(model, Region(c, "all"), shape, None) for c in items]
        idx = torch.cat([p.indices for p in parts])
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"the classes {items!r} list a class twice")
        names = " + ".join(model.label(_class(model, c, shape[0])) for c in items)
        return Resolved("dense", names, list(items), indices=idx, shape=shape,
                        pixels=shape[1] * shape[2])
    if kind != "classes":
        raise ValueError("a list of classes needs class scores N×K or a dense output N×C×H×W")
    if not items:
        raise ValueError("an empty list of classes has no score; give at least one class")
    found = [_class(model, c, shape[0]) for c in items]
    if len(set(found)) != len(found):
        raise ValueError(f"the classes {items!r} list a class twice")
    spec = found[0] if len(found) == 1 else found
    name = " + ".join(model.label(i) for i in found)
    return Resolved("classes", name, spec, indices=torch.tensor(found, dtype=torch.long),
                    shape=shape, classes=tuple(found))


def _one(output: Callable | None, why: str) -> torch.Tensor:
    if output is None:
        raise ValueError(f"{why} needs the image's output; give the image")
    out = output()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{why} needs a tensor output, not {type(out).__name__}")
    return out.detach()[0]


def _region(model, region: Region, shape, output) -> Resolved:
    if len(shape) != 3:
        raise ValueError(
            f"Region needs a dense output N×C×H×W (segmentation); this model returns "
            f"N×{'×'.join(map(str, shape))}. Use a class index or label"
            + (" (or a list of them)" if len(shape) == 1 else ", or Box for scored boxes"))
    c_count, h, w = shape
    c = _class(model, region.cls, c_count)
    mask = region.mask
    if mask is None:
        mask = (_one(output, f"Region({region.cls!r}) without a mask").argmax(0) == c).cpu()
        if not bool(mask.any()):
            raise ValueError(
                f"class {c} ({model.label(c)!r}) scores highest at no output pixel of this image, "
                f"so Region({region.cls!r}) has no pixel; pass a mask: "
                f"cw.targets.Region({region.cls!r}, mask) with a bool {h}×{w} mask, or 'all'")
        spec_mask = mask.numpy()
    elif isinstance(mask, str):
        if mask != "all":
            raise ValueError(f"Region mask must be a bool {h}×{w} array, None or 'all', not {mask!r}")
        mask = torch.ones(h, w, dtype=torch.bool)
        spec_mask = "all"
    else:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.ndim != 2 or m.shape != (h, w):
            raise ValueError(f"the Region mask has shape {m.shape}; it must be {h}×{w}, the "
                             f"output's pixels (one image's output is {c_count}×{h}×{w})")
        if m.dtype != bool:
            if not np.issubdtype(m.dtype, np.number) or not np.isin(m, (0, 1)).all():
                raise ValueError("the Region mask must be boolean (or 0/1) over output pixels")
            m = m.astype(bool)
        if not m.any():
            raise ValueError("the Region mask selects no pixel; its score would be 0 for every "
                             "input. Select at least one output pixel")
        mask = torch.from_numpy(m.copy())
        spec_mask = m
    pix = torch.nonzero(mask.reshape(-1)).reshape(-1)
    count = int(pix.numel())
    name = f"{model.label(c)} @ {'all pixels' if count == h * w else f'{count} px'}"
    return Resolved("dense", name, Region(c, spec_mask), indices=c * h * w + pix, shape=shape,
                    pixels=count)


def _box(model, box: Box, shape, output) -> Resolved:
    if len(shape) != 2 or shape[1] < 5:
        raise ValueError(
            "Box needs scored boxes N×B×(4+K): B boxes per image, each 4 coordinates then K "
            f"class scores; this model returns N×{'×'.join(map(str, shape))}. For another "
            "format (a detector's list of dicts) pass a callable target output -> one score per image")
    b, d = shape
    k = d - 4
    if isinstance(box.index, bool) or not isinstance(box.index, (int, np.integer)) \
            or not 0 <= int(box.index) < b:
        raise ValueError(f"Box index {box.index!r} is out of range; the output has {b} boxes (0–{b - 1})")
    i = int(box.index)
    if box.cls is None:
        c = int(_one(output, "Box without a class")[i, 4:].argmax())
    else:
        c = class_index(box.cls, lambda: k, lambda: model.labels)
    name = f"box {i}: {model.label(c)}"
    return Resolved("boxes", name, Box(i, c), indices=torch.tensor([i * d + 4 + c]), shape=shape)


def _top(model, shape, kind, output) -> Resolved:
    out = _one(output, "target=None (the top prediction)")
    if kind == "classes":
        return _classes(model, [int(out.argmax())], shape, kind)
    again = lambda: out[None]  # noqa: E731 - the output already computed
    if kind == "dense":
        counts = torch.bincount(out.argmax(0).reshape(-1), minlength=shape[0])
        return _region(model, Region(int(counts.argmax())), shape, again)
    i = int(out[:, 4:].amax(1).argmax())
    return _box(model, Box(i), shape, again)


# --------------------------------------------------------------------------- for the widgets
def _output_of(model, image):
    def output():
        x, _ = model.prepare(image)
        from .hooks import restored

        with restored(model.module), torch.no_grad():
            return model.run(x)
    return output


def check(model, target, image):
    """``target`` as a widget keeps it: a class index for an index or label of a classifier or
    dense output, else the target as given — once it resolves for ``model`` on ``image``
    (:func:`resolve`'s error otherwise)."""
    if target is None or isinstance(target, (str, int, np.integer)) and not isinstance(target, bool):
        return model.target_index(target, image)
    resolve(model, target, _output_of(model, image))
    return target


def name_of(model, target, image) -> str:
    """The target's name as titles show it ("tabby", "a + b", "cat @ 576 px", a callable's
    name)."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) \
            and model.output_shape is not None and len(model.output_shape) == 1:
        return model.label(int(target))
    return resolve(model, target, _output_of(model, image)).name


def class_of(model, target) -> int | None:
    """The class index a target names, when it names one (an index or label, a ``Region``'s or
    ``Box``'s class); else None."""
    if isinstance(target, (Region, Box)):
        target = target.cls
    if isinstance(target, (int, np.integer, str)) and not isinstance(target, bool):
        return model.target_index(target)
    return None


def rectangle(model, cls, rows, cols) -> Region:
    """``Region(cls, mask)`` over the output pixels of rows ``rows[0]…rows[1]`` and columns
    ``cols[0]…cols[1]`` (inclusive) of ``model``'s dense output."""
    shape = model.output_shape
    if shape is None or len(shape) != 3:
        raise ValueError("a rectangle of output pixels needs a dense output N×C×H×W")
    mask = np.zeros(shape[1:], bool)
    mask[int(rows[0]):int(rows[1]) + 1, int(cols[0]):int(cols[1]) + 1] = True
    return Region(cls, mask)
