"""Data sets of images with a class and object boxes, for :func:`cnnwidgets.evaluate`.

The box data set protocol
-------------------------
``len(dataset)`` and ``dataset[i]``; item ``i`` is a dict with

``"image"``
    the photo as it is (uint8 H×W×3, or a ``PIL.Image``): the model's own resize and crop
    are applied when it is evaluated, and the boxes follow them (:meth:`cw.Model.map_boxes`).
``"boxes"``
    float K×4 ``(x0, y0, x1, y1)`` in the image's pixels, pixel edges (``x1``, ``y1``
    excluded): the boxes of the objects of the item's class.
``"label"``
    the class index.
``"name"`` (optional)
    what to call the image in tables and error messages (its file name).

Optional ``dataset.spec()`` returns a json-able dict that rebuilds the data set
(:func:`box_dataset_from_spec`), stored with an evaluation so a widget can show its images.

:class:`ImageFolderBoxes` reads the ILSVRC validation layout or a CSV of boxes;
:class:`SyntheticBoxes` makes an offline set from the photos shipped with scikit-image.
"""
from __future__ import annotations

import csv
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import check_float, check_int
from .datasets import seeded_index
from .labels import imagenet_synsets

__all__ = ["AnnotationError", "BoxProblem", "ImageFolderBoxes", "OBJECTS", "SyntheticBoxes",
           "box_dataset_from_spec", "read_voc"]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
_SYNSET = re.compile(r"^n\d{8}$")


class AnnotationError(ValueError):
    """An annotation file (or CSV row) that cannot be used; the message names it."""


@dataclass(frozen=True)
class BoxProblem:
    """An annotation skipped by :class:`ImageFolderBoxes`, and why."""

    file: str  #: the annotation file (or ``"file.csv:row"``) or image it concerns
    reason: str  #: what is wrong with it


def read_voc(path, synset_index: dict) -> tuple[str, int, np.ndarray, int]:
    """A PASCAL VOC XML file (the ILSVRC box annotations) → ``(image file stem, class index,
    K×4 boxes as pixel edges, boxes clipped to the image)``.

    VOC corners are 1-based inclusive pixel indices (ILSVRC's are 0-based in practice, but the
    tools that score it, like the official devkit, treat them the VOC way); a box
    ``xmin..xmax`` covers the pixel edges ``[xmin − 1, xmax)``. The class is the synset of the
    objects (every object of an ILSVRC validation image has the image's synset; objects of
    another synset are left out). Raises :class:`AnnotationError` naming the file when it does
    not parse, has no object, names an unknown synset, or a box is empty."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise AnnotationError(f"{path}: not a readable XML file ({exc})") from None
    stem = (root.findtext("filename") or path.stem).strip()
    stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
    size = root.find("size")
    width = height = None
    if size is not None:
        try:
            width, height = int(size.findtext("width")), int(size.findtext("height"))
        except (TypeError, ValueError):
            width = height = None
    objects = root.findall("object")
    if not objects:
        raise AnnotationError(f"{path}: no <object> in the file")
    first = (objects[0].findtext("name") or "").strip()
    if first not in synset_index:
        raise AnnotationError(f"{path}: unknown synset {first!r} (not one of the 1,000 ILSVRC "
                              "classes, cnnwidgets.engine.labels.imagenet_synsets())")
    boxes, clipped = [], 0
    for obj in objects:
        if (obj.findtext("name") or "").strip() != first:
            continue
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise AnnotationError(f"{path}: an object has no complete <bndbox> "
                                  "(xmin, ymin, xmax, ymax numbers)") from None
        box = np.array([x0 - 1, y0 - 1, x1, y1])
        if width and height:
            inside = box.clip(0, [width, height, width, height])
            clipped += int(not np.array_equal(inside, box))
            box = inside
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise AnnotationError(f"{path}: the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty "
                                  "(or outside the image)")
        boxes.append(box)
    return stem, synset_index[first], np.asarray(boxes, np.float32).reshape(-1, 4), clipped


def _load_rgb(path) -> np.ndarray:
    from .images import load_image

    return np.asarray(load_image(Path(path)))


class ImageFolderBoxes:
    """Images with their class and object boxes, from the ILSVRC validation layout or a CSV.

    * **ILSVRC** (``root`` a folder): every image under ``root`` (``.JPEG``, ``.jpg``, ``.png``,
      searched recursively, so class sub-folders work too) is paired by file stem with a PASCAL
      VOC XML file under ``annotations`` (default: ``root`` too, recursively), e.g.
      ``ILSVRC2012_val_00000001.JPEG`` with ``ILSVRC2012_val_00000001.xml``. Synset ids map to
      class indices through the 1,000 ILSVRC synsets in class order (``synsets``; default the
      list shipped with cnnwidgets, :func:`~cnnwidgets.engine.labels.imagenet_synsets`).
    * **CSV** (``root`` a ``.csv`` file): a header ``path,x0,y0,x1,y1,class`` and one row per
      box (several rows for an image with several boxes; the image's class is its first row's).
      ``path`` is relative to the CSV's folder; boxes are pixel edges (``x1``, ``y1``
      excluded); ``class`` a class index or an ILSVRC synset id.

    Bad annotations — an XML file that does not parse or names an unknown synset, an empty
    box, an image without annotation or an annotation without image, a CSV row that is not
    numbers — are never silently lost: with ``errors="skip"`` (default) they are left out,
    listed in ``dataset.problems`` (:class:`BoxProblem`: the file and why) and summed up in one
    warning naming the first files; ``errors="raise"`` refuses the data set with an
    :class:`AnnotationError` naming the first. Boxes reaching outside their image are clipped
    to it (``dataset.clipped`` counts them). ``limit`` keeps the first images (sorted by name).
    """

    def __init__(self, root, annotations=None, *, synsets=None, errors: str = "skip",
                 limit: int | None = None):
        if errors not in ("skip", "raise"):
            raise ValueError(f"errors must be 'skip' or 'raise', not {errors!r}")
        self.root = Path(root)
        self.errors = errors
        self.problems: list[BoxProblem] = []
        self.clipped = 0
        self._spec = {"class": "ImageFolderBoxes", "root": str(self.root),
                      "annotations": None if annotations is None else str(annotations),
                      "synsets": None if synsets is None else list(synsets), "limit": limit}
        names = list(synsets) if synsets is not None else imagenet_synsets()
        self.synsets = names
        self._synset_index = {s: i for i, s in enumerate(names)}
        if self.root.is_file() and self.root.suffix.lower() == ".csv":
            items = self._read_csv(self.root)
        elif self.root.is_dir():
            items = self._read_ilsvrc(self.root, Path(annotations) if annotations else self.root)
        else:
            raise FileNotFoundError(f"{str(self.root)!r} is neither a folder (the ILSVRC layout:"
                                    " images + VOC XML files) nor a .csv file of boxes")
        items.sort(key=lambda it: it[0])
        if limit is not None:
            items = items[: check_int(limit, "limit", 1, None, who="ImageFolderBoxes")]
        self.items = items  # (name, image path, class index, K×4 boxes)
        if self.problems:
            shown = ", ".join(p.file for p in self.problems[:3])
            more = f" and {len(self.problems) - 3} more" if len(self.problems) > 3 else ""
            warnings.warn(f"ImageFolderBoxes: {len(self.problems)} annotation(s) skipped "
                          f"({shown}{more}); dataset.problems says why", stacklevel=2)
        if not self.items:
            raise ValueError(f"no annotated image found in {str(self.root)!r}"
                             + (f" ({len(self.problems)} skipped: dataset.problems)"
                                if self.problems else ""))

    def _problem(self, file, reason: str) -> None:
        if self.errors == "raise":
            raise AnnotationError(f"{file}: {reason}")
        self.problems.append(BoxProblem(str(file), reason))

    def _read_ilsvrc(self, root: Path, annotations: Path) -> list:
        images = {p.stem: p for p in sorted(root.rglob("*"))
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
        items, seen = [], set()
        for xml in sorted(annotations.rglob("*.xml")):
            try:
                stem, label, boxes, clipped = read_voc(xml, self._synset_index)
            except AnnotationError as exc:
                if self.errors == "raise":
                    raise
                self.problems.append(BoxProblem(str(xml), str(exc).split(": ", 1)[-1]))
                seen.add(xml.stem)
                continue
            seen.update((stem, xml.stem))
            image = images.get(stem) or images.get(xml.stem)
            if image is None:
                self._problem(xml, f"no image {stem}.JPEG (or .jpg, .png) under {root}")
                continue
            self.clipped += clipped
            items.append((image.name, str(image), label, boxes))
        for stem, path in images.items():
            if stem not in seen:
                self._problem(path, "no annotation file (.xml) for this image")
        return items

    def _read_csv(self, path: Path) -> list:
        by_path: dict = {}
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            wanted = ["path", "x0", "y0", "x1", "y1", "class"]
            fields = [c.strip() for c in (reader.fieldnames or [])]
            if fields[:6] != wanted:
                raise AnnotationError(f"{path}: the header must be {','.join(wanted)}, not "
                                      f"{','.join(fields) or '(empty)'}")
            for number, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                where = f"{path}:{number}"
                try:
                    box = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
                except ValueError:
                    self._problem(where, "x0, y0, x1, y1 must be numbers")
                    continue
                label = self._class(row["class"])
                if label is None:
                    self._problem(where, f"class {row['class']!r} is neither a class index nor "
                                  "one of the ILSVRC synset ids")
                    continue
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    self._problem(where, f"the box {tuple(box)} is empty (x1 ≤ x0 or y1 ≤ y0)")
                    continue
                image = (path.parent / row["path"]).resolve()
                if not image.is_file():
                    self._problem(where, f"no image at {row['path']!r}")
                    continue
                entry = by_path.setdefault(str(image), [row["path"], label, []])
                entry[2].append(box)
        return [(name, p, label, np.asarray(boxes, np.float32))
                for p, (name, label, boxes) in by_path.items()]

    def _class(self, text: str):
        if _SYNSET.match(text):
            return self._synset_index.get(text)
        try:
            value = int(text)
        except ValueError:
            return None
        return value if value >= 0 else None

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"ImageFolderBoxes({str(self.root)!r}, {len(self)} images"
                + (f", {len(self.problems)} skipped" if self.problems else "") + ")")

    def spec(self) -> dict:
        return dict(self._spec)

    def __getitem__(self, index: int) -> dict:
        name, path, label, boxes = self.items[int(index)]
        image = _load_rgb(path)
        h, w = image.shape[:2]
        inside = boxes.clip(0, np.array([w, h, w, h], np.float32))
        return {"image": image, "boxes": inside, "label": int(label), "name": name}


# ----------------------------------------------------------------------------- offline set

#: Objects cut from scikit-image's bundled photos: name → (data function, crop (x0, y0, x1, y1)
#: in the photo, ImageNet class index, class label).
OBJECTS = {
    "cat": ("chelsea", (30, 0, 420, 300), 285, "Egyptian cat"),
    "espresso": ("coffee", (75, 15, 482, 392), 967, "espresso"),
    "moped": ("stereo_motorcycle", (88, 60, 690, 455), 665, "moped"),
    "rocket": ("rocket", (283, 122, 362, 412), 657, "missile"),
}
#: Backgrounds (scikit-image data functions): textures and a sky photo.
BACKGROUNDS = ("brick", "grass", "gravel", "moon", "hubble_deep_field")


class SyntheticBoxes:
    """An offline data set with exact boxes, made from the photos scikit-image ships.

    Each image is a ``size`` (height, width) piece of a background (a texture — brick, grass,
    gravel, the moon — or the Hubble deep field, randomly cropped, scaled and tinted) with one
    object pasted on it (:data:`OBJECTS`: the cat, the espresso cup, the moped, the rocket,
    each cut from its photo), resized so that its longer side is ``scale`` (a range, as a
    fraction of the image's shorter side) and placed at a random spot at least a tenth of the
    image's size from its edges (a model's centre crop may still cut it). Its box is exactly
    where it was pasted, and its class the object's ImageNet class. With probability
    ``distractor`` a second, different object is pasted where it does not overlap the first:
    its box is not a box of the item's class (a map must find the right object).

    Every item is generated from ``(seed, index)`` alone, so any item can be made in any
    order and in any ``DataLoader`` worker, identically every time. ``objects`` limits the
    objects used (names of :data:`OBJECTS`).
    """

    def __init__(self, n_images: int = 40, size=(256, 320), seed: int = 0, *,
                 scale=(0.45, 0.75), distractor: float = 0.3, objects=None):
        who = "SyntheticBoxes"
        self.n_images = check_int(n_images, "n_images", 1, None, who=who)
        size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        self.size = tuple(check_int(v, "size", 32, 4096, who=who) for v in size)
        self.seed = check_int(seed, "seed", 0, None, who=who)
        lo, hi = (float(v) for v in scale)
        check_float(lo, "scale", 0.05, 1, who=who)
        check_float(hi, "scale", lo, 1, who=who)
        self.scale = (lo, hi)
        self.distractor = check_float(distractor, "distractor", 0, 1, who=who)
        names = list(OBJECTS) if objects is None else list(objects)
        unknown = [n for n in names if n not in OBJECTS]
        if unknown or not names:
            raise ValueError(f"{who}: objects must be names among {list(OBJECTS)}, not {names}")
        self.objects = names
        self._photos: dict = {}

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"SyntheticBoxes(n_images={self.n_images}, size={self.size}, seed={self.seed}, "
                f"objects={self.objects})")

    def spec(self) -> dict:
        return {"class": "SyntheticBoxes", "n_images": self.n_images, "size": list(self.size),
                "seed": self.seed, "scale": list(self.scale), "distractor": self.distractor,
                "objects": self.objects}

    @property
    def labels(self) -> dict:
        """object name → its ImageNet class index."""
        return {n: OBJECTS[n][2] for n in self.objects}

    def _photo(self, name: str):
        from PIL import Image

        if name not in self._photos:
            from skimage import data as skdata  # local import: scikit-image is slow to import

            array = getattr(skdata, name)()
            array = np.asarray(array[0] if isinstance(array, tuple) else array)  # stereo: left
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, 2)
            self._photos[name] = Image.fromarray(np.ascontiguousarray(array[..., :3]))
        return self._photos[name]

    def _background(self, rng) -> np.ndarray:
        from PIL import Image

        H, W = self.size
        photo = self._photo(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
        pw, ph = photo.size
        zoom = rng.uniform(1.0, 1.6) * max(H / ph, W / pw)
        cw_, ch_ = min(pw, int(np.ceil(W / zoom))), min(ph, int(np.ceil(H / zoom)))
        x, y = rng.integers(0, pw - cw_ + 1), rng.integers(0, ph - ch_ + 1)
        piece = photo.crop((x, y, x + cw_, y + ch_)).resize((W, H), Image.Resampling.BILINEAR)
        tint = rng.uniform(0.6, 1.1, size=3)
        return (np.asarray(piece, np.float32) * tint).clip(0, 255).astype(np.uint8)

    def _object(self, name: str, rng):
        from PIL import Image

        function, crop, _, _ = OBJECTS[name]
        piece = self._photo(function).crop(crop)
        H, W = self.size
        longer = rng.uniform(*self.scale) * min(H, W)
        f = longer / max(piece.size)
        w, h = max(8, round(piece.size[0] * f)), max(8, round(piece.size[1] * f))
        return np.asarray(piece.resize((min(w, W), min(h, H)), Image.Resampling.BILINEAR))

    def __getitem__(self, index: int) -> dict:
        index = seeded_index(index, self.n_images)
        rng = np.random.default_rng([self.seed, index])
        H, W = self.size
        image = self._background(rng)
        name = self.objects[int(rng.integers(len(self.objects)))]
        obj = self._object(name, rng)
        h, w = obj.shape[:2]
        mx, my = min(W // 10, (W - w) // 2), min(H // 10, (H - h) // 2)  # off the very edges
        x, y = int(rng.integers(mx, W - w - mx + 1)), int(rng.integers(my, H - h - my + 1))
        image[y:y + h, x:x + w] = obj
        box = (x, y, x + w, y + h)
        others = [n for n in self.objects if n != name]
        if others and rng.random() < self.distractor:
            other = self._object(others[int(rng.integers(len(others)))], rng)
            oh, ow = other.shape[:2]
            for _ in range(20):  # a spot that does not overlap the object
                ox, oy = int(rng.integers(0, W - ow + 1)), int(rng.integers(0, H - oh + 1))
                if ox >= box[2] or ox + ow <= box[0] or oy >= box[3] or oy + oh <= box[1]:
                    image[oy:oy + oh, ox:ox + ow] = other
                    break
        return {"image": image, "boxes": np.array([box], np.float32),
                "label": OBJECTS[name][2], "name": f"{index:05d}-{name}"}


def box_dataset_from_spec(spec: dict):
    """Rebuild a box data set from ``dataset.spec()`` (stored in an evaluation), or ``None``
    when it cannot be rebuilt here (its files are not on this machine)."""
    spec = dict(spec or {})
    kind = spec.pop("class", None)
    if kind == "SyntheticBoxes":
        return SyntheticBoxes(**spec)
    if kind == "ImageFolderBoxes" and Path(spec.get("root", "")).exists():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ImageFolderBoxes(**spec)
        except (OSError, ValueError):
            return None
    return None
