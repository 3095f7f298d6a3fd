"""Argument checks shared by the data sets: each error names the offending argument."""
from __future__ import annotations

import numbers


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not an integer in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_pair(value, name: str) -> tuple[int, int] | None:
    """``None`` → ``None``; an int ``s`` → ``(s, s)``; an ``(h, w)`` pair → itself (all >= 1)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or an (height, width) pair, got {value!r}")
    return check_int(value[0], f"{name}[0]", 1), check_int(value[1], f"{name}[1]", 1)


def check_size(value) -> int | tuple[int, int] | None:
    """A resize argument: ``None``, an int (the shorter side) or an ``(h, w)`` pair, all >= 1."""
    if value is None or isinstance(value, (tuple, list)):
        return check_pair(value, "size")
    return check_int(value, "size", 1)
