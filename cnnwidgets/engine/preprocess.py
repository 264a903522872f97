"""Image → network input, with the display image that is the exact crop the network sees."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from .checks import check_float, check_int
from .images import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _triple(values, name: str, low, who: str) -> tuple[float, float, float]:
    """Per-channel statistics: three finite numbers (greater than ``low`` when given)."""
    values = values.tolist() if hasattr(values, "tolist") else values  # a tensor or an array
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{who}: {name} must be three numbers (red, green, blue), "
                         f"not {values!r}")
    return tuple(check_float(v, name, low, None, low_open=True, who=who) for v in values)


class Pixels:
    """An image that is already the crop a network sees: ``values`` 3×H×W, floats in [0, 1]
    (``torch.Tensor``, or an H×W×3 / 3×H×W numpy array). Passed as an ``image`` argument, it
    reaches the network exactly — not resized, not rounded to 8 bits — only normalised, so a
    computed image (an adversarial example, a reconstruction) is explained as it was made.
    Its size must be the model's ``input_size``."""

    def __init__(self, values):
        t = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] != 3 or not t.is_floating_point():
            raise ValueError("cw.Pixels needs float pixels 3×H×W or H×W×3, "
                             f"not {t.dtype} of shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
            raise ValueError("cw.Pixels needs values in [0, 1] (model.denormalize(x) undoes a "
                             "network input's normalisation)")
        self.values = t.detach().to("cpu", torch.float32).contiguous()

    def __cw_pixels__(self) -> torch.Tensor:
        return self.values

    def __repr__(self) -> str:
        return f"cw.Pixels({tuple(self.values.shape)})"


class Preprocess:
    """A model's preprocessing (see :class:`~cnnwidgets.engine.model.Model` for the arguments):
    ``transform`` when given, else resize so that the shorter side is ``input_size / crop``,
    centre-crop to ``input_size`` and normalise with ``mean`` / ``std``."""

    def __init__(self, transform: Callable | None, input_size, mean, std, crop: float):
        who = "cw.Model"
        if transform is not None and not callable(transform):
            raise TypeError(f"{who}: transform must be a callable PIL image → 3×H×W tensor "
                            f"(or None), not {type(transform).__name__}")
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size, input_size)
        if len(input_size) != 2:
            raise ValueError(f"{who}: input_size must be (height, width) or one side, "
                             f"not {input_size!r}")
        self.transform = transform
        self.input_size = tuple(check_int(v, "input_size", 1, None, who=who)
                                for v in input_size)
        self.mean = _triple(mean, "mean", None, who)
        self.std = _triple(std, "std", 0, who)
        self.crop = check_float(crop, "crop", 0, 1, low_open=True, who=who)

    def prepare(self, image) -> tuple[torch.Tensor, np.ndarray]:
        """``(tensor 1×3×H×W, display image H×W×3 float in [0, 1])``; the display image is the
        crop the network sees, so overlays line up. An object with ``__cw_pixels__``
        (:class:`Pixels`, ``cw.Adversarial``) is taken exactly as it is: its pixels are already
        that crop, so they are neither resized nor rounded to 8 bits, only normalised."""
        exact = getattr(type(image), "__cw_pixels__", None)
        if exact is not None:
            return self._exact(exact(image))
        pil = load_image(image)
        crop = self._crop(pil)
        display = np.asarray(crop, dtype=np.float32) / 255.0
        if self.transform is None:
            return self.normalize(torch.from_numpy(display).permute(2, 0, 1)[None]), display
        tensor = self.transform(pil)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (3, 4):
            raise ValueError("the model's transform must return a 3×H×W tensor")
        if tensor.ndim == 3:
            tensor = tensor[None]
        h, w = tensor.shape[-2:]
        if (h, w) != display.shape[:2]:
            display = np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR),
                                 dtype=np.float32) / 255.0
        return tensor, display

    def _exact(self, pixels) -> tuple[torch.Tensor, np.ndarray]:
        """The network input of pixels that are already the crop it sees (3×H×W in [0, 1])."""
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError("__cw_pixels__ must return a 3×H×W float tensor in [0, 1]")
        if tuple(pixels.shape[1:]) != self.input_size:
            raise ValueError(
                f"these pixels are {tuple(pixels.shape[1:])}, made for a network whose input is "
                f"that size; this model's input is {self.input_size}. Pass the original image "
                "(it is resized and cropped as the model expects)")
        pixels = pixels.detach().to("cpu", torch.float32)
        display = pixels.permute(1, 2, 0).numpy().copy()  # never a view of the caller's array
        return self.normalize(pixels[None]), display

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (N×3×H×W) to the network's input space."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._stats(x)
        return x * std + mean

    def crop_geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """For an image of ``width`` × ``height`` pixels: ``(resized width, resized height,
        left, top)`` of the resize and centre crop (the crop is ``input_size`` from
        ``(left, top)`` of the resized image)."""
        H, W = self.input_size
        scale = max(H / self.crop / height, W / self.crop / width)
        rw, rh = max(W, round(width * scale)), max(H, round(height * scale))
        return rw, rh, (rw - W) // 2, (rh - H) // 2

    def map_boxes(self, boxes, width: int, height: int) -> tuple[np.ndarray, int, int]:
        """Boxes ``(x0, y0, x1, y1)`` in the pixels of a ``width`` × ``height`` image (pixel
        edges: ``x1``, ``y1`` excluded, so a box of one pixel is ``(x, y, x + 1, y + 1)``)
        → the same boxes in the pixels of the crop the network sees (``prepare``'s display
        image), through the resize and the centre crop. Returns ``(K×4 float32 boxes, number
        clipped, number dropped)``: a box reaching outside the crop is clipped to it, one left
        less than a pixel wide or high is dropped."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        rw, rh, left, top = self.crop_geometry(int(width), int(height))
        H, W = self.input_size
        sx, sy = rw / width, rh / height
        moved = np.stack([b[:, 0] * sx - left, b[:, 1] * sy - top,
                          b[:, 2] * sx - left, b[:, 3] * sy - top], 1)
        clipped = np.stack([moved[:, 0].clip(0, W), moved[:, 1].clip(0, H),
                            moved[:, 2].clip(0, W), moved[:, 3].clip(0, H)], 1)
        keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
        changed = (np.abs(clipped - moved) > 1e-9).any(1)
        return (clipped[keep].astype(np.float32), int((changed & keep).sum()),
                int((~keep).sum()))

    def _crop(self, pil: Image.Image) -> Image.Image:
        H, W = self.input_size
        rw, rh, left, top = self.crop_geometry(*pil.size)
        resized = pil.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return resized.crop((left, top, left + W, top + H))
