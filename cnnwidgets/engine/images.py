"""Images in, RGB ``PIL.Image`` out: one loader every public call goes through.

``load_image`` accepts a path, raw bytes, a numpy array, a torch tensor or a PIL image and
returns an 8-bit RGB ``PIL.Image``. What can be converted is converted (greyscale, RGBA,
palette, 16-bit, float); what cannot gets a ``ValueError`` that says what to pass instead.

The rules (the README's "Inputs" section states them for users):

* **Float pixels are in [0, 1]**, whatever the float type (float16, bfloat16, float32,
  float64). Values at most :data:`FLOAT_TOLERANCE` outside (a resize overshoot, colour jitter)
  are clipped to [0, 1]; values further out are refused with an error that says how to scale
  (``image / 255`` for 0–255 floats, ``model.denormalize(x)`` for a normalised network input)
  — never guessed, so a slightly bright image is never read as a 0–255 one.
* Integers are 0–255 (uint16: 0–65535); booleans are black / white.
* Files are checked before they are read: only regular files (no devices, pipes or sockets),
  not empty, at most :data:`MAX_FILE_BYTES`; a file over :data:`SNIFF_BYTES` is only read
  once its first bytes name an image format. URLs are not fetched (download first).
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: Images with more pixels than this are refused before decoding (decompression bombs).
MAX_PIXELS = 100_000_000
#: Images are shrunk (keeping the aspect ratio) so that their longer side is at most this.
MAX_SIDE = 4096
#: Images smaller than this on either side are refused: a CNN cannot see anything in them.
MIN_SIDE = 8
#: Float images are in [0, 1]; values at most this far outside are clipped, further out refused.
FLOAT_TOLERANCE = 0.1
#: Image files larger than this are refused before reading (1 GiB).
MAX_FILE_BYTES = 2**30
#: Files up to this size are read whole and tried with every format PIL knows; larger ones are
#: only opened when their first bytes name a format (a bounded read of the header).
SNIFF_BYTES = 32 * 2**20
_TENSOR_DTYPES = (torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                  torch.int32, torch.int64, torch.bool, torch.uint16)
#: Prefixes of strings that are URLs, not paths.
URL_SCHEMES = ("http://", "https://", "ftp://", "ftps://", "s3://", "gs://", "data:")

_SAMPLES = {
    # name: (scikit-image data function, description)
    "cat": ("chelsea", "Chelsea the cat"),
    "coffee": ("coffee", "a cup of coffee"),
    "astronaut": ("astronaut", "astronaut Eileen Collins"),
    "rocket": ("rocket", "a rocket on the launch pad"),
}


def sample_images() -> list[str]:
    """Names accepted by :func:`sample_image`."""
    return sorted(_SAMPLES)


def sample_image(name: str = "cat") -> Image.Image:
    """An offline sample photo (from scikit-image's bundled data) as an RGB ``PIL.Image``."""
    key = str(name).lower()
    aliases = {"chelsea": "cat"}
    key = aliases.get(key, key)
    if key not in _SAMPLES:
        raise ValueError(
            f"no sample image called {name!r}; choose one of {', '.join(sample_images())}"
        )
    from skimage import data as skdata  # local import: scikit-image is slow to import

    array = getattr(skdata, _SAMPLES[key][0])()
    return load_image(array)


def sample_variants(n: int = 200, seed: int = 0, names=None) -> list[Image.Image]:
    """``n`` offline photos for measurements over many images (``cw.prune_curve``): the
    sample photos (``names``, default all of them) in turn, each with a seeded random crop
    (60–100% of each side), a horizontal flip half of the time, and brightness, contrast and
    saturation changed by up to ±25%. The same ``seed`` gives the same images."""
    from PIL import ImageEnhance

    from .checks import check_int

    n = check_int(n, "n", 1, 100_000, who="sample_variants")
    seed = check_int(seed, "seed", 0, 2**32 - 1, who="sample_variants")
    names = sample_images() if names is None else [str(v) for v in names]
    photos = [sample_image(name) for name in names]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw_, ch = (max(MIN_SIDE, int(round(d * rng.uniform(0.6, 1.0)))) for d in (w, h))
        x0, y0 = int(rng.integers(0, w - cw_ + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x0, y0, x0 + cw_, y0 + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
        out.append(image)
    return out


def load_image(source) -> Image.Image:
    """Load ``source`` as an 8-bit RGB ``PIL.Image``.

    ``source`` may be a path (``str`` or ``Path``), ``bytes``, a numpy array (H×W, H×W×1,
    H×W×3 or H×W×4; uint8, uint16 or float), a torch tensor (the same layouts channels-first,
    optionally with a leading batch dimension of 1) or a ``PIL.Image``.

    Value ranges: integers are 0–255 (uint16 0–65535); **floats (any precision) are 0–1**.
    A float image up to 0.1 outside [0, 1] (a resize overshoot, colour jitter) is clipped;
    one further outside is a ``ValueError`` saying how to scale it: divide 0–255 floats by
    255, undo the normalisation of a network input (``model.denormalize(x)``).
    Refused with a ``ValueError`` that says what to do: an empty array or string, a URL (it
    is not fetched: download the file first), a path that is not a regular file (a folder,
    a device such as ``/dev/zero``, a pipe), an empty file or one over 1 GiB, a file that is
    not an image, NaN or infinite pixels, images under 8×8 or over 100 megapixels.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        image = _open_file(_as_path(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open_bytes(bytes(source), "the bytes given")
    elif isinstance(source, torch.Tensor):
        image = _from_array(_tensor_to_hwc(source))
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    else:
        raise ValueError(
            f"cannot load an image from a {type(source).__name__}; pass a file path, bytes, "
            "a numpy array (H×W×3), a torch tensor (3×H×W) or a PIL.Image"
        )
    return _normalise(image)


def _as_path(source) -> Path:
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise ValueError("an empty string is not an image path; pass the path of an image "
                         "file (or cw.sample_image('cat') for a sample photo)")
    if text.strip().lower().startswith(URL_SCHEMES):
        raise ValueError(
            f"{text[:80]!r} is a URL; URLs are not fetched. Download the file first, e.g. "
            "urllib.request.urlretrieve(url, 'image.jpg'), and pass its path"
        )
    return Path(text).expanduser()


def _open_file(path: Path) -> Image.Image:
    what = repr(str(path))
    try:
        info = path.stat()  # follows links: the file they name is what counts
    except FileNotFoundError:
        raise ValueError(f"no such image file: {what}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{what} is a folder; pass the path of one image file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} is not a regular file (a device, pipe or socket); "
                         "pass the path of an image file")
    if info.st_size == 0:
        raise ValueError(f"{what} is empty (0 bytes); it holds no image")
    if info.st_size > MAX_FILE_BYTES:
        raise ValueError(f"{what} is {info.st_size / 2**30:.1f} GiB, over the "
                         f"{MAX_FILE_BYTES / 2**30:.0f} GiB limit for an image file; "
                         "shrink or convert it first")
    with open(path, "rb") as f:
        if info.st_size <= SNIFF_BYTES:
            return _open_bytes(f.read(SNIFF_BYTES + 1), what)
        # a large file: only formats that its first bytes name, so that a large file that is
        # no image is refused after reading its header, not read whole by a lenient decoder
        return _open_stream(f, what, _formats_named_by(f.read(16)))


def _formats_named_by(prefix: bytes) -> list[str]:
    """The PIL formats whose signature check accepts these first bytes of a file (formats
    without a signature, such as TGA, are left out)."""
    Image.init()
    found = []
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue
        try:
            answer = accept(prefix)
        except Exception:  # an odd plugin: skip it
            continue
        if answer and not isinstance(answer, str):  # a str is PIL's "maybe, with a warning"
            found.append(name)
    return found


def _open_bytes(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ValueError(f"{what} is empty; it holds no image")
    return _open_stream(io.BytesIO(data), what)


def _open_stream(stream, what: str, formats: list[str] | None = None) -> Image.Image:
    if formats is not None and not formats:
        raise ValueError(
            f"{what} is not an image file PIL can read (PNG, JPEG, BMP, TIFF, WebP, …)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=formats)
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise ValueError(
                    f"{what} is {w}×{h} pixels, over the {MAX_PIXELS:,}-pixel limit "
                    "(a possible decompression bomb); shrink it before loading"
                )
            # draft() lets JPEG decode at a reduced scale: huge photos load fast.
            if max(w, h) > 2 * MAX_SIDE:
                image.draft("RGB", (MAX_SIDE, MAX_SIDE))
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ValueError(
                f"{what} is not an image file PIL can read (PNG, JPEG, BMP, TIFF, WebP, …)"
            ) from None
        raise ValueError(
            f"{what} is too large to decode safely (a possible decompression bomb); "
            "shrink it before loading"
        ) from None
    except OSError as exc:
        raise ValueError(f"{what} could not be decoded as an image: {exc}") from None
    return image


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # exact; numpy has no bfloat16
    elif t.is_complex() or t.dtype not in _TENSOR_DTYPES:
        raise ValueError(
            f"cannot make an image from a tensor of dtype {t.dtype}; pass floats in [0, 1] "
            "(float16, bfloat16, float32, float64) or integers in [0, 255] (uint8), e.g. "
            "tensor.float() / 255 for other integer images"
        )
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(
                f"got a batch of {t.shape[0]} images (tensor shape {tuple(t.shape)}); "
                "pass one image: tensor[0]"
            )
        t = t[0]
    if t.ndim == 2:
        return t.numpy()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        return t.permute(1, 2, 0).numpy()
    raise ValueError(
        f"a tensor of shape {tuple(tensor.shape)} is not an image; expected 3×H×W, 1×3×H×W "
        "or H×W (channels first, values in [0, 1] for floats, [0, 255] for uint8)"
    )


def _from_array(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.size == 0:
        raise ValueError(f"the array is empty (shape {a.shape}); an image needs pixels, e.g. "
                         "H×W×3 with H, W ≥ 8")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an array of shape {a.shape} is not an image; expected H×W (grey), H×W×3 (RGB) "
            "or H×W×4 (RGBA)"
        )
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ValueError(
            f"an array of {a.shape[1]}×{a.shape[0]} pixels is over the {MAX_PIXELS:,}-pixel "
            "limit; shrink it first"
        )
    a = to_uint8(a)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


def to_uint8(array, what: str = "the image") -> np.ndarray:
    """Pixels of any numeric dtype as uint8 0–255, by the module's rules: bool → 0 / 255,
    uint16 → the top 8 bits, other integers must be 0–255, floats are 0–1
    (:func:`float_unit_range`). Anything else is a ``ValueError`` that says what to pass."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        return np.round(float_unit_range(a, what) * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"integer pixel values must be in [0, 255] (uint16: [0, 65535]), but {what} "
                f"spans [{a.min()}, {a.max()}]; rescale it, e.g. image.astype(float) / image.max()"
            )
        return a.astype(np.uint8)
    raise ValueError(f"cannot make an image from an array of dtype {a.dtype}; pass uint8 "
                     "(0–255), uint16 or floats in [0, 1]")


def float_unit_range(a: np.ndarray, what: str = "the image") -> np.ndarray:
    """A float image's pixels in [0, 1] (float32): values at most :data:`FLOAT_TOLERANCE`
    outside are clipped; NaN, ±inf or values further outside are a ``ValueError`` that says
    how to scale them. Floats are never guessed to be 0–255."""
    a = np.asarray(a, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        bad = int(a.size - finite.sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value{'s' * (bad != 1)}; "
                         "replace them first, e.g. np.nan_to_num(image)")
    lo, hi = float(a.min()), float(a.max())
    if lo >= -FLOAT_TOLERANCE and hi <= 1.0 + FLOAT_TOLERANCE:
        return np.clip(a, 0.0, 1.0)
    clip = "if they only overshoot [0, 1], clip them: np.clip(image, 0, 1)"
    if lo >= 0.0 and hi <= 255.0 + FLOAT_TOLERANCE:
        hint = f"if they are 0–255, divide by 255 (image / 255) or pass uint8; {clip}"
    elif lo < 0.0 and hi <= 255.0:
        hint = ("if this is a normalised network input, undo the normalisation: "
                f"model.denormalize(x), i.e. x * std + mean; {clip}")
    else:
        hint = "rescale them to [0, 1], e.g. (image - image.min()) / (image.max() - image.min())"
    raise ValueError(
        f"float pixel values must be in [0, 1] (up to {FLOAT_TOLERANCE} outside is clipped), "
        f"but {what} spans [{lo:.4g}, {hi:.4g}]; {hint}"
    )


def _normalise(image: Image.Image) -> Image.Image:
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise ValueError(
            f"the image is {w}×{h} pixels; at least {MIN_SIDE}×{MIN_SIDE} is needed "
            "(the network input is resized, but a tiny image holds nothing to see)"
        )
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":  # 32-bit float pixels: the same [0, 1] rule as float arrays
        image = _from_array(np.asarray(image, dtype=np.float32))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image
