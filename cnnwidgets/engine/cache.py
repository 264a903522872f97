"""A least-recently-used cache of tensors bounded by the bytes they hold, and the one answer to
"have the weights changed since?" that every cache of results computed from a network asks."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 64


def hash_weights(h, module) -> None:
    """Feed every tensor of ``module.state_dict()`` (its name, then its bytes) to the hash
    ``h`` (a ``hashlib`` object): the part of a cache key that says "these weights"."""
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())


def weights_state(*modules) -> tuple:
    """What the modules' own weights and buffers are now (not their children's): each tensor's
    storage, version, dtype, device and shape. It changes when one is updated in place
    (optimiser step, ``load_state_dict``, ``nn.init``) or replaced, so a result computed from an
    older network is never served. A change made *through* ``.data`` (``p.data.mul_(2)``) leaves
    no trace PyTorch exposes: clear the cache after one. ``weights_state(*net.modules())`` covers
    a whole network."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                 for m in modules for d in (m._parameters, m._buffers) for t in d.values()
                 if t is not None)


class TensorCache:
    """LRU mapping whose total tensor size stays under ``max_bytes``.

    An entry larger than the whole bound is not stored (the caller still gets its value).
    Thread-safe, since widgets may compute in a background thread.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._total = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def put(self, key, value) -> None:
        size = nbytes(value)
        with self._lock:
            if key in self._data:
                self._total -= self._sizes.pop(key)
                del self._data[key]
            if size > self.max_bytes:
                return
            self._data[key] = value
            self._sizes[key] = size
            self._total += size
            while self._total > self.max_bytes:
                old, _ = self._data.popitem(last=False)
                self._total -= self._sizes.pop(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self._total = 0

    @property
    def bytes(self) -> int:
        return self._total

    def __len__(self) -> int:
        return len(self._data)
