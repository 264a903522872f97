"""Shared fixtures: the offline model, tiny fixed-weight networks, state snapshots."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")

import cnnwidgets as cw  # noqa: E402


@pytest.fixture(scope="session")
def lite0():
    """The offline ImageNet EfficientNet-Lite0 (loaded once per test run)."""
    return cw.load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def cat():
    return cw.sample_image("cat")


class TinyNet(nn.Module):
    """conv(3→2, k=2) → ReLU → global average pool → linear(2→3), with hand-set weights.

    conv channel 0: every weight 1, no bias — sums the 2×2×3 window.
    conv channel 1: weight 1 on input channel 0's top-left tap only, bias −0.5.
    linear: class 0 = ch0, class 1 = ch1, class 2 = ch0 − ch1.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] = 1.0
            self.conv.weight[1, 0, 0, 0] = 1.0
            self.conv.bias.copy_(torch.tensor([0.0, -0.5]))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def tiny_model(**kwargs) -> cw.Model:
    """TinyNet wrapped so that an 8×8 image in [0, 1] reaches the network unchanged."""
    kwargs.setdefault("input_size", (8, 8))
    return cw.Model(TinyNet(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop=1.0,
                    labels=["a", "b", "c"], **kwargs)


@pytest.fixture
def tiny():
    return tiny_model()


def one_pixel_image(row=2, col=3, size=8) -> np.ndarray:
    """A black size×size greyscale image with one white pixel."""
    img = np.zeros((size, size), dtype=np.uint8)
    img[row, col] = 255
    return img


def snapshot(module: nn.Module):
    """Everything ``restored`` promises to keep: flags, requires_grad, parameters, buffers."""
    return (
        [m.training for m in module.modules()],
        [p.requires_grad for p in module.parameters()],
        {k: v.detach().clone() for k, v in module.state_dict().items()},
    )


def assert_same_state(module: nn.Module, before) -> None:
    flags, requires, state = before
    assert [m.training for m in module.modules()] == flags
    assert [p.requires_grad for p in module.parameters()] == requires
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def assert_frame_is_current(canvas) -> None:
    """Render ``canvas`` as a draw_idle would; what its frame image shows must be the figure
    drawn anew now (a frame kept by state and put back must never show another state)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas.draw()
    shown = np.asarray(Image.open(io.BytesIO(canvas.frame_image.value)))
    FigureCanvasAgg.draw(canvas)
    now = np.asarray(canvas.get_renderer().buffer_rgba())[..., :3]
    assert shown.shape == now.shape and (shown == now).all(), "the frame shown is not the figure"
