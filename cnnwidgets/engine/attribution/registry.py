"""The registry of attribution methods and their declared parameters.

Every method is one function registered with :func:`register`. Its parameters are declared
as :class:`Param` specs (name, type, default, range or choices, help); ``cw.attribute``
validates the user's keyword arguments against them and the ``AttributionExplorer`` widget
builds its controls from them — there is no widget code per method.

Registering a method from outside this package is a one-liner::

    from cnnwidgets.engine.attribution import Param, register

    @register("my_method", params=[Param("sigma", float, 2.0, (0.0, 10.0), "blur in pixels")],
              kind="other", help="what it shows")
    def my_method(ctx, sigma):
        # ctx is a cnnwidgets.engine.attribution.core.Context: ctx.model, ctx.x (1×3×H×W),
        # ctx.target (the resolved target: ctx.target.score(output); indexes like the class
        # index for one class), ctx.layer, ctx.score(batch), ctx.batches(...), ctx.check_cancel()
        return raw                      # or (raw, heat): see core.Context / core.Output

after which ``cw.methods()`` lists it and ``cw.attribute(model, image, "my_method")`` runs it.
``raw`` is the method's own output (a tensor or array); ``heat``, when given, is the 2-D map to
show (any resolution; it is upsampled to the input size). Without ``heat`` the map is derived
from ``raw``: a 3×H×W raw is reduced over channels, a 2-D raw is upsampled.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..checks import check_bool, check_number

#: The families a method can belong to (the widget groups its selector by them).
KINDS = ("gradient", "cam", "perturbation", "other")


@dataclass(frozen=True)
class Param:
    """One declared parameter of a method."""

    name: str  #: keyword name passed to ``cw.attribute``
    type: type  #: ``int``, ``float``, ``bool`` or ``str``
    default: Any  #: value used when the caller does not give one
    range: tuple | None = None  #: inclusive (low, high) for numbers; ``None`` for unbounded
    help: str = ""  #: one line shown as the control's tooltip
    choices: tuple | None = None  #: allowed values for ``str`` parameters
    step: float | None = None  #: slider step for the widget (numbers only)

    def validate(self, value, method: str = ""):
        """``value`` converted to this parameter's type; a ``TypeError`` for the wrong type and a
        ``ValueError`` for NaN, ±inf or a value outside :attr:`range` / :attr:`choices`, each
        naming the parameter and what it allows (:mod:`cnnwidgets.engine.checks`)."""
        if self.type is bool:
            return check_bool(value, self.name, who=method)
        if self.type in (int, float):
            low, high = self.range if self.range is not None else (None, None)
            return check_number(value, self.name, integer=self.type is int, low=low, high=high,
                                who=method)
        if self.type is str:
            where = f"{method}: " if method else ""
            if not isinstance(value, str):
                allowed = (f"one of {', '.join(map(repr, self.choices))}" if self.choices
                           else "a string")
                raise TypeError(f"{where}{self.name} must be {allowed}, not {value!r}")
            if self.choices is not None and value not in self.choices:
                close = difflib.get_close_matches(value, self.choices, n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(
                    f"{where}{self.name}={value!r} is not one of {', '.join(map(repr, self.choices))}{hint}"
                )
            return value
        return value


@dataclass(frozen=True)
class Method:
    """A registered method: its function, parameters and family."""

    name: str  #: snake_case name used by ``cw.attribute``
    fn: Callable  #: ``fn(ctx, **params)`` → raw or (raw, heat)
    params: tuple = ()  #: the declared :class:`Param` specs
    kind: str = "gradient"  #: one of :data:`KINDS`
    layer: bool = False  #: whether the method reads a layer (``layer=`` applies)
    signed: bool = False  #: whether its map has a sign (drawn with a diverging colour map)
    help: str = ""  #: one line for the method selector
    defaults: dict = field(default_factory=dict)  #: name → default, for convenience

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, given: dict) -> dict:
        """Defaults merged with ``given``, each validated; unknown names are an error."""
        known = {p.name: p for p in self.params}
        unknown = [k for k in given if k not in known]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            allowed = ", ".join(known) or "none"
            raise TypeError(f"{self.name} has no parameter {k!r}{hint} (its parameters: {allowed})")
        return {name: p.validate(given.get(name, p.default), self.name) for name, p in known.items()}


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    params: Sequence[Param] = (),
    kind: str = "gradient",
    *,
    layer: bool = False,
    signed: bool = False,
    help: str = "",
    replace: bool = False,
):
    """Decorator that registers ``fn(ctx, **params)`` as the attribution method ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    params = tuple(params)
    for p in params:
        if not isinstance(p, Param):
            raise TypeError(f"params must be Param specs, not {type(p).__name__}")
        p.validate(p.default, name)  # a wrong default is a bug at import time, not at use

    def decorator(fn: Callable) -> Callable:
        if name in _REGISTRY and not replace:
            raise ValueError(f"an attribution method called {name!r} is already registered "
                             "(pass replace=True to override it)")
        _REGISTRY[name] = Method(name, fn, params, kind, layer, signed,
                                 help or (fn.__doc__ or "").strip().split("\n")[0],
                                 {p.name: p.default for p in params})
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove a method (for tests and for replacing a method at run time)."""
    _REGISTRY.pop(name, None)


def methods(kind: str | None = None) -> list[str]:
    """Names of every registered method (of one ``kind`` when given), in registration order."""
    _load_builtin()
    return [n for n, m in _REGISTRY.items() if kind is None or m.kind == kind]


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``, with a helpful error."""
    _load_builtin()
    if isinstance(name, Method):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    key = str(name).lower().replace("-", "_").replace(" ", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown attribution method {name!r}{hint} (cw.methods() lists them all)")


def _load_builtin() -> None:
    # the built-in families register themselves on import
    from . import gradients, cams, perturbation  # noqa: F401,I001
