"""Watch a network learn: :class:`Monitor` keeps snapshots over training, :func:`train` is a
small built-in training loop.

A monitor follows a user's own loop with one call per step (``monitor.step(loss, accuracy)``)
or the loop of :func:`train`. Every ``every`` steps it takes a :class:`Snapshot` of what the
network's design shows: the first convolution's filters, one layer's feature maps and a
Grad-CAM (the engine's own ``grad_cam``) for a few fixed images, and the share of dead units
per layer — units whose output is never above zero on those images (for a convolution
followed by a ReLU, exactly the units the ReLU always silences).

Snapshots are bounded in memory: past ``memory_bytes`` the oldest are written to a folder
(``spill_dir``, a temporary one by default, removed with the monitor) and read back when
asked for. Every snapshot runs inside :func:`~.hooks.restored` and :func:`~.hooks.capture`:
the network is in eval mode while it is measured, no hook stays behind, and its training
flags, ``requires_grad`` and gradients are as they were (Grad-CAM differentiates with
``torch.autograd.grad``, which never touches ``.grad``).
"""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attribution.core import Context, check_map_layer, default_layer
from .attribution.registry import get_method
from .checks import check_float, check_int
from .guard import _put_back, _snapshot
from .hooks import capture, resolve, restored
from .model import Model
from .progress import Progress, check_cancel, is_cancelled

__all__ = ["Monitor", "NonFiniteLoss", "Snapshot", "TrainResult", "small_cnn", "train"]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: training stopped (the message says at which step)."""


# ------------------------------------------------------------------------------ snapshots
@dataclass
class Snapshot:
    """What the network looked like at one step of training."""

    step: int  #: the training step (0: before the first step)
    loss: float  #: the loss of that step (NaN for step 0)
    accuracy: float  #: the accuracy of that step's batch (NaN when not given)
    filters: np.ndarray  #: the first convolution's weights, C_out×C_in×k×k float32
    maps: np.ndarray  #: the chosen layer's feature maps for the fixed images, K×C×h×w float32
    cams: np.ndarray  #: Grad-CAM of each fixed image at the CAM layer, K×h'×w' float32 (≥ 0)
    targets: np.ndarray  #: K int64: the class each Grad-CAM explains (the true class if known)
    predictions: np.ndarray  #: K int64: the network's top class for each fixed image
    dead: dict  #: layer → share of its units never above zero on the fixed images
    weights: dict = field(default_factory=dict)  #: name → array, when the monitor keeps weights
    #: concept → how many units of the dissected layer detect it (when given concepts)
    detectors: dict = field(default_factory=dict)

    @property
    def detector_count(self) -> int:
        """Units of the dissected layer that detect some concept (0 without concepts)."""
        return int(sum(self.detectors.values()))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this snapshot holds."""
        arrays = [self.filters, self.maps, self.cams, self.targets, self.predictions,
                  *self.weights.values()]
        return int(sum(a.nbytes for a in arrays))


class SnapshotStore:
    """Snapshots in step order, at most ``memory_bytes`` of them in memory: past that, the
    oldest ones go to ``.npz`` files in ``folder`` (the newest always stays in memory)."""

    def __init__(self, memory_bytes: int, folder: Path | None = None):
        self.memory_bytes = int(memory_bytes)
        self._folder = folder
        self._own_folder = folder is None
        self._items: list = []  # Snapshot in memory, or Path of a spilled one
        self._steps: list[int] = []
        self._lock = threading.Lock()
        self._cleanup = None

    def _dir(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="cnnwidgets-snapshots-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def add(self, snap: Snapshot) -> None:
        with self._lock:
            self._items.append(snap)
            self._steps.append(snap.step)
            self._spill()

    def _spill(self) -> None:
        held = [i for i, s in enumerate(self._items) if isinstance(s, Snapshot)]
        total = sum(self._items[i].nbytes for i in held)
        for i in held[:-1]:  # oldest first, never the newest
            if total <= self.memory_bytes:
                break
            snap = self._items[i]
            path = self._dir() / f"snapshot-{id(self):x}-{snap.step:09d}.npz"
            _save(snap, path)
            self._items[i] = path
            total -= snap.nbytes

    @property
    def steps(self) -> list[int]:
        """The step of each snapshot, in order."""
        with self._lock:
            return list(self._steps)

    @property
    def in_memory_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._items if isinstance(s, Snapshot))

    @property
    def spilled(self) -> int:
        """How many snapshots are on disk."""
        with self._lock:
            return sum(1 for s in self._items if not isinstance(s, Snapshot))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Snapshot:
        with self._lock:
            item = self._items[i]
        return item if isinstance(item, Snapshot) else _load(item)

    def at_step(self, step: int) -> Snapshot:
        """The snapshot taken at ``step`` (or the last one before it)."""
        steps = self.steps
        if not steps:
            raise IndexError("no snapshot taken yet")
        i = max(0, int(np.searchsorted(steps, step, side="right")) - 1)
        return self[i]

    def close(self) -> None:
        """Remove the spill folder when the store made it."""
        if self._own_folder and self._cleanup is not None:
            self._cleanup()


def _save(snap: Snapshot, path: Path) -> None:
    arrays = {f.name: getattr(snap, f.name) for f in fields(snap)
              if isinstance(getattr(snap, f.name), np.ndarray)}
    dead = list(snap.dead.items())
    np.savez(path, **arrays, _scalars=np.array([snap.step, snap.loss, snap.accuracy]),
             _dead_names=np.array([k for k, _ in dead], dtype=str),
             _dead_values=np.array([v for _, v in dead], dtype=np.float64),
             _weight_names=np.array(list(snap.weights), dtype=str),
             _detector_names=np.array(list(snap.detectors), dtype=str),
             _detector_counts=np.array(list(snap.detectors.values()), dtype=np.int64),
             **{f"_w{i}": v for i, v in enumerate(snap.weights.values())})


def _load(path: Path) -> Snapshot:
    with np.load(path) as z:
        step, loss, accuracy = z["_scalars"].tolist()
        names = z["_weight_names"].tolist()
        return Snapshot(
            step=int(step), loss=float(loss), accuracy=float(accuracy), filters=z["filters"],
            maps=z["maps"], cams=z["cams"], targets=z["targets"], predictions=z["predictions"],
            dead=dict(zip(z["_dead_names"].tolist(), z["_dead_values"].tolist())),
            weights={n: z[f"_w{i}"] for i, n in enumerate(names)},
            detectors=dict(zip(z["_detector_names"].tolist(),
                               (int(v) for v in z["_detector_counts"]))))


# ------------------------------------------------------------------------------ the monitor
def is_item_dataset(data) -> bool:
    """Whether ``data`` is a data set of items (indexable, with a length) rather than an
    iterable of batches (a loader; a list or tuple of batches)."""
    return (hasattr(data, "__getitem__") and hasattr(data, "__len__")
            and not isinstance(data, (list, tuple, torch.Tensor)))


def fixed_images(data, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` images (and their labels) to follow over training: from a data set, the first
    image of each class in turn (so the classes are all shown); from a loader, its first batch."""
    if is_item_dataset(data):
        picked, labels, seen = [], [], set()
        for i in range(min(len(data), 50 * n)):
            x, y = _item(data[i], "the data set")
            if int(y) in seen and len(seen) < n and i < 10 * n:
                continue
            seen.add(int(y))
            picked.append(torch.as_tensor(np.asarray(x), dtype=torch.float32))
            labels.append(int(y))
            if len(picked) == n:
                break
        return torch.stack(picked), torch.tensor(labels)
    first = next(iter(data), None)
    if first is None:
        raise ValueError("the data yielded nothing; pass a data set or a loader with batches")
    x, y = _item(first, "the loader's first batch")
    return torch.as_tensor(x)[:n].float(), torch.as_tensor(y)[:n]


def _item(item, where: str):
    if isinstance(item, dict) and "image" in item and "label" in item:
        return item["image"], item["label"]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"{where} yields {type(item).__name__}, not (images, labels) pairs; a "
                     "training data set must yield (image 3×H×W, class index) items or a loader "
                     "(images N×3×H×W, labels N) batches, e.g. cw.datasets.SyntheticShapes()")


def _wrap(model, images: torch.Tensor | None, classes) -> Model:
    if isinstance(model, Model):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"the monitor needs a cw.Model or a torch.nn.Module, not "
                        f"{type(model).__name__}")
    size = tuple(images.shape[-2:]) if images is not None else (224, 224)
    # a plain network is taken to read images in [0, 1], as cw.datasets.SyntheticShapes gives
    return Model(model, input_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 labels=classes, crop=1.0)


#: activation modules whose output is zero where a unit does not fire
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)


def default_dead_layers(model: Model) -> list[str]:
    """The layers whose dead units a monitor counts: the activation modules that run once per
    pass (a unit is dead there when it is never above zero), else the convolutions."""
    modules = dict(model.module.named_modules())
    acts = [n for n in model.layers() if isinstance(modules.get(n), ACTIVATIONS)]
    return acts or model.layers("conv")


class Monitor:
    """Snapshots of a network over training (see the module docstring).

    ``model``: a ``cw.Model`` or a ``torch.nn.Module`` (taken to read images in [0, 1]).
    ``data``: the training data (a data set of ``(image, class)`` items or a loader of
    batches); the fixed images come from it when ``images`` is not given. ``images``: a
    K×3×H×W tensor of network inputs to follow (``labels``: their classes, for Grad-CAM).
    ``every``: steps between snapshots. ``layer``: the layer whose maps are kept (default:
    the first convolution); ``cam_layer``: Grad-CAM's layer (default: as ``cw.attribute``);
    ``dead_layers``: layers whose dead units are counted (default: every ReLU-like module
    that runs once a pass, or every convolution when the network has none).
    ``memory_bytes``: snapshots kept in memory before the oldest go to ``spill_dir``.
    ``keep_weights``: also keep the weights (``monitor.model_at(step)`` rebuilds the network).
    ``concepts``: a concept data set (``cw.datasets.SyntheticConcepts``…): each snapshot then
    dissects ``concept_layer`` (default: the last convolution) on it with ``cw.dissect`` (at
    ``quantile``) and counts the units that detect each concept (a small dissection).
    ``initial``: take snapshot 0 at once, before training.
    """

    def __init__(self, model, data=None, *, images=None, labels=None, every: int = 10,
                 n_images: int = 4, layer: str | None = None, cam_layer: str | None = None,
                 dead_layers=None, memory_bytes: int = 64 * 2**20, spill_dir=None,
                 keep_weights: bool = False, concepts=None, concept_layer: str | None = None,
                 quantile: float = 0.02, initial: bool = True):
        who = "cw.Monitor"
        self.every = check_int(every, "every", 1, None, who=who)
        n_images = check_int(n_images, "n_images", 1, 64, who=who)
        memory_bytes = check_int(memory_bytes, "memory_bytes", 0, None, who=who)
        self.data = data
        classes = getattr(data, "classes", None)
        if images is None:
            if data is None:
                raise ValueError(f"{who} needs images to follow: pass images=(K×3×H×W tensor) "
                                 "or the training data to take them from")
            images, labels = fixed_images(data, n_images)
        images = torch.as_tensor(images).detach().float()
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"{who}: images must be a K×C×H×W tensor of network inputs, "
                             f"not shape {tuple(images.shape)}")
        self.model = _wrap(model, images, classes)
        self.module = self.model.module
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
        self.display = self.model.denormalize(images).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        convs = self.model.layers("conv")
        if not convs:
            raise ValueError(f"{who}: the network has no convolution that runs")
        self.first_conv = convs[0]
        self.layer = layer or self.first_conv
        self.model.check_layer(self.layer)
        self.cam_layer = (default_layer(self.model) if cam_layer is None
                          else check_map_layer(self.model, cam_layer))
        self.dead_layers = list(default_dead_layers(self.model) if dead_layers is None
                                else dead_layers)
        for n in self.dead_layers:
            self.model.check_layer(n)
        self.keep_weights = bool(keep_weights)
        self.concepts = concepts
        self.concept_layer = concept_layer or convs[-1]
        self.model.check_layer(self.concept_layer)
        self.quantile = check_float(quantile, "quantile", 0, 1, low_open=True, who=who)
        self.snapshots = SnapshotStore(memory_bytes, None if spill_dir is None else Path(spill_dir))
        self.history: list[tuple[int, float, float]] = []  #: (step, loss, accuracy) per step
        self.steps = 0  #: training steps seen
        self.stopped: str | None = None  #: why training stopped early, in words
        self.listeners: list[Callable] = []  #: ``f(monitor, snapshot or None)`` after each step
        self._lock = threading.Lock()
        if initial:
            self.snapshot(loss=float("nan"), accuracy=float("nan"))

    # -------------------------------------------------------------- stepping
    def step(self, loss, accuracy=None) -> Snapshot | None:
        """Record one training step (call it after the optimiser's step); every ``every``
        steps take a snapshot, which is returned. A NaN or infinite loss raises
        :class:`NonFiniteLoss` (and sets ``stopped``): stop training there."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        acc = float("nan") if accuracy is None else (
            float(accuracy.detach()) if isinstance(accuracy, torch.Tensor) else float(accuracy))
        with self._lock:
            self.steps += 1
            step = self.steps
        if not math.isfinite(value):
            self.stopped = (f"the loss became {value} at step {step}; training stopped there "
                            "(a learning rate too high is the usual cause: try one 10× smaller)")
            raise NonFiniteLoss(self.stopped)
        self.history.append((step, value, acc))
        snap = self.snapshot(value, acc) if step % self.every == 0 else None
        for fn in list(self.listeners):
            fn(self, snap)
        return snap

    def snapshot(self, loss: float = float("nan"), accuracy: float = float("nan")) -> Snapshot:
        """Take a snapshot now (at the current step) and keep it."""
        snap = self._measure(loss, accuracy)
        self.snapshots.add(snap)
        return snap

    # -------------------------------------------------------------- measuring
    def _measure(self, loss: float, accuracy: float) -> Snapshot:
        model, module = self.model, self.module
        x = self.images.to(model.device, next(module.parameters()).dtype)
        weight = resolve(module, self.first_conv).weight
        filters = weight.detach().to("cpu", torch.float32).numpy().copy()
        layers = list(dict.fromkeys([self.layer, *self.dead_layers]))
        with restored(module), torch.no_grad(), capture(module, layers) as rec:
            logits = model.scores(x)
        predictions = logits.argmax(1).cpu()
        targets = self.labels if self.labels is not None else predictions
        maps = rec.outputs[self.layer].to("cpu", torch.float32).numpy()
        dead = {}
        for n in self.dead_layers:
            out = rec.outputs[n]
            per_unit = out.transpose(0, 1).reshape(out.shape[1], -1).amax(1) if out.ndim > 1 \
                else out.amax(0)
            dead[n] = float((per_unit <= 0).float().mean())
        cams = np.stack([self._grad_cam(x[i:i + 1], int(targets[i])) for i in range(len(x))])
        weights = ({k: v.detach().to("cpu").numpy().copy()
                    for k, v in module.state_dict().items()} if self.keep_weights else {})
        return Snapshot(self.steps, float(loss), float(accuracy), filters, maps, cams,
                        targets.numpy().astype(np.int64), predictions.numpy().astype(np.int64),
                        dead, weights, self._dissect())

    def _dissect(self) -> dict:
        """concept → number of detector units of ``concept_layer`` (empty without concepts)."""
        if self.concepts is None:
            return {}
        from .dissection import dissect

        result = dissect(self.model, self.concepts, [self.concept_layer], quantile=self.quantile,
                         progress=False, features="recompute")
        counts: dict = {}
        for record in result.detectors(self.concept_layer):
            counts[record.concept] = counts.get(record.concept, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def _grad_cam(self, x1: torch.Tensor, target: int) -> np.ndarray:
        """The engine's Grad-CAM (``cw.attribute``'s ``grad_cam``) of one prepared input."""
        with restored(self.module, frozen=True):
            ctx = Context(self.model, x1.detach(), target, self.cam_layer, "grad_cam")
            raw = get_method("grad_cam").fn(ctx)
        raw = raw[0] if isinstance(raw, tuple) else raw
        return raw.detach().to("cpu", torch.float32).numpy()

    # -------------------------------------------------------------- reading
    def model_at(self, step: int) -> nn.Module:
        """A copy of the network with the weights of the snapshot at ``step`` (needs
        ``keep_weights=True``): e.g. ``cw.compare(monitor.model_at(0), monitor.model_at(500), …)``."""
        snap = self.snapshots.at_step(step)
        if not snap.weights:
            raise ValueError("this monitor keeps no weights; create it with keep_weights=True")
        net = copy.deepcopy(self.module)
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in snap.weights.items()})
        return net

    def curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, losses, accuracies)`` of every step so far."""
        rows = list(self.history)
        if not rows:
            return np.zeros(0, int), np.zeros(0), np.zeros(0)
        s, l, a = zip(*rows)
        return np.asarray(s), np.asarray(l, float), np.asarray(a, float)

    def close(self) -> None:
        """Remove the spilled snapshots' temporary folder."""
        self.snapshots.close()

    def __repr__(self) -> str:
        return (f"cw.Monitor({self.model.name}: {self.steps} steps, {len(self.snapshots)} "
                f"snapshots every {self.every})")


# ------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    """What :func:`train` did."""

    steps: int  #: optimiser steps taken
    epochs: float  #: epochs completed (fractional when stopped early)
    history: list  #: (step, loss, accuracy) per step
    stopped: str | None = None  #: why training stopped early (NaN loss, cancelled), or None

    @property
    def losses(self) -> np.ndarray:
        return np.asarray([h[1] for h in self.history], float)


def _loader(data, batch_size: int, seed: int):
    if is_item_dataset(data):
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                           generator=g)
    return data


def _check_batch(x, y, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"{who}: the data yields images of shape {shape}; expected float "
                         "batches N×C×H×W (a data set of (3×H×W image, class) items)")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0] \
            or y.is_floating_point():
        shape = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
        raise ValueError(f"{who}: the data yields labels of shape {shape} for {x.shape[0]} "
                         "images; expected one integer class index per image")


def _check_scores(y, logits, who: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{who}: the network returns shape {tuple(logits.shape)}; expected "
                         "class scores N×K")
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise ValueError(f"{who}: labels run {int(y.min())}–{int(y.max())} but the network has "
                         f"{logits.shape[1]} outputs")


def train(model, data, epochs: float = 1, lr: float = 0.01, *, monitor: Monitor | None = None,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          batch_size: int = 32, seed: int = 0, cancel=None, progress=None) -> TrainResult:
    """Train a classifier with cross-entropy: plain SGD (with ``momentum``) or Adam, on the CPU
    or wherever the network lives.

    ``data``: a data set of ``(image, class)`` items (shuffled with ``seed``, in batches of
    ``batch_size``) or a loader of ``(images, labels)`` batches. ``epochs`` may be fractional.
    ``monitor``: a :class:`Monitor` (or ``cw.TrainingMonitor``) told every step, and asked for
    a last snapshot where the run ends (when its ``every`` did not fall there). A NaN loss
    stops training, with a warning and ``result.stopped`` saying so, and that step is not
    applied (weights and batch-norm statistics stay those of the step before); ``cancel`` (an
    event) stops it too. The network's training flags are put back as they were (its weights, of
    course, are trained); the global random state is left as it was.
    """
    who = "cw.train"
    module = model.module if isinstance(model, Model) else model
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who} needs a cw.Model or a torch.nn.Module, not {type(model).__name__}")
    scores = model.scores if isinstance(model, Model) else module
    epochs = check_float(epochs, "epochs", 0, None, low_open=True, who=who)
    lr = check_float(lr, "lr", 0, None, low_open=True, who=who)
    batch_size = check_int(batch_size, "batch_size", 1, None, who=who)
    seed = check_int(seed, "seed", 0, None, who=who)
    cancel = check_cancel(cancel)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{who}: every parameter of the network is frozen (requires_grad=False)")
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        raise ValueError(f"{who}: optimizer must be 'sgd', 'adam' or a torch.optim.Optimizer, "
                         f"not {optimizer!r}")
    loader = _loader(data, batch_size, seed)
    try:
        per_epoch = len(loader)
    except TypeError:
        per_epoch = None
    total = None if per_epoch is None else max(1, int(round(epochs * per_epoch)))
    device = next(module.parameters()).device
    saved = _snapshot(module)
    history, steps, stopped = [], 0, None
    with torch.random.fork_rng(devices=[]), Progress(total or 0, "train", cancel=cancel,
                                                     progress=progress) as bar:
        torch.manual_seed(seed)
        try:
            epoch = 0
            while stopped is None and (total is None and epoch < math.ceil(epochs)
                                       or total is not None and steps < total):
                for batch in loader:
                    if is_cancelled(cancel):
                        stopped = "cancelled"
                        break
                    x, y = _item(batch, "the data")
                    if steps == 0:
                        _check_batch(x, y, who)
                    x, y = x.to(device), y.to(device)
                    module.train()
                    # batch-norm statistics as they were: a NaN step must not leave them NaN
                    buffers = [(b, b.detach().clone()) for b in module.buffers()]
                    logits = scores(x)
                    if steps == 0:
                        _check_scores(y, logits, who)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    value = float(loss.detach())
                    if math.isfinite(value):
                        opt.step()
                    else:  # not applied: the weights and statistics stay those of the last step
                        with torch.no_grad():
                            for b, old in buffers:
                                b.copy_(old)
                    steps += 1
                    acc = float((logits.detach().argmax(1) == y).float().mean())
                    history.append((steps, value, acc))
                    bar.advance()
                    try:
                        if monitor is not None:
                            monitor.step(value, acc)
                        elif not math.isfinite(value):
                            raise NonFiniteLoss(
                                f"the loss became {value} at step {steps}; training stopped there "
                                "(a learning rate too high is the usual cause: try one 10× smaller)")
                    except NonFiniteLoss as exc:
                        stopped = str(exc)
                        warnings.warn(f"{who}: {stopped}", RuntimeWarning, stacklevel=2)
                        break
                    if total is not None and steps >= total:
                        break
                epoch += 1
            if (monitor is not None and history and stopped != "cancelled"
                    and not (stopped or "").startswith("the loss became")):
                final = getattr(monitor, "monitor", monitor)  # the widget's engine monitor
                if final.snapshots.steps[-1:] != [final.steps]:
                    final.snapshot(*history[-1][1:])  # where the run ended, whatever ``every``
        finally:
            _put_back(saved)
            opt.zero_grad(set_to_none=True)
    done = steps / per_epoch if per_epoch else float(epoch)
    return TrainResult(steps, done, history, stopped)


def small_cnn(classes: int = 4, width: int = 16, kernel: int = 3, stride: int = 1,
              in_channels: int = 3) -> nn.Sequential:
    """A four-convolution classifier for small images (e.g. 32 px): convolution, batch norm
    and ReLU four times, two max-pools, global max pooling and a linear layer. ``kernel`` and
    ``stride`` set its first layer (the design choice the monitor shows: a large stride
    aliases and keeps fewer positions, a large kernel learns coarser filters). Batch norm and
    the global max make it learn :class:`~.datasets.SyntheticShapes` within a few epochs (without
    them the loss stays on its plateau for many more). Deterministic given the global seed."""
    w = width

    def block(cin, cout, k=3, s=1):
        return [nn.Conv2d(cin, cout, k, stride=s, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, w, kernel, stride), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes),
    )
