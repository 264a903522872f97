"""Attribution methods on the shared engine: ``attribute``, ``methods`` and the registry.

Each family lives in its own small module (:mod:`.gradients`, :mod:`.cams`,
:mod:`.perturbation`) and registers its methods with :func:`.registry.register`; see
:mod:`.registry` for registering a method from outside.
"""
from .core import Attribution, Cancelled, Context, attribute, default_layer
from .registry import KINDS, Method, Param, get_method, methods, register, unregister
from ..relu_rules import relu_rule
from . import gradients, cams, perturbation, fixation  # noqa: F401,E402,I001  (register, in this order)

__all__ = [
    "Attribution", "Cancelled", "Context", "KINDS", "Method", "Param", "attribute",
    "default_layer", "get_method", "methods", "register", "relu_rule", "unregister",
]
