"""How many images a batch may hold in the memory this process may still use.

The batched methods (SmoothGrad, Integrated Gradients, Score-CAM, occlusion, RISE…) default to
16 images per pass. A forward + backward pass keeps every layer's output of every image until
the backward pass has used it: measured here 48 MB per image for EfficientNet-Lite0 and
ResNet-50, 71 MB for VGG-16 at 224 px. On a roomy machine that is nothing; in a 2 GB Binder
container whose kernel already holds ~850 MB (PyTorch, the model, the notebook's images) one
pass of 16 would be killed for memory, and the notebook with it.

So each batched run takes at most as many images as fit in half of what is available, at an
upper bound of the cost per image (the sum of every leaf module's output for one image, from
the model's dry run: 1.5–2.3× the measured cost above). Results do not depend on the batch size
(each method draws its noise / masks per image), so a smaller batch only means more passes.
"""
from __future__ import annotations

#: the share of the available memory one batch may take
FRACTION = 0.5

# (limit, usage, stat file, the stat's inactive page cache key): cgroup v2, then v1
_CGROUPS = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _field(path: str, key: str, scale: int = 1) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                parts = line.replace(":", " ").split()
                if len(parts) >= 2 and parts[0] == key and parts[1].isdigit():
                    return int(parts[1]) * scale
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    """Bytes this process may still take before the system or its container runs out: the
    smaller of the system's available memory and the container's limit less what it uses (not
    counting page cache the kernel can drop, as the container's out-of-memory killer does not).
    ``None`` where neither is known (not Linux)."""
    known = []
    system = _field("/proc/meminfo", "MemAvailable", 1024)
    if system is not None:
        known.append(system)
    for limit_path, usage_path, stat_path, key in _CGROUPS:
        limit = _read_int(limit_path)
        if limit is None or limit >= 1 << 60:  # no limit set
            continue
        usage = _read_int(usage_path) or 0
        inactive = _field(stat_path, key) or 0
        known.append(max(0, limit - max(0, usage - inactive)))
        break
    return min(known) if known else None


def fit_batch(batch_size: int, image_bytes: int, available: int | None = None) -> int:
    """``batch_size``, or fewer (at least 1) so that ``batch_size × image_bytes`` stays within
    :data:`FRACTION` of the available memory (``available``: measured when ``None``)."""
    batch_size = max(1, int(batch_size))
    if image_bytes <= 0:
        return batch_size
    if available is None:
        available = available_bytes()
    if available is None:
        return batch_size
    return max(1, min(batch_size, int(available * FRACTION) // int(image_bytes)))


def image_bytes(module, layers) -> int:
    """Bytes of every leaf module's output for one image, from a dry run's ``layers`` (name →
    :class:`~cnnwidgets.engine.layer_index.LayerInfo`) at the element size of ``module``'s
    parameters: an upper bound of what a forward + backward pass keeps per image (measured
    0.4–0.7 of it), the ``image_bytes`` of :func:`fit_batch`."""
    modules = dict(module.named_modules())
    total = 0
    for name, layer in layers.items():
        m = modules.get(name)
        if m is None or next(m.children(), None) is not None or not layer.shape:
            continue
        count = 1
        for d in layer.shape:
            count *= int(d)
        total += count * layer.calls
    p = next(module.parameters(), None)
    return total * (p.element_size() if p is not None else 4)
