"""Image parameterisations for feature visualisation (Olah et al. 2017; Lucid's defaults).

A parameterisation owns the tensor the optimiser changes and maps it to an image batch
N×3×H×W in [0, 1]:

* ``"pixel"`` — the pixels themselves (init N(0, 0.01)), before colour decorrelation and sigmoid;
* ``"fft"`` — a real-FFT spectrum (init N(0, 0.01)) scaled by 1 / frequency, inverse FFT'd
  (orthonormal) and divided by 4 (Lucid's constant), which whitens the gradient so the optimiser
  favours low frequencies;

then, for both, optional decorrelated colour (the channels are mixed by the square root of
ImageNet's 3×3 colour-correlation matrix, normalised by its largest column norm) and a sigmoid
to [0, 1].
"""
from __future__ import annotations

import torch

#: square root of ImageNet's colour correlation matrix (Lucid's ``color_correlation_svd_sqrt``)
COLOR_CORRELATION_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02],
     [0.27, 0.00, -0.05],
     [0.27, -0.09, 0.03]]
)


def color_matrix() -> torch.Tensor:
    """The colour-correlation square root divided by its largest column norm."""
    return COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()


def decorrelate(t: torch.Tensor) -> torch.Tensor:
    """Mix channels of N×3×H×W ``t``: ``out[:, i] = Σ_j M[i, j] t[:, j]`` with ``M = color_matrix()``."""
    m = color_matrix().to(t.device, t.dtype)
    return torch.einsum("ij,njhw->nihw", m, t)


def fft_frequencies(h: int, w: int) -> torch.Tensor:
    """|f| of each coefficient of ``torch.fft.rfft2`` on an h×w image (cycles per pixel)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class ImageParam(torch.nn.Module):
    """Base class: ``forward()`` → image batch N×3×H×W in [0, 1]; ``params()`` → what to optimise."""

    def __init__(self, batch: int, size: tuple, decorrelated: bool):
        super().__init__()
        self.batch, self.size, self.decorrelated = batch, tuple(size), bool(decorrelated)

    def raw(self) -> torch.Tensor:  # pre-colour, pre-sigmoid image
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        t = self.raw()
        if self.decorrelated:
            t = decorrelate(t)
        return torch.sigmoid(t)


class PixelParam(ImageParam):
    """The (pre-sigmoid) pixels are the parameters."""

    def __init__(self, batch=1, size=(128, 128), decorrelated=True, sd=0.01, generator=None):
        super().__init__(batch, size, decorrelated)
        h, w = self.size
        self.pixels = torch.nn.Parameter(sd * torch.randn(batch, 3, h, w, generator=generator))

    def raw(self):
        return self.pixels


class FFTParam(ImageParam):
    """A real-FFT spectrum scaled by ``1 / max(|f|, 1 / max(h, w)) ** decay`` is the parameter."""

    MAGIC = 4.0

    def __init__(self, batch=1, size=(128, 128), decorrelated=True, sd=0.01, decay=1.0,
                 generator=None):
        super().__init__(batch, size, decorrelated)
        h, w = self.size
        freqs = fft_frequencies(h, w)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay
        self.register_buffer("scale", scale, persistent=False)
        shape = (batch, 3, h, w // 2 + 1, 2)
        self.spectrum = torch.nn.Parameter(sd * torch.randn(*shape, generator=generator))

    def raw(self):
        h, w = self.size
        spec = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(spec, s=(h, w), norm="ortho") / self.MAGIC

    @torch.no_grad()
    def set_raw(self, image: torch.Tensor) -> None:
        """Set the spectrum so that ``raw()`` returns ``image`` (N×3×H×W): the exact inverse."""
        spec = torch.fft.rfft2(image * self.MAGIC, norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(spec))


PARAMS = {"fft": FFTParam, "pixel": PixelParam}


def make_param(kind: str = "fft", *, batch=1, size=128, decorrelated=True, generator=None,
               sd=0.01) -> ImageParam:
    """A parameterisation by name (``"fft"`` or ``"pixel"``)."""
    if isinstance(size, int):
        size = (size, size)
    key = str(kind).lower()
    if key not in PARAMS:
        raise ValueError(f"unknown parameterisation {kind!r}; choose one of {', '.join(PARAMS)}")
    return PARAMS[key](batch=batch, size=size, decorrelated=decorrelated, sd=sd,
                       generator=generator)
