"""Images in, RGB ``PIL.Image`` out: one loader every public call goes through.

``load_image`` accepts a path, raw bytes, a numpy array, a torch tensor or a PIL image and
returns an 8-bit RGB ``PIL.Image``. What can be converted is converted (greyscale, RGBA,
palette, 16-bit, float); what cannot gets a ``ValueError`` that says what to pass instead.
"""
from __future__ import annotations

import io
import os
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


def load_image(source) -> Image.Image:
    """Load ``source`` as an 8-bit RGB ``PIL.Image``.

    ``source`` may be a path (``str`` or ``Path``), ``bytes``, a numpy array (H×W, H×W×1,
    H×W×3 or H×W×4; uint8, uint16 or float in [0, 1]), a torch tensor (the same layouts
    channels-first, optionally with a leading batch dimension of 1) or a ``PIL.Image``.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        image = _open_file(Path(source))
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


def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ValueError(f"no such image file: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; pass the path of one image file")
    return _open_bytes(path.read_bytes(), repr(str(path)))


def _open_bytes(data: bytes, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
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
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError("the image array holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            if lo >= 0.0 and hi <= 255.0:
                a = a / 255.0  # float in [0, 255]
            else:
                raise ValueError(
                    f"float image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1] (or [0, 255]). "
                    "If this is a normalised network input, undo the normalisation first"
                )
        a = np.round(a * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ValueError(
                f"integer image values span [{a.min()}, {a.max()}]; expected uint8 [0, 255] "
                "or uint16"
            )
        a = a.astype(np.uint8)
    else:
        raise ValueError(f"cannot make an image from an array of dtype {a.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(a), mode=mode)


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
    elif image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        image = _from_array(np.clip(a, 0, 1) if a.max() <= 1 else np.clip(a / 255.0, 0, 1))
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
