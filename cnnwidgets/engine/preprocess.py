"""Image → network input, with the display image that is the exact crop the network sees."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from .images import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess:
    """A model's preprocessing (see :class:`~cnnwidgets.engine.model.Model` for the arguments):
    ``transform`` when given, else resize so that the shorter side is ``input_size / crop``,
    centre-crop to ``input_size`` and normalise with ``mean`` / ``std``."""

    def __init__(self, transform: Callable | None, input_size, mean, std, crop: float):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.transform = transform
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.crop = float(crop)

    def prepare(self, image) -> tuple[torch.Tensor, np.ndarray]:
        """``(tensor 1×3×H×W, display image H×W×3 float in [0, 1])``; the display image is the
        crop the network sees, so overlays line up."""
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

    def _crop(self, pil: Image.Image) -> Image.Image:
        H, W = self.input_size
        w, h = pil.size
        scale = max(H / self.crop / h, W / self.crop / w)
        rw, rh = max(W, round(w * scale)), max(H, round(h * scale))
        resized = pil.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (rw - W) // 2, (rh - H) // 2
        return resized.crop((left, top, left + W, top + H))
