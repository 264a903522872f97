"""Compare two networks unit by unit and layer by layer: ``cw.compare``.

Two measures, both computed from the activations of the same images:

* **Unit matching** (in the spirit of Li et al., "Convergent learning", ICLR 2016): a unit's
  activations over every image and every position of a common grid form one long vector; each
  unit of network A is matched with the unit of network B whose vector correlates best with
  its own (Pearson correlation, signed: an anti-correlated unit is not a match). The two
  layers' maps are resampled bilinearly to the common grid first (the larger of the two grids,
  at most ``max_grid`` a side, 16 by default: larger grids cost more than the forward passes
  and add little, the deep layers being 7×7), so layers of different resolution can be matched.
* **Linear CKA** (Kornblith et al., "Similarity of neural network representations revisited",
  ICML 2019): each image's whole layer output (C·h·w values) is one example; with X (n × p) and
  Y (n × q) centred over the n images,
  ``CKA = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)``, computed through the n × n Gram matrices
  (``‖Yᵀ X‖²_F = tr(K L)`` with ``K = X Xᵀ``, ``L = Y Yᵀ``), so layers of any width cost
  one n × n matrix each. It is 1 for the same representation, for an orthogonal transform or
  an isotropic scaling of it, and near 0 for unrelated ones; with few images (n of a few dozen)
  it is biased upwards, so compare values measured on the same images only.

Both networks see the same images, each prepared by its own model (its input size and
normalisation): where the input sizes differ each image is resized for each network, and the
result says so in ``notes``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_int
from .hooks import LayerNotFoundError, capture, restored
from .model import Model, as_model

__all__ = ["Comparison", "UnitMatches", "compare", "correlation", "default_images", "gram", "linear_cka",
           "cka_from_grams", "match_units", "standardised", "unit_correlation"]


# ------------------------------------------------------------------------------ the maths
def gram(features: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix H X Xᵀ H of ``features`` (n examples × any shape), float64."""
    x = features.reshape(features.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:
    """Linear CKA from two centred Gram matrices (:func:`gram`): tr(K L) / (‖K‖_F ‖L‖_F).
    NaN when either representation is constant over the examples."""
    hsic = float((k * l).sum())  # tr(K L) for symmetric K, L
    norm = float(torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))
    return hsic / norm if norm > 0 else float("nan")


def linear_cka(x, y) -> float:
    """Linear CKA between two representations of the same n examples: ``x`` n × p and ``y``
    n × q (arrays or tensors; any further dimensions are flattened into the features)."""
    x, y = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same examples in both representations: "
                         f"{x.shape[0]} rows against {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least two examples (it centres over them)")
    return cka_from_grams(gram(x), gram(y))


def standardised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column of ``x`` (M rows × C units) centred and scaled to norm 1 (float32), and a
    mask of the columns that are constant (left at zero)."""
    z = x.to(torch.float32)
    z = z - z.mean(dim=0, keepdim=True)
    norm = z.norm(dim=0)
    dead = norm <= 1e-6 * max(1.0, float(norm.max()) if norm.numel() else 1.0)
    return z / torch.where(dead, torch.ones_like(norm), norm), dead


def correlation(za, dead_a, zb, dead_b) -> torch.Tensor:
    """Pearson correlations Ca × Cb from two :func:`standardised` matrices; NaN for constant
    units."""
    corr = (za.T @ zb).to(torch.float64)
    corr[dead_a] = float("nan")
    corr[:, dead_b] = float("nan")
    return corr


def unit_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every unit of ``a`` (M × Ca) and every unit of ``b``
    (M × Cb) over the M rows: a Ca × Cb matrix; NaN in the rows or columns of units that are
    constant over the M rows."""
    return correlation(*standardised(a), *standardised(b))


# ------------------------------------------------------------------------------ results
@dataclass
class UnitMatches:
    """The best partner in layer ``layer_b`` of network B for each unit of ``layer_a`` of A."""

    layer_a: str  #: the layer of network A
    layer_b: str  #: the layer of network B
    partner: np.ndarray  #: Ca int64: the best-correlated unit of B (−1: the unit of A is constant)
    score: np.ndarray  #: Ca float32: that correlation, in [−1, 1] (NaN where partner is −1)
    grid: tuple  #: (h, w) of the common grid the maps were resampled to

    def order(self) -> np.ndarray:
        """Units of A, best matched first (constant units last)."""
        key = np.where(np.isnan(self.score), -np.inf, self.score)
        return np.argsort(-key, kind="stable")


@dataclass
class Comparison:
    """What :func:`compare` measured."""

    name_a: str  #: network A's name
    name_b: str  #: network B's name
    layers_a: list  #: the layers of A compared, in the order given
    layers_b: list  #: the layers of B compared
    cka: np.ndarray  #: len(layers_a) × len(layers_b) linear CKA, float64
    images: int  #: how many images the measures are over
    input_sizes: tuple  #: ((H, W) of A, (H, W) of B)
    notes: list = field(default_factory=list)  #: what was adapted (resized images…), in words
    pairs: dict = field(default_factory=dict)  #: (layer_a, layer_b) → :class:`UnitMatches`

    def matches(self, layer_a: str | None = None, layer_b: str | None = None) -> UnitMatches:
        """The unit matches of a layer pair; ``layer_b=None``: the layer of B most similar to
        ``layer_a`` by CKA; ``layer_a=None``: A's first layer."""
        la = self.layers_a[0] if layer_a is None else layer_a
        if la not in self.layers_a:
            raise LayerNotFoundError(f"layer {la!r} of network A was not compared; "
                                     f"compared: {', '.join(self.layers_a)}")
        lb = self.best_layer(la) if layer_b is None else layer_b
        if lb not in self.layers_b:
            raise LayerNotFoundError(f"layer {lb!r} of network B was not compared; "
                                     f"compared: {', '.join(self.layers_b)}")
        if (la, lb) not in self.pairs:
            raise KeyError(f"units of the pair ({la!r}, {lb!r}) were not matched "
                           "(compare(..., match=False) matches none)")
        return self.pairs[(la, lb)]

    def best_layer(self, layer_a: str) -> str:
        """The layer of B with the highest CKA against ``layer_a`` of A."""
        row = self.cka[self.layers_a.index(layer_a)]
        return self.layers_b[int(np.nanargmax(row))] if np.isfinite(row).any() else self.layers_b[0]

    def __repr__(self) -> str:
        return (f"cw.Comparison({self.name_a} vs {self.name_b}: {len(self.layers_a)}×"
                f"{len(self.layers_b)} layers over {self.images} images)")


# ------------------------------------------------------------------------------ the run
def default_images(image=None) -> list:
    """Images to compare networks on when none are given: ``image`` (when it is not one of
    the sample photos), the sample photos and their mirror images. CKA centres over the
    images, so a handful reads high whatever the networks: give more where you can."""
    from PIL import ImageOps

    from .images import load_image, sample_image, sample_images

    photos = [sample_image(n) for n in sample_images()]
    images = photos + [ImageOps.mirror(p) for p in photos]
    if image is None:
        return images
    first = load_image(image)
    same = any(first.size == p.size and first.tobytes() == p.tobytes() for p in photos)
    return images if same else [first, *images]


def _default_layers(model: Model, count: int = 4) -> list[str]:
    """``count`` convolutions spread evenly through the network (the layer menu's ones)."""
    listed = model.layers()
    known = set(listed)
    convs = [n for n in model.layers("conv") if n in known] or listed
    if len(convs) <= count:
        return convs
    picks = np.linspace(0, len(convs) - 1, count).round().astype(int)
    return [convs[i] for i in dict.fromkeys(picks.tolist())]


def _check_layers(model: Model, layers, which: str) -> list[str]:
    if layers is None:
        return _default_layers(model)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError(f"layers_{which.lower()} is empty; name at least one layer of network "
                         f"{which} (model.layers() lists them)")
    for name in layers:
        try:
            model.check_layer(name)
        except (LayerNotFoundError, ValueError) as exc:
            raise type(exc)(f"network {which} ({model.name}): {exc}") from None
    return layers


def _as_maps(t: torch.Tensor, layer: str, who: str) -> torch.Tensor:
    """A layer's batch output as N×C×h×w (vectors N×C become N×C×1×1)."""
    if t.ndim == 2:
        return t[:, :, None, None]
    if t.ndim != 4:
        raise ValueError(f"{who}: layer {layer!r} outputs shape {tuple(t.shape[1:])} per image, "
                         "neither feature maps C×h×w nor a vector; pick another layer")
    return t


def _activations(model: Model, images: list, layers: list[str], batch_size: int,
                 who: str) -> dict[str, torch.Tensor]:
    """Every layer's output (N×C×h×w, CPU) for the images, in batches of forward passes."""
    x = torch.cat([model.prepare(im)[0] for im in images])
    out: dict[str, list] = {n: [] for n in layers}
    with restored(model.module), torch.no_grad():
        for start in range(0, len(x), batch_size):
            with capture(model.module, layers) as rec:
                model.scores(x[start:start + batch_size])
            for n in layers:
                if n not in rec.outputs:
                    raise ValueError(f"{who}: layer {n!r} did not produce a tensor output")
                out[n].append(rec.outputs[n].to("cpu", torch.float32))
    return {n: _as_maps(torch.cat(v), n, who) for n, v in out.items()}


def _grid(a: torch.Tensor, b: torch.Tensor, max_grid: int) -> tuple[int, int]:
    return (min(max(a.shape[2], b.shape[2]), max_grid), min(max(a.shape[3], b.shape[3]), max_grid))


def _on_grid(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """N×C×h×w resampled to the grid (bilinear) and laid out as (N·gh·gw) × C."""
    if tuple(t.shape[2:]) != tuple(grid):
        shrink = t.shape[2] > grid[0] or t.shape[3] > grid[1]  # average, do not alias
        t = F.interpolate(t, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def match_units(a: torch.Tensor, b: torch.Tensor, layer_a: str, layer_b: str,
                max_grid: int = 16, cache: dict | None = None) -> UnitMatches:
    """Match the units of two layers' outputs over the same images (N×Ca×h×w, N×Cb×h'×w').
    ``cache``: a dict that keeps each layer's standardised maps per grid across pairs."""
    grid = _grid(a, b, max_grid)
    cache = {} if cache is None else cache

    def prepared(t, key):
        if (key, grid) not in cache:
            cache[(key, grid)] = standardised(_on_grid(t, grid))
        return cache[(key, grid)]

    corr = correlation(*prepared(a, ("a", layer_a)), *prepared(b, ("b", layer_b)))
    filled = torch.nan_to_num(corr, nan=-np.inf)
    score, partner = filled.max(dim=1)
    none = ~torch.isfinite(score)
    partner[none] = -1
    score[none] = float("nan")
    return UnitMatches(layer_a, layer_b, partner.numpy().astype(np.int64),
                       score.numpy().astype(np.float32), grid)


def compare(model_a, model_b, images, layers_a: Sequence[str] | str | None = None,
            layers_b: Sequence[str] | str | None = None, *, match: bool = True,
            max_grid: int = 16, batch_size: int = 16) -> Comparison:
    """Compare two networks on the same ``images``: unit matches and a layer × layer CKA matrix.

    ``images``: a list of images (anything ``cw.load_image`` takes), at least two (CKA
    centres over them); each network prepares them as it expects. ``layers_a`` /
    ``layers_b``: layer names (default: four convolutions spread through each network).
    ``match``: also match units for every layer pair (``result.matches(layer_a, layer_b)``);
    ``max_grid``: the largest side of the common grid maps are resampled to for matching.
    The networks are put back exactly as they were, and no hook stays behind.

    >>> photos = [cw.sample_image(n) for n in cw.sample_images()]
    >>> result = cw.compare(model, other, photos, ["features.0"], ["conv1"])
    >>> result.cka                    # 1 × 1
    >>> result.matches("features.0")  # .partner, .score per unit of features.0
    """
    a = as_model(model_a, "cw.compare (model_a)")
    b = as_model(model_b, "cw.compare (model_b)")
    max_grid = check_int(max_grid, "max_grid", 1, 4096, who="cw.compare")
    batch_size = check_int(batch_size, "batch_size", 1, None, who="cw.compare")
    if isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple)):
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        else:
            raise TypeError("cw.compare: images must be a list of images (paths, PIL images, "
                            "arrays…), at least two, e.g. [cw.sample_image(n) for n in cw.sample_images()]")
    images = list(images)
    if len(images) < 2:
        raise ValueError(f"cw.compare needs at least two images (CKA centres over them), got "
                         f"{len(images)}; e.g. pass [cw.sample_image(n) for n in cw.sample_images()]")
    layers_a = _check_layers(a, layers_a, "A")
    layers_b = _check_layers(b, layers_b, "B")
    notes = []
    if tuple(a.input_size) != tuple(b.input_size):
        (ha, wa), (hb, wb) = a.input_size, b.input_size
        note = (f"the networks take different input sizes (A {ha}×{wa}, B {hb}×{wb}): each "
                "image was resized for each network, so their maps cover the same view at "
                "different resolutions")
        notes.append(note)
        warnings.warn(f"cw.compare: {note}", stacklevel=2)
    acts_a = _activations(a, images, layers_a, batch_size, "network A")
    acts_b = _activations(b, images, layers_b, batch_size, "network B")
    grams_a = {n: gram(t) for n, t in acts_a.items()}
    grams_b = {n: gram(t) for n, t in acts_b.items()}
    cka = np.array([[cka_from_grams(grams_a[la], grams_b[lb]) for lb in layers_b]
                    for la in layers_a], dtype=np.float64)
    pairs = {}
    if match:
        cache: dict = {}
        for la in layers_a:
            for lb in layers_b:
                pairs[(la, lb)] = match_units(acts_a[la], acts_b[lb], la, lb, max_grid, cache)
    return Comparison(a.name, b.name, layers_a, layers_b, cka, len(images),
                      (tuple(a.input_size), tuple(b.input_size)), notes, pairs)
