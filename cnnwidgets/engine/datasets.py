"""Concept data sets for network dissection: the protocol, a synthetic set and a Broden reader.

The concept data set protocol
-----------------------------
Any object with these members can be dissected by :func:`cnnwidgets.dissect`:

``dataset.concepts``
    list of concept names; a concept's *index* is its position in this list.
``dataset.categories``
    dict concept name → category name (e.g. ``"color"``, ``"texture"``, ``"object"``).
``len(dataset)`` and ``dataset[i]``
    item ``i`` is a dict with

    ``"image"``
        the picture: ``uint8`` array H×W×3 (or a ``PIL.Image``). It is fed to the network as it
        is (scaled to [0, 1] and normalised as the model expects), so every image of a data set
        should have the same size.
    ``"masks"``
        the pixel annotations, in either form:

        * a list of integer *label maps* h×w, each pixel holding a concept index or −1 for
          "nothing here" (one map per category is usual; several maps let a pixel carry
          several concepts), or
        * a dict concept (index or name) → boolean mask h×w.

        All masks of one item share one size h×w (the *mask size*, which may differ from the
        image size: Broden's masks are half the image's side).
    ``"labels"`` (optional)
        concept indices that cover the whole image (image-level labels such as Broden's scene
        and texture).
    ``"annotated"`` (optional)
        the categories annotated in this image. By default a category is annotated in an
        image when at least one of its concepts occurs there.

Both data sets below return plain numpy arrays, so they work in ``DataLoader`` workers.
"""
from __future__ import annotations

import csv
import difflib
import math
from pathlib import Path

import numpy as np

from .checks import check_int

#: The eleven Broden colour terms, with the RGB value the synthetic set paints them in.
COLORS = {
    "black": (0, 0, 0),
    "blue": (30, 60, 220),
    "brown": (130, 75, 30),
    "green": (40, 170, 50),
    "grey": (128, 128, 128),
    "orange": (255, 140, 0),
    "pink": (255, 160, 200),
    "purple": (130, 40, 170),
    "red": (220, 20, 30),
    "white": (255, 255, 255),
    "yellow": (250, 230, 30),
}
#: Procedural textures (DTD / Broden texture names where one exists).
TEXTURES = ("striped", "dotted", "chequered", "zigzagged", "grid", "wavy")
#: Flat shapes drawn on top.
SHAPES = ("circle", "square", "triangle", "ring")


class SyntheticConcepts:
    """An offline, generated concept data set: colours, textures and shapes with exact masks.

    Every item is generated on demand from ``(seed, index)`` alone, so any item can be made
    independently, in any order and in any ``DataLoader`` worker, and is identical every time.

    An image is a background (a flat colour or a texture), one or two rectangular patches (flat
    or textured) and one or two flat shapes on top. Every pixel is painted in exactly one of the
    eleven Broden colours (:data:`COLORS`, no anti-aliasing), so the masks are exact:

    * ``color``: every pixel is labelled with its colour;
    * ``texture``: pixels of textured regions are labelled with the texture;
    * ``shape``: pixels of shapes are labelled with the shape.

    Items follow the protocol of this module: ``{"image": uint8 size×size×3, "masks": [colour,
    texture, shape label maps (int16, −1 = none)]}``.
    """

    def __init__(self, n_images: int = 500, size: int = 112, seed: int = 0):
        who = "SyntheticConcepts"
        self.n_images = check_int(n_images, "n_images", 1, None, who=who)
        self.size = check_int(size, "size", 16, 4096, who=who)
        self.seed = check_int(seed, "seed", 0, None, who=who)
        self.concepts = [*COLORS, *TEXTURES, *SHAPES]
        self.categories = {
            **{c: "color" for c in COLORS},
            **{t: "texture" for t in TEXTURES},
            **{s: "shape" for s in SHAPES},
        }
        self._palette = np.array(list(COLORS.values()), dtype=np.uint8)

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return f"SyntheticConcepts(n_images={self.n_images}, size={self.size}, seed={self.seed})"

    def spec(self) -> dict:
        """What rebuilds this data set (stored in a dissection result)."""
        return {"class": "SyntheticConcepts", "n_images": self.n_images, "size": self.size,
                "seed": self.seed}

    def __getitem__(self, index: int) -> dict:
        index = seeded_index(index, self.n_images)
        rng = np.random.default_rng([self.seed, index])
        S = self.size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        color = np.zeros((S, S), np.int16)
        texture = np.full((S, S), -1, np.int16)
        shape = np.full((S, S), -1, np.int16)
        n_colors = len(COLORS)

        def paint(region):
            if rng.random() < 0.55:  # textured
                t = int(rng.integers(len(TEXTURES)))
                a, b = rng.choice(n_colors, size=2, replace=False)
                pattern = self._texture(TEXTURES[t], yy, xx, rng)
                color[region & pattern] = a
                color[region & ~pattern] = b
                texture[region] = n_colors + t
            else:
                color[region] = int(rng.integers(n_colors))
                texture[region] = -1
            shape[region] = -1

        paint(np.ones((S, S), bool))
        for _ in range(int(rng.integers(1, 3))):
            h, w = rng.integers(S // 4, (3 * S) // 5, size=2)
            top, left = rng.integers(0, S - h + 1), rng.integers(0, S - w + 1)
            region = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
            paint(region)
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(len(SHAPES)))
            r = float(rng.uniform(0.09, 0.2)) * S
            cy, cx = rng.uniform(r, S - r, size=2)
            region = self._shape(SHAPES[s], yy + 0.5 - cy, xx + 0.5 - cx, r)
            color[region] = int(rng.integers(n_colors))
            texture[region] = -1
            shape[region] = n_colors + len(TEXTURES) + s
        image = self._palette[color]
        return {"image": image, "masks": [color, texture, shape]}

    @staticmethod
    def _texture(name, yy, xx, rng) -> np.ndarray:
        S = yy.shape[0]
        p = int(rng.integers(max(4, S // 14), max(6, S // 6) + 1))  # period in pixels
        oy, ox = rng.integers(0, p, size=2)
        y, x = yy + oy, xx + ox
        half = p / 2
        if name == "striped":
            angle = rng.choice([0.0, 45.0, 90.0, 135.0]) * math.pi / 180
            u = x * math.cos(angle) + y * math.sin(angle)
            return (np.floor(u / half) % 2) == 0
        if name == "dotted":
            dy, dx = (y % p) - half, (x % p) - half
            return dy * dy + dx * dx <= (0.3 * p) ** 2
        if name == "chequered":
            return ((np.floor(y / p) + np.floor(x / p)) % 2) == 0
        if name == "zigzagged":
            tri = np.abs((x / p) % 2 - 1) * p  # triangle wave of amplitude p
            return (np.floor((y + tri) / half) % 2) == 0
        if name == "grid":
            w = max(1, p // 5)
            return ((y % p) < w) | ((x % p) < w)
        if name == "wavy":
            wave = 0.6 * p * np.sin(2 * math.pi * x / (2.5 * p))
            return (np.floor((y + wave) / half) % 2) == 0
        raise ValueError(f"unknown texture {name!r}")

    @staticmethod
    def _shape(name, dy, dx, r) -> np.ndarray:
        if name == "circle":
            return dy * dy + dx * dx <= r * r
        if name == "square":
            return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        if name == "triangle":
            t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
            return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
        if name == "ring":
            d2 = dy * dy + dx * dx
            return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        raise ValueError(f"unknown shape {name!r}")


class SyntheticShapes:
    """A small, offline image classification task: which shape is drawn (``classes``: circle,
    square, triangle, ring), one per image, over a flat or textured background.

    Made from the same drawing as :class:`SyntheticConcepts` (the Broden colours, the same
    shapes and textures), so a network trained on it can also be dissected on those concepts.
    It trains to a visible result in a minute or two on two CPU cores: a four-layer CNN on
    32-px images reaches well above chance within a few epochs of 2,000 images.

    Items are ``(image, label)``: a float32 array 3×size×size in [0, 1] (a network input, no
    normalisation) and the class index, generated from ``(seed, index)`` alone, so any item
    can be made in any order and in any ``DataLoader`` worker. ``textured``: the share of
    images with a textured background (harder: edges everywhere).
    """

    def __init__(self, n_images: int = 2000, size: int = 32, seed: int = 0,
                 textured: float = 0.3):
        who = "SyntheticShapes"
        self.n_images = check_int(n_images, "n_images", 1, None, who=who)
        self.size = check_int(size, "size", 16, 1024, who=who)
        self.seed = check_int(seed, "seed", 0, None, who=who)
        textured = float(textured)
        if not 0.0 <= textured <= 1.0:
            raise ValueError(f"{who}: textured must be a share from 0 to 1, not {textured}")
        self.textured = textured
        self.classes = list(SHAPES)
        self._palette = np.array(list(COLORS.values()), dtype=np.float32) / 255.0

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"SyntheticShapes(n_images={self.n_images}, size={self.size}, seed={self.seed}, "
                f"textured={self.textured})")

    def label(self, index: int) -> int:
        """The class of item ``index`` (without drawing it)."""
        return int(np.random.default_rng([self.seed, int(index), 1]).integers(len(SHAPES)))

    def __getitem__(self, index: int):
        index = int(index)
        if index < 0:
            index += self.n_images
        if not 0 <= index < self.n_images:
            raise IndexError(f"index {index} out of range for {self.n_images} images")
        label = self.label(index)
        rng = np.random.default_rng([self.seed, index, 2])
        S = self.size
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        n_colors = len(COLORS)
        fg, bg, bg2 = (int(v) for v in rng.choice(n_colors, size=3, replace=False))
        color = np.full((S, S), bg, np.int64)
        if rng.random() < self.textured:
            name = TEXTURES[int(rng.integers(len(TEXTURES)))]
            color[SyntheticConcepts._texture(name, yy, xx, rng)] = bg2
        r = float(rng.uniform(0.22, 0.36)) * S
        cy, cx = rng.uniform(r, S - r, size=2)
        shape = SyntheticConcepts._shape(SHAPES[label], yy + 0.5 - cy, xx + 0.5 - cx, r)
        color[shape] = fg
        image = self._palette[color].transpose(2, 0, 1)
        return np.ascontiguousarray(image), label


# ---------------------------------------------------------------------------------- Broden
#: Broden's pixel-level categories (masks in PNG files) and image-level ones (label numbers).
BRODEN_PIXEL = ("color", "object", "part", "material")
BRODEN_IMAGE = ("scene", "texture")


def decode_broden_mask(rgb: np.ndarray) -> np.ndarray:
    """A Broden mask PNG (H×W×3 uint8) → label numbers H×W (R + 256·G)."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        return rgb.astype(np.int64)
    return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)


class Broden:
    """The Broden data set (Bau et al., 2017) from a local copy, e.g. ``broden1_224``.

    ``root`` holds ``index.csv`` (columns image, split, ih, iw, sh, sw, color, object, part,
    material, scene, texture), ``label.csv`` (number, name, category, …), ``category.csv`` and
    the ``images/`` folder. Pixel categories list ``;``-separated mask PNG files whose label
    number is R + 256·G; scene and texture list ``;``-separated label numbers that cover the
    whole image.

    Each label is one concept, in the category where ``label.csv`` counts it most often.
    ``split`` keeps only rows of that split ("train" / "val"); ``categories`` keeps only those
    categories; ``limit`` keeps the first rows (for quick looks).
    """

    def __init__(self, root, split: str | None = None, categories=None, limit: int | None = None):
        self.root = Path(root)
        self._spec = {"class": "Broden", "root": str(self.root), "split": split,
                      "categories": None if categories is None else list(categories),
                      "limit": limit}
        index = self.root / "index.csv"
        if not index.is_file():
            raise FileNotFoundError(
                f"no Broden index at {index}; download Broden (e.g. broden1_224 from "
                "http://netdissect.csail.mit.edu/data/) and pass the folder holding index.csv"
            )
        with open(index, newline="") as f:
            rows = list(csv.DictReader(f))
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
        if limit is not None:
            rows = rows[: check_int(limit, "limit", 1, None, who="Broden")]
        self.rows = rows
        wanted = None if categories is None else set(categories)
        all_categories = [c for c in (*BRODEN_PIXEL, *BRODEN_IMAGE)
                          if c in (rows[0] if rows else {c: None})]
        if (self.root / "category.csv").is_file():
            with open(self.root / "category.csv", newline="") as f:
                listed = [r["name"] for r in csv.DictReader(f)]
            all_categories = [c for c in all_categories if c in listed] or all_categories
        self.category_names = [c for c in all_categories if wanted is None or c in wanted]

        numbers, names, cats = [], [], []
        with open(self.root / "label.csv", newline="") as f:
            for r in csv.DictReader(f):
                number = int(r["number"])
                if number == 0:
                    continue
                cat = self._primary_category(r.get("category", ""))
                if cat not in self.category_names:
                    continue
                numbers.append(number)
                names.append(r["name"])
                cats.append(cat)
        self.concepts = names
        self.categories = dict(zip(names, cats))
        self.label_numbers = np.array(numbers, np.int64)
        size = int(self.label_numbers.max()) + 1 if numbers else 1
        self._lookup = np.full(size, -1, np.int64)  # label number → concept index
        self._lookup[self.label_numbers] = np.arange(len(numbers))

    @staticmethod
    def _primary_category(field: str) -> str:
        best, best_count = "", -1
        for part in filter(None, (p.strip() for p in field.split(";"))):
            if "(" in part:
                name, count = part.split("(", 1)
                count = int(count.rstrip(")") or 0)
            else:
                name, count = part, 0
            if count > best_count:
                best, best_count = name.strip(), count
        return best

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Broden({str(self.root)!r}, {len(self)} images, {len(self.concepts)} concepts)"

    def spec(self) -> dict:
        return dict(self._spec)

    def _concept_indices(self, numbers: np.ndarray) -> np.ndarray:
        numbers = np.asarray(numbers, np.int64)
        out = np.full(numbers.shape, -1, np.int64)
        ok = (numbers > 0) & (numbers < len(self._lookup))
        out[ok] = self._lookup[numbers[ok]]
        return out

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        row = self.rows[int(index)]
        image = np.asarray(Image.open(self.root / "images" / row["image"]).convert("RGB"))
        sh, sw = int(row.get("sh") or image.shape[0]), int(row.get("sw") or image.shape[1])
        masks, labels, annotated = [], [], []
        for cat in self.category_names:
            field = (row.get(cat) or "").strip()
            if not field:
                continue
            annotated.append(cat)
            for entry in field.split(";"):
                entry = entry.strip()
                if not entry:
                    continue
                if cat in BRODEN_IMAGE:
                    labels.extend(int(v) for v in self._concept_indices([int(entry)])
                                  if v >= 0 and self.categories[self.concepts[v]] == cat)
                else:
                    rgb = np.asarray(Image.open(self.root / "images" / entry).convert("RGB"))
                    if rgb.shape[:2] != (sh, sw):
                        raise ValueError(f"mask {entry} is {rgb.shape[:2]}, index.csv says {(sh, sw)}")
                    m = self._concept_indices(decode_broden_mask(rgb))
                    # keep only concepts whose primary category is this one
                    keep = np.zeros(len(self.concepts) + 1, bool)
                    keep[:-1] = [self.categories[c] == cat for c in self.concepts]
                    m[~keep[m]] = -1
                    masks.append(m.astype(np.int32))
        if not masks:
            masks.append(np.full((sh, sw), -1, np.int32))
        return {"image": image, "masks": masks, "labels": labels, "annotated": annotated}


# ---------------------------------------------------------------------------------- helpers


def seeded_index(index, n: int) -> int:
    """``index`` of a generated data set of ``n`` items as a plain int in 0 … n − 1 (negative
    counts from the end); an ``IndexError`` outside."""
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} images")
    return index


def item_image(item) -> np.ndarray:
    """An item's image as uint8 H×W×3."""
    image = item["image"]
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return image


def concept_number(key, concepts, index: dict | None = None) -> int:
    """The index in ``concepts`` of a mask's key (a concept name or index), with an error that
    lists the known concepts when the key names none of them. ``index``: name → index, when
    the caller has it already."""
    if isinstance(key, str):
        found = (index if index is not None else {c: i for i, c in enumerate(concepts or [])})
        if key in found:
            return found[key]
        names = list(concepts or [])
        close = difflib.get_close_matches(key, names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        shown = ", ".join(names[:40]) + (f", … ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(f"a mask names the concept {key!r}, which is not in dataset.concepts"
                         f"{hint}; the known concepts are: {shown or 'none'}. Name a mask by "
                         "one of them (or by its index), or add the concept to "
                         "dataset.concepts and dataset.categories")
    try:
        number = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"a mask's key must be a concept name or index, not {key!r}") from None
    n = len(concepts) if concepts is not None else None
    if number < 0 or (n is not None and number >= n):
        raise ValueError(f"a mask names concept index {number}, out of range: the data set has "
                         f"{n} concepts (indices 0–{(n or 1) - 1}: dataset.concepts)")
    return number


def concept_mask(item, concept: int, concepts=None) -> np.ndarray:
    """The boolean mask (mask size) of concept index ``concept`` in a protocol item; all true
    when the concept is an image-level label of the item."""
    raw = item.get("masks", [])
    if isinstance(raw, dict):
        shape = next(iter(raw.values())).shape if raw else item_image(item).shape[:2]
        out = np.zeros(shape, bool)
        for key, m in raw.items():
            if concept_number(key, concepts) == concept:
                out |= np.asarray(m, bool)
    else:
        maps = [np.asarray(m) for m in raw]
        shape = maps[0].shape if maps else item_image(item).shape[:2]
        out = np.zeros(shape, bool)
        for m in maps:
            out |= m == concept
    if concept < 0:  # "no concept": an empty mask (−1 marks unlabelled pixels in label maps)
        out[:] = False
    elif concept in set(int(v) for v in (item.get("labels") or [])):
        out[:] = True
    return out


def dataset_from_spec(spec: dict):
    """Rebuild a data set from ``dataset.spec()`` (as stored in a dissection result), or
    ``None`` when it cannot be rebuilt here."""
    spec = dict(spec or {})
    kind = spec.pop("class", None)
    if kind == "SyntheticConcepts":
        return SyntheticConcepts(**spec)
    if kind == "Broden" and Path(spec.get("root", "")).joinpath("index.csv").is_file():
        return Broden(**spec)
    return None
