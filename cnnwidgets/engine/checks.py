"""One place that checks the numbers, flags and progress arguments users pass.

Every declared parameter — an attribution method's :class:`~.attribution.registry.Param`
specs, ``steps`` / ``batch_size`` of the metrics, ``quantile`` / ``iou_threshold`` of
``cw.dissect``, the optimisation settings of ``cw.visualize`` / ``cw.invert`` — goes through
these functions, so every one of them refuses the same things the same way:

* the wrong type (a string, a list, ``None`` where a number goes) is a ``TypeError``;
* NaN, ±inf and values outside the parameter's range are a ``ValueError``;

and each message names the parameter and its valid range. numpy integers and floats are
accepted wherever Python ones are (``steps=np.int64(4)``), and so is an integral float for an
integer (``steps=4.0``); ``True`` / ``False`` are not numbers here.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_float", "check_int", "check_number", "check_progress",
           "describe_range"]


def describe_range(low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                   integer: bool = False) -> str:
    """The valid range in words: ``"from 1 to 1024"``, ``"at least 1"``, ``"greater than 0"``."""
    what = "an integer" if integer else "a number"
    if low is not None and high is not None:
        if not low_open and not high_open:
            return f"{what} from {low} to {high}"
        lo = f"greater than {low}" if low_open else f"at least {low}"
        hi = f"less than {high}" if high_open else f"at most {high}"
        return f"{what} {lo} and {hi}"
    if low is not None:
        return f"{what} {'greater than' if low_open else 'at least'} {low}"
    if high is not None:
        return f"{what} {'less than' if high_open else 'at most'} {high}"
    return what if integer else "a finite number"


def _where(name: str, who: str) -> str:
    return f"{who}: {name}" if who else name


def check_number(value, name: str, *, integer: bool = False, low=None, high=None,
                 low_open: bool = False, high_open: bool = False, who: str = ""):
    """``value`` as a Python ``int`` (``integer=True``) or ``float`` within
    [``low``, ``high``] (an end excluded when ``low_open`` / ``high_open``; ``None``: unbounded).

    ``name`` (and ``who``, the function, when given) appear in the error, with the range.
    """
    allowed = describe_range(low, high, low_open=low_open, high_open=high_open, integer=integer)
    where = _where(name, who)
    original = value
    if _is_bool(value):
        raise TypeError(f"{where} must be {allowed}, not {_show(value)}")
    if not isinstance(value, numbers.Real):
        try:  # a 0-d integer tensor or array
            value = operator.index(value) if integer else None
        except TypeError:
            value = None
        if value is None:
            raise TypeError(f"{where} must be {allowed}, not {_show(original)}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    else:
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            raise ValueError(f"{where}={value} is not allowed; {name} must be {allowed}")
        if integer and not number.is_integer():
            raise ValueError(f"{where}={value} is not a whole number; {name} must be {allowed}")
        value = int(number) if integer else number
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{where}={_short(value)} is out of range; {name} must be {allowed}")
    if not integer and not isinstance(value, float):
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{where}={_short(value)} is out of range; {name} must be {allowed}") from None
    return value


def check_int(value, name: str, low=None, high=None, *, who: str = "") -> int:
    """``value`` as an ``int`` in [``low``, ``high``] (see :func:`check_number`)."""
    return check_number(value, name, integer=True, low=low, high=high, who=who)


def check_float(value, name: str, low=None, high=None, *, low_open: bool = False,
                high_open: bool = False, who: str = "") -> float:
    """``value`` as a finite ``float`` in [``low``, ``high``] (see :func:`check_number`)."""
    return check_number(value, name, low=low, high=high, low_open=low_open,
                        high_open=high_open, who=who)


def check_bool(value, name: str, *, who: str = "") -> bool:
    """``value`` as a ``bool``; only ``True`` / ``False`` (numpy's too) are accepted."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{_where(name, who)} must be True or False, not {_show(value)}")


def check_progress(value, *, who: str = "") -> Any:
    """A ``progress=`` argument: ``None`` (automatic), ``True`` / ``False`` or a callable
    ``f(done, total)``; returned as it is (numpy booleans as ``bool``)."""
    if value is None or callable(value):
        return value
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{_where('progress', who)} must be None (a bar when the run is slow), "
                    f"True, False or a callable f(done, total), not {_show(value)}")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _show(value) -> str:
    return f"{type(value).__name__} {_short(value)}"
