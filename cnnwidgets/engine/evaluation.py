"""``cw.evaluate``: attribution methods measured over a data set of images with boxes — the
weakly supervised localisation experiment of the CAM and CNN Fixations papers, MaxBoxAcc
(Choe et al. 2020), the pointing game and deletion / insertion — and its result,
:class:`Evaluation`.

For every image of a box data set (:mod:`.boxdata`) and every method, the map is computed
for the true class (``targets=("label",)``; ``"top1"`` adds the predicted class) with
:func:`cw.attribute`, the true boxes are mapped into the crop the network sees
(:meth:`cw.Model.map_boxes`), and

* ``"localization"``: the box from the map — the CAM rule at ``threshold`` for every method
  (:func:`.boxes.box_from_map`), the box around the kept points for ``fixations``
  (:func:`.boxes.box_around_points`) — its IoU with the best-matching true box, correct when
  ≥ ``iou_threshold`` (0.5); and the MaxBoxAcc hits over a grid of thresholds
  (:func:`.boxes.box_hits`; fixations use their heat map there, so every method is scored the
  same way);
* ``"pointing"``: :func:`cw.metrics.pointing_game` against the union of the true boxes;
* ``"deletion"`` / ``"insertion"``: the areas of :func:`cw.metrics.deletion` /
  :func:`cw.metrics.insertion` (``steps`` steps).

Nothing image-sized is kept: each image leaves one row of numbers per method and target (and
MaxBoxAcc hit counts, summed), so memory stays flat in the number of images; ``maps_dir``
writes the maps to disk as they come (float16, one ``.npz`` per image) for galleries.

**Streaming, shards and resuming.** The data set is read in blocks of ``batch_size`` images
(a ``DataLoader`` with ``num_workers``; the top-1 predictions of a block in one forward pass).
Under ``torch.distributed`` (``torchrun``) rank r takes blocks r, r + world, … and the rows
are gathered and sorted, the hit counts summed, so the result equals the one-process result
exactly (:mod:`.distributed`, shared with ``cw.dissect``). With ``cache_dir`` each finished
block is written under a key of the weights, the data set and the settings, and a run that
was stopped (or cancelled) picks up where it was.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .attribution.core import attribute
from .attribution.registry import get_method
from .boxes import (DELTAS, best_iou, box_around_points, box_from_map, box_hits, boxes_mask,
                    default_thresholds, max_box_acc)
from .cache import hash_weights
from .checks import check_float, check_int, check_progress
from .distributed import all_gather_cat, all_reduce, rank_and_world
from .hooks import restored
from .images import to_uint8
from .metrics import deletion, insertion, pointing_game
from .model import Model, as_model
from .progress import Progress, check_cancel

__all__ = ["METRICS", "TARGETS", "Evaluation", "EvaluationFileError", "evaluate"]

METRICS = ("localization", "pointing", "deletion", "insertion")
TARGETS = ("label", "top1")
#: which way is better for each summary column
BETTER = {"localization": "higher", "iou": "higher", "maxboxacc": "higher",
          "maxboxacc_v2": "higher", "top1_loc": "higher", "pointing": "higher",
          "deletion": "lower", "insertion": "higher", "accuracy": "higher"}

#: per-row columns and their dtypes (one row per image × method × target kind)
COLUMNS = {
    "index": np.int64,  # data set index
    "method": np.int64,  # position in Evaluation.methods
    "target_kind": np.int64,  # position in Evaluation.targets
    "label": np.int64,  # true class
    "target": np.int64,  # class explained
    "predicted": np.int64,  # top-1 prediction
    "boxes": np.int64,  # true boxes inside the crop
    "clipped": np.int64,  # true boxes clipped by the crop
    "dropped": np.int64,  # true boxes outside the crop, dropped
    "iou": np.float64,  # IoU of the map's box with the best true box (nan: no true box)
    "localization": np.float64,  # 1 / 0: iou ≥ iou_threshold (nan: no true box or off)
    "pointing": np.float64,  # 1 / 0 (nan: no true box or off)
    "deletion": np.float64,  # area under the deletion curve (nan: off)
    "insertion": np.float64,  # area under the insertion curve (nan: off)
    "x0": np.float64, "y0": np.float64, "x1": np.float64, "y1": np.float64,  # the map's box
}
FORMAT = 1


# ----------------------------------------------------------------------------- one image


def _item(item, index: int) -> tuple[np.ndarray, np.ndarray, int, str]:
    """A box data set item → (uint8 image H×W×3, K×4 boxes, label, name)."""
    if not isinstance(item, dict) or not {"image", "boxes", "label"} <= set(item):
        raise TypeError(f"item {index} of the data set is not a dict with 'image', 'boxes' and "
                        "'label' (see cnnwidgets.engine.boxdata for the protocol)")
    image = item["image"]
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    image = to_uint8(image, f"item {index}'s image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"item {index}'s image must be H×W×3, not {image.shape}")
    boxes = np.asarray(item["boxes"], dtype=np.float64).reshape(-1, 4)
    return image, boxes, int(item["label"]), str(item.get("name", index))


class _Loader(torch.utils.data.Dataset):
    """The data set's items as (index, image, boxes, label) — picklable for workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, boxes, label, _ = _item(self.dataset[index], index)
        return index, image, boxes, label


class _Run:
    """The settings of one evaluation, and the work on one image."""

    def __init__(self, model: Model, methods, params, metrics, targets, threshold,
                 iou_threshold, steps, tolerance, thresholds, maps_dir, cancel):
        self.model, self.methods, self.params = model, methods, params
        self.metrics, self.targets = metrics, targets
        self.threshold, self.iou_threshold = threshold, iou_threshold
        self.steps, self.tolerance, self.thresholds = steps, tolerance, thresholds
        self.maps_dir, self.cancel = maps_dir, cancel
        M, K, T, D = len(methods), len(targets), len(thresholds), len(DELTAS)
        self.shape = (M, K, T, D)

    def predict(self, images) -> list[int]:
        """Top-1 of a block of images, one forward pass."""
        x = torch.cat([self.model.prepare(im)[0] for im in images])
        with torch.no_grad():
            return self.model.scores(x).argmax(1).tolist()

    def image(self, index, image, boxes, label, predicted, hits):
        """The rows of one image (a dict of lists per column) and its hits added to ``hits``
        (largest, best, counted)."""
        rows = {k: [] for k in COLUMNS}
        h, w = image.shape[:2]
        crop_boxes, clipped, dropped = self.model.map_boxes(boxes, w, h)
        size = tuple(self.model.input_size)
        maps = {}
        for k, kind in enumerate(self.targets):
            target = label if kind == "label" else predicted
            for m, method in enumerate(self.methods):
                a = attribute(self.model, image, method, target=target, progress=False,
                              cancel=self.cancel, **self.params.get(method, {}))
                if self.maps_dir is not None:
                    maps[f"{method}/{kind}"] = a.map.astype(np.float16)
                box, iou, loc, point = None, math.nan, math.nan, math.nan
                if "localization" in self.metrics:
                    box = box_around_points(np.argwhere(np.asarray(a.raw) > 0)) \
                        if method == "fixations" else box_from_map(a.map, self.threshold)
                    if len(crop_boxes):
                        iou = best_iou(box, crop_boxes)
                        loc = float(iou >= self.iou_threshold)
                        largest, best = box_hits(a.map, crop_boxes, self.thresholds)
                        hits[0][m, k] += largest
                        hits[1][m, k] += best
                        hits[2][m, k] += 1
                if "pointing" in self.metrics and len(crop_boxes):
                    point = float(pointing_game(a.map, boxes_mask(crop_boxes, size),
                                                tolerance=self.tolerance).hit)
                dele = ins = math.nan
                if "deletion" in self.metrics:
                    dele = deletion(self.model, image, a, steps=self.steps, progress=False,
                                    cancel=self.cancel).auc
                if "insertion" in self.metrics:
                    ins = insertion(self.model, image, a, steps=self.steps, progress=False,
                                    cancel=self.cancel).auc
                x0, y0, x1, y1 = box if box is not None else (math.nan,) * 4
                for key, value in (("index", index), ("method", m), ("target_kind", k),
                                   ("label", label), ("target", target),
                                   ("predicted", predicted), ("boxes", len(crop_boxes)),
                                   ("clipped", clipped), ("dropped", dropped), ("iou", iou),
                                   ("localization", loc), ("pointing", point),
                                   ("deletion", dele), ("insertion", ins),
                                   ("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1)):
                    rows[key].append(value)
        if self.maps_dir is not None:
            _save_npz(Path(self.maps_dir) / f"{index:07d}.npz", maps)
        return rows


def _save_npz(path: Path, arrays: dict) -> None:
    """Write arrays to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _empty_block(shape):
    return ({k: np.zeros(0, t) for k, t in COLUMNS.items()},
            np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape[:2], np.int64))


def _block_arrays(rows: dict, hits) -> tuple:
    return ({k: np.asarray(rows[k], COLUMNS[k]) for k in COLUMNS}, *hits)


def _save_block(path: Path, block) -> None:
    cols, largest, best, counted = block
    _save_npz(path, {**{f"col/{k}": v for k, v in cols.items()}, "largest": largest,
                     "best": best, "counted": counted})


def _load_block(path: Path, shape):
    """A cached block, or None when it is unreadable or does not fit (then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            cols = {k: z[f"col/{k}"].astype(t) for k, t in COLUMNS.items()}
            largest, best, counted = z["largest"], z["best"], z["counted"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if largest.shape != shape or best.shape != shape or counted.shape != shape[:2]:
        return None
    return cols, largest.astype(np.int64), best.astype(np.int64), counted.astype(np.int64)


def _fingerprint(model: Model, dataset, settings: dict) -> str:
    h = hashlib.blake2b(digest_size=12)
    hash_weights(h, model.module)
    spec = dataset.spec() if hasattr(dataset, "spec") else {"class": type(dataset).__name__}
    h.update(json.dumps([spec, len(dataset), model.mean, model.std, list(model.input_size),
                         model.crop, settings], sort_keys=True, default=str).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- evaluate


def _method_list(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    methods = [get_method(m).name for m in methods]
    if not methods:
        raise ValueError("give at least one method (cw.methods() lists them)")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {methods}")
    return methods


def evaluate(
    model,
    dataset,
    methods=("grad_cam",),
    metrics=METRICS,
    *,
    targets=("label",),
    threshold: float = 0.2,
    iou_threshold: float = 0.5,
    steps: int = 50,
    tolerance: float = 15.0,
    n_thresholds: int = 100,
    params: dict | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    cache_dir=None,
    maps_dir=None,
    cancel=None,
    progress=None,
) -> "Evaluation":
    """Measure attribution ``methods`` on a box data set (see the module docstring).

    ``methods``: names (``cw.methods()``), e.g. ``["grad_cam", "fixations"]``; ``params``:
    method → its parameters. ``metrics``: any of ``"localization"``, ``"pointing"``,
    ``"deletion"``, ``"insertion"``. ``targets``: ``"label"`` (the true class, the
    "GT-known" setting) and / or ``"top1"`` (the predicted class). ``threshold``: the CAM
    rule's fraction of the map's maximum (0.2). ``iou_threshold``: IoU a correct box reaches
    (0.5). ``steps``: of the deletion / insertion curves. ``tolerance``: of the pointing game,
    in pixels. ``n_thresholds``: the MaxBoxAcc grid τ = 0, 1/n, …. ``batch_size``,
    ``num_workers``: blocks of images read by a ``DataLoader``. ``cache_dir``: finished blocks
    are kept there and a repeated or interrupted run resumes from them. ``maps_dir``: the
    maps are written there, one ``.npz`` per image. ``cancel`` / ``progress``: as
    ``cw.dissect`` (progress counts images; only rank 0 shows a bar).

    The model is put back as it was (weights, training flags, no hook left). Returns an
    :class:`Evaluation`, the same on every rank.
    """
    model = as_model(model, "cw.evaluate")
    who = "cw.evaluate"
    cancel = check_cancel(cancel)
    progress = check_progress(progress, who=who)
    methods = _method_list(methods)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be some of {METRICS}, not {metrics}")
    targets = [targets] if isinstance(targets, str) else list(dict.fromkeys(targets))
    if not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"targets must be some of {TARGETS}, not {targets}")
    threshold = check_float(threshold, "threshold", 0, 1, who=who)
    iou_threshold = check_float(iou_threshold, "iou_threshold", 0, 1, low_open=True, who=who)
    steps = check_int(steps, "steps", 1, 100_000, who=who)
    tolerance = check_float(tolerance, "tolerance", 0, None, who=who)
    n_thresholds = check_int(n_thresholds, "n_thresholds", 1, 10_000, who=who)
    batch_size = check_int(batch_size, "batch_size", 1, None, who=who)
    num_workers = check_int(num_workers, "num_workers", 0, None, who=who)
    params = {get_method(k).name: dict(v) for k, v in (params or {}).items()}
    unknown = [k for k in params if k not in methods]
    if unknown:
        raise ValueError(f"params are given for {unknown}, which are not among the methods "
                         f"{methods}")
    params = {m: get_method(m).resolve(p) for m, p in params.items()}
    n = len(dataset)
    if n == 0:
        raise ValueError("the data set is empty")

    thresholds = default_thresholds(n_thresholds)
    settings = {"metrics": metrics, "threshold": threshold, "iou_threshold": iou_threshold,
                "steps": steps, "tolerance": tolerance, "n_thresholds": n_thresholds,
                "params": params}
    run = _Run(model, methods, params, metrics, targets, threshold, iou_threshold, steps,
               tolerance, thresholds, maps_dir, cancel)
    rank, world = rank_and_world()
    blocks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = list(range(rank, len(blocks), world))
    folder = None
    if cache_dir is not None:
        key = _fingerprint(model, dataset, {**settings, "methods": methods,
                                            "targets": targets, "batch_size": batch_size})
        folder = Path(cache_dir) / f"evaluation-{key}"
        folder.mkdir(parents=True, exist_ok=True)
    done: dict[int, tuple] = {}
    if folder is not None:
        for b in mine:
            block = _load_block(folder / f"block-{b:06d}.npz", run.shape) \
                if (folder / f"block-{b:06d}.npz").is_file() else None
            if block is not None:
                done[b] = block
    todo = [b for b in mine if b not in done]
    bar = Progress(sum(len(blocks[b]) for b in mine), "evaluate", cancel=cancel,
                   progress=progress, what="cw.evaluate", show=rank == 0)
    with bar, restored(model.module):
        bar.advance(sum(len(blocks[b]) for b in done))
        loader = torch.utils.data.DataLoader(_Loader(dataset), batch_sampler=[blocks[b] for b in todo],
                                             num_workers=num_workers, collate_fn=list)
        for b, items in zip(todo, bar.each(loader)):
            predicted = run.predict([it[1] for it in items])
            rows = {k: [] for k in COLUMNS}
            hits = [np.zeros(run.shape, np.int64), np.zeros(run.shape, np.int64),
                    np.zeros(run.shape[:2], np.int64)]
            for (index, image, boxes, label), p in zip(items, predicted):
                bar.check()
                for key, values in run.image(index, image, boxes, label, p, hits).items():
                    rows[key].extend(values)
                bar.advance()
            done[b] = _block_arrays(rows, hits)
            if folder is not None:
                _save_block(folder / f"block-{b:06d}.npz", done[b])
    parts = [done[b] for b in sorted(done)] or [_empty_block(run.shape)]
    cols = {k: np.concatenate([p[0][k] for p in parts]) for k in COLUMNS}
    largest, best, counted = (sum(p[i] for p in parts) for i in (1, 2, 3))
    cols, largest, best, counted = _merge(cols, largest, best, counted)
    spec = dataset.spec() if hasattr(dataset, "spec") else {"class": type(dataset).__name__}
    settings.update({"model": model.name, "dataset": spec, "n_images": n,
                     "input_size": list(model.input_size), "crop": model.crop,
                     "mean": list(model.mean), "std": list(model.std),
                     "maps_dir": None if maps_dir is None else str(maps_dir)})
    return Evaluation(methods, targets, cols, largest, best, counted, thresholds, settings)


def _merge(cols, largest, best, counted):
    """Every rank's rows gathered and sorted (image, target kind, method); hits summed."""
    if rank_and_world()[1] > 1:
        cols = {k: all_gather_cat(torch.from_numpy(np.ascontiguousarray(v)), 0,
                                  -1 if v.dtype.kind == "i" else math.nan).numpy()
                for k, v in cols.items()}
        largest, best, counted = (all_reduce(torch.from_numpy(a)).numpy()
                                  for a in (largest, best, counted))
    order = np.lexsort((cols["method"], cols["target_kind"], cols["index"]))
    return {k: v[order] for k, v in cols.items()}, largest, best, counted


# ----------------------------------------------------------------------------- intervals


def wilson(hits: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion ``hits / n``."""
    if n <= 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def mean_interval(values) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t 95% interval of the mean (nan values left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) == 1:
        return mean, math.nan, math.nan
    from scipy.special import stdtrit  # a dependency of scikit-image

    half = float(stdtrit(len(v) - 1, 0.975)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- the result


class EvaluationFileError(ValueError):
    """A file that is not a readable evaluation (corrupt, truncated, written by something
    else); the message names it and what is wrong."""


class Evaluation:
    """What :func:`evaluate` measured.

    ``rows(method=None, target="label")``: the per-image rows (a dict of columns, see
    :data:`COLUMNS`); ``summary(target)``: per method, each metric's value with its 95%
    interval; ``table(fmt)``: that summary as text or markdown; ``plot()``: bars with their
    intervals; ``ranked(method, metric)``: image indices best first; ``save(path)`` /
    ``Evaluation.load(path)``: a lossless round trip (npz + json, never pickle).
    """

    def __init__(self, methods, targets, columns, hits_largest, hits_best, counted,
                 thresholds, settings):
        self.methods = list(methods)
        self.targets = list(targets)
        self.columns = {k: np.asarray(columns[k], COLUMNS[k]) for k in COLUMNS}
        self.hits_largest = np.asarray(hits_largest, np.int64)
        self.hits_best = np.asarray(hits_best, np.int64)
        self.counted = np.asarray(counted, np.int64)
        self.thresholds = np.asarray(thresholds, np.float64)
        self.settings = dict(settings)

    @property
    def metrics(self) -> list[str]:
        return list(self.settings.get("metrics", METRICS))

    @property
    def n_images(self) -> int:
        return int(len(np.unique(self.columns["index"])))

    def __repr__(self) -> str:
        return (f"Evaluation({self.n_images} images, methods={self.methods}, "
                f"metrics={self.metrics}, targets={self.targets})")

    def _kind(self, target: str) -> int:
        if target not in self.targets:
            raise ValueError(f"no target {target!r} in this evaluation; it has {self.targets}")
        return self.targets.index(target)

    def _method(self, method: str) -> int:
        if method not in self.methods:
            raise ValueError(f"no method {method!r} in this evaluation; it has {self.methods}")
        return self.methods.index(method)

    def rows(self, method: str | None = None, target: str = "label") -> dict:
        """The per-image rows of one target kind (and one method), as a dict of columns."""
        keep = self.columns["target_kind"] == self._kind(target)
        if method is not None:
            keep &= self.columns["method"] == self._method(method)
        return {k: v[keep] for k, v in self.columns.items()}

    def images(self) -> dict:
        """Per image (one entry per data set index, sorted): ``index``, ``label``,
        ``predicted``, ``boxes``, ``clipped``, ``dropped``."""
        first = (self.columns["method"] == 0) & (self.columns["target_kind"] == 0)
        return {k: self.columns[k][first] for k in ("index", "label", "predicted", "boxes",
                                                     "clipped", "dropped")}

    def summary(self, target: str = "label") -> list[dict]:
        """One dict per method: ``method``, ``n`` (images), and per metric a triple
        ``(value, low, high)`` — the 95% interval: Wilson's for shares (localisation, pointing,
        top-1 localisation, MaxBoxAcc at its best threshold — which does not allow for the
        choice of threshold), Student's t for means (IoU, deletion, insertion; MaxBoxAccV2:
        the mean of its three δ's Wilson bounds). Also ``maxboxacc_threshold``, the best τ."""
        k = self._kind(target)
        out = []
        for m, method in enumerate(self.methods):
            r = self.rows(method, target)
            entry = {"method": method, "n": int(len(r["index"]))}
            correct = (r["predicted"] == r["label"]).astype(np.float64)
            entry["accuracy"] = (float(correct.mean()) if len(correct) else math.nan,
                                 *wilson(correct.sum(), len(correct)))
            if "localization" in self.metrics:
                has = r["boxes"] > 0
                loc = r["localization"][has]
                entry["localization"] = (float(loc.mean()) if len(loc) else math.nan,
                                         *wilson(loc.sum(), len(loc)))
                entry["iou"] = mean_interval(r["iou"][has])
                top1 = loc * correct[has]
                entry["top1_loc"] = (float(top1.mean()) if len(top1) else math.nan,
                                     *wilson(top1.sum(), len(top1)))
                n = int(self.counted[m, k])
                acc, tau = max_box_acc(self.hits_largest[m, k], n, self.thresholds)
                d = DELTAS.index(0.5)
                best_tau = int(np.argmax(self.hits_largest[m, k][:, d])) if n else 0
                entry["maxboxacc"] = (float(acc[d]),
                                      *wilson(self.hits_largest[m, k][best_tau, d], n))
                entry["maxboxacc_threshold"] = float(tau[d])
                acc2, _ = max_box_acc(self.hits_best[m, k], n, self.thresholds)
                bounds = [wilson(self.hits_best[m, k][:, j].max(), n) for j in range(len(DELTAS))]
                entry["maxboxacc_v2"] = (float(acc2.mean()), float(np.mean([b[0] for b in bounds])),
                                         float(np.mean([b[1] for b in bounds])))
            if "pointing" in self.metrics:
                p = r["pointing"][r["boxes"] > 0]
                entry["pointing"] = (float(p.mean()) if len(p) else math.nan,
                                     *wilson(p.sum(), len(p)))
            for name in ("deletion", "insertion"):
                if name in self.metrics:
                    entry[name] = mean_interval(r[name])
            out.append(entry)
        return out

    #: summary columns in table order, with their headings
    HEADINGS = {"localization": "loc (IoU≥{iou:g} @ τ={tau:g})", "iou": "mean IoU",
                "maxboxacc": "MaxBoxAcc", "maxboxacc_v2": "MaxBoxAccV2",
                "top1_loc": "top-1 loc", "pointing": "pointing",
                "deletion": "deletion ↓", "insertion": "insertion ↑"}

    def table(self, fmt: str = "text", target: str = "label", digits: int = 3) -> str:
        """The summary as a table (``fmt``: "text" or "markdown"): one row per method, each
        metric as ``value [low, high]``."""
        if fmt not in ("text", "markdown"):
            raise ValueError(f"fmt must be 'text' or 'markdown', not {fmt!r}")
        summary = self.summary(target)
        keys = [k for k in self.HEADINGS if summary and k in summary[0]]
        heads = ["method", "n"] + [self.HEADINGS[k].format(
            iou=self.settings.get("iou_threshold", 0.5), tau=self.settings.get("threshold", 0.2))
            for k in keys]

        def cell(v):
            value, low, high = v
            if math.isnan(value):
                return "—"
            if math.isnan(low):
                return f"{value:.{digits}f}"
            return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

        body = [[e["method"], str(e["n"])] + [cell(e[k]) for k in keys] for e in summary]
        if fmt == "markdown":
            lines = ["| " + " | ".join(heads) + " |",
                     "| " + " | ".join(["---"] + ["---:"] * (len(heads) - 1)) + " |"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines)
        widths = [max(len(r[i]) for r in [heads] + body) for i in range(len(heads))]
        fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt_row(heads), fmt_row(["-" * w for w in widths])]
                         + [fmt_row(r) for r in body])

    def ranked(self, method: str, metric: str = "iou", target: str = "label") -> np.ndarray:
        """Data set indices of the images with a value for ``metric`` (a row column: "iou",
        "localization", "pointing", "deletion", "insertion"), best first (ties: lower index
        first)."""
        if metric not in ("iou", "localization", "pointing", "deletion", "insertion"):
            raise ValueError(f"metric must be a per-image column (iou, localization, pointing, "
                             f"deletion, insertion), not {metric!r}")
        r = self.rows(method, target)
        values = r[metric]
        ok = ~np.isnan(values)
        values, index = values[ok], r["index"][ok]
        key = values if BETTER[metric] == "lower" else -values
        return index[np.lexsort((index, key))]

    def plot(self, fig=None, *, target: str = "label"):
        """Bars of each metric per method with their 95% intervals; returns the figure."""
        from ..render.evaluation import plot_evaluation  # matplotlib only when plotting

        return plot_evaluation(self.bars(target), fig=fig)

    def bars(self, target: str = "label") -> dict:
        """What :meth:`plot` draws: ``{"methods": [...], "metrics": [(key, heading, better)],
        "values" / "low" / "high": methods × metrics arrays}``."""
        summary = self.summary(target)
        keys = [k for k in ("localization", "maxboxacc", "pointing", "deletion", "insertion")
                if summary and k in summary[0]]
        arr = lambda i: np.array([[e[k][i] for k in keys] for e in summary])  # noqa: E731
        return {"methods": self.methods,
                "metrics": [(k, self.HEADINGS[k].split(" (")[0], BETTER[k]) for k in keys],
                "values": arr(0), "low": arr(1), "high": arr(2)}

    def example(self, index: int, method: str, target: str = "label", *, model=None,
                dataset=None) -> dict:
        """One image of the evaluation as a gallery shows it: ``image`` (the crop the network
        sees, H×W×3 in [0, 1]), ``map`` (from ``maps_dir`` when the run wrote one, else
        computed again when ``model`` is given, else None), ``box`` (the map's box), ``truth``
        (the true boxes in the crop), ``row`` (its numbers), ``title`` and ``source`` (the
        data set's image as it is). ``dataset``: the
        evaluated data set (default: rebuilt from its spec when it can be)."""
        from .boxdata import box_dataset_from_spec
        from .preprocess import Preprocess

        r = self.rows(method, target)
        where = np.flatnonzero(r["index"] == int(index))
        if not len(where):
            raise ValueError(f"image {index} is not in this evaluation")
        row = {k: v[where[0]].item() for k, v in r.items()}
        dataset = dataset if dataset is not None else box_dataset_from_spec(
            self.settings.get("dataset"))
        if dataset is None:
            raise ValueError("the evaluated data set cannot be rebuilt here; pass dataset=")
        image, boxes, _, name = _item(dataset[int(index)], int(index))
        if model is not None:
            model = as_model(model, "Evaluation.example")
            display = model.prepare(image)[1]
            truth = model.map_boxes(boxes, image.shape[1], image.shape[0])[0]
        else:
            pre = Preprocess(None, self.settings.get("input_size", (224, 224)),
                             self.settings.get("mean", (0.485, 0.456, 0.406)),
                             self.settings.get("std", (0.229, 0.224, 0.225)),
                             self.settings.get("crop", 0.875))
            display = pre.prepare(image)[1]
            truth = pre.map_boxes(boxes, image.shape[1], image.shape[0])[0]
        heat = None
        folder = self.settings.get("maps_dir")
        file = Path(folder) / f"{int(index):07d}.npz" if folder else None
        if file is not None and file.is_file():
            with np.load(file, allow_pickle=False) as z:
                key = f"{method}/{target}"
                heat = z[key].astype(np.float32) if key in z.files else None
        if heat is None and model is not None:
            params = self.settings.get("params", {}).get(method, {})
            heat = attribute(model, image, method, target=int(row["target"]), progress=False,
                             **params).map
        box = tuple(row[k] for k in ("x0", "y0", "x1", "y1"))
        parts = [f"#{int(index)} {name}"]
        if not math.isnan(row["iou"]):
            parts.append(f"IoU {row['iou']:.2f}")
        for k in ("pointing", "deletion", "insertion"):
            if not math.isnan(row[k]):
                parts.append(f"{k[:3]} {row[k]:.2f}")
        return {"image": display, "source": image, "map": heat, "box": None if math.isnan(box[0]) else box,
                "truth": truth, "row": row, "title": " · ".join(parts)}

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write to ``path`` (``.npz`` added when missing; metadata as json inside)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"format": FORMAT, "kind": "cnnwidgets.Evaluation", "methods": self.methods,
                "targets": self.targets, "settings": self.settings}
        arrays = {"meta": np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8),
                  "hits_largest": self.hits_largest, "hits_best": self.hits_best,
                  "counted": self.counted, "thresholds": self.thresholds,
                  **{f"col/{k}": v for k, v in self.columns.items()}}
        _save_npz(path, arrays)
        return path

    @classmethod
    def load(cls, path) -> "Evaluation":
        """Read what :meth:`save` wrote; anything else raises :class:`EvaluationFileError`
        naming the file. Pickled objects are never loaded."""
        path = Path(path)
        if not path.exists() and path.with_name(path.name + ".npz").is_file():
            path = path.with_name(path.name + ".npz")
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation at {str(path)!r}")

        def bad(what):
            return EvaluationFileError(f"{str(path)!r} is not a readable evaluation: {what}; "
                                       "it is written by evaluation.save(path)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files:
                    raise bad("it has no 'meta' entry")
                meta = json.loads(z["meta"].tobytes().decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("kind") != "cnnwidgets.Evaluation":
                    raise bad("its metadata does not describe an evaluation")
                if meta.get("format") != FORMAT:
                    raise bad(f"its format is {meta.get('format')!r}, this cnnwidgets reads "
                              f"{FORMAT}")
                missing = [k for k in ["hits_largest", "hits_best", "counted", "thresholds",
                                       *(f"col/{c}" for c in COLUMNS)] if k not in z.files]
                if missing:
                    raise bad(f"arrays {missing[:4]} are missing")
                cols = {c: z[f"col/{c}"] for c in COLUMNS}
                arrays = [z[k] for k in ("hits_largest", "hits_best", "counted", "thresholds")]
        except EvaluationFileError:
            raise
        except ValueError as exc:
            if "pickle" in str(exc):
                raise bad("it holds pickled objects, which are never loaded") from None
            raise bad(f"the archive is damaged ({exc})") from None
        except (OSError, EOFError, KeyError, UnicodeDecodeError, zipfile.BadZipFile,
                zlib.error) as exc:
            raise bad(f"the archive is damaged ({type(exc).__name__}: {exc})") from None
        lengths = {len(v) for v in cols.values()}
        if len(lengths) != 1 or any(v.ndim != 1 for v in cols.values()):
            raise bad("its row columns differ in length")
        M, K = len(meta["methods"]), len(meta["targets"])
        if arrays[0].shape[:2] != (M, K) or arrays[1].shape != arrays[0].shape \
                or arrays[2].shape != (M, K) or arrays[0].shape[2] != len(arrays[3]):
            raise bad("its hit counts do not match its methods, targets and thresholds")
        return cls(meta["methods"], meta["targets"], cols, *arrays, meta["settings"])

    def equals(self, other: "Evaluation") -> bool:
        """Same methods, targets, settings and numbers, bit for bit (nan equal to nan)."""
        return (self.methods == other.methods and self.targets == other.targets
                and json.dumps(self.settings, sort_keys=True, default=str)
                == json.dumps(other.settings, sort_keys=True, default=str)
                and all(np.array_equal(self.columns[k], other.columns[k],
                                       equal_nan=self.columns[k].dtype.kind == "f")
                        for k in COLUMNS)
                and np.array_equal(self.hits_largest, other.hits_largest)
                and np.array_equal(self.hits_best, other.hits_best)
                and np.array_equal(self.counted, other.counted)
                and np.array_equal(self.thresholds, other.thresholds))
