"""The activation cache: layer outputs per (input, weights, layer), bounded by bytes."""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import torch
from torch import nn

from .cache import TensorCache, weights_state
from .hooks import capture, replacing, restored


def input_key(x: torch.Tensor) -> str:
    """A digest of a network input's values."""
    data = x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def map_bytes(shape: tuple) -> int:
    """Bytes one image's layer output of ``shape`` takes in the cache (float32)."""
    n = 1
    for d in shape:
        n *= int(d)
    return 4 * n


class ActivationCache(TensorCache):
    """Layer outputs (C×h×w, on the CPU) keyed by the input, the network's weights
    (:func:`~cnnwidgets.engine.cache.weights_state`, so an output of an older network is never
    served) and the layer name."""

    def outputs(self, module: nn.Module, x: torch.Tensor, names: list[str],
                forward: Callable[[torch.Tensor], object]) -> dict[str, torch.Tensor]:
        """``{name: output}`` for the input ``x`` (1×3×H×W); the layers not cached are captured
        in one pass of ``forward`` (the network, run on ``x``).

        While ``cw.ablate`` switches units off on this thread (:func:`~.hooks.replacing`) the
        cache is neither read nor written: the layers then output what the weights do not
        say, and the cache's key cannot see it."""
        if replacing(module):
            with restored(module), torch.no_grad(), capture(module, names) as rec:
                forward(x)
            return {n: self._taken(rec, n) for n in names}
        key = (input_key(x), hash(weights_state(*module.modules())))
        found = {n: self.get((key, n)) for n in names}
        missing = [n for n, v in found.items() if v is None]
        if missing:
            with restored(module), torch.no_grad(), capture(module, missing) as rec:
                forward(x)
            for n in missing:
                found[n] = self._taken(rec, n)
                self.put((key, n), found[n])
        return found

    @staticmethod
    def _taken(rec, name: str) -> torch.Tensor:
        if name not in rec.outputs:
            raise ValueError(f"layer {name!r} did not produce a tensor output")
        return rec.outputs[name][0].to("cpu")

    def fitting(self, sizes: Iterable[tuple[str, int]], max_bytes: int | None = None) -> list[str]:
        """The names of ``(name, bytes)`` pairs taken in order while their total stays within
        ``max_bytes`` (default: half the cache); one too large is skipped, the rest still tried."""
        budget = self.max_bytes // 2 if max_bytes is None else int(max_bytes)
        chosen, total = [], 0
        for name, size in sizes:
            if total + size > budget:
                continue
            chosen.append(name)
            total += size
        return chosen
