"""The backtracking rules, one function per operation, by family; importing this package
registers them all (:func:`..registry.rule`)."""
from . import arithmetic, convolution, passthrough, pooling, resize, shape  # noqa: F401 - they register

__all__ = ["arithmetic", "convolution", "passthrough", "pooling", "resize", "shape"]
