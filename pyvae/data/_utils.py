"""Argument checks shared by the data sets: each error names the offending argument."""
from __future__ import annotations

import numbers

from pyvae._validate import check_int


def check_pair(value, name: str) -> tuple[int, int] | None:
    """``None`` → ``None``; an int ``s`` → ``(s, s)``; an ``(h, w)`` pair → itself (all >= 1)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be an int or an (height, width) pair, got {value!r}")
    return check_int(None, f"{name}[0]", value[0], 1), check_int(None, f"{name}[1]", value[1], 1)


def check_size(value) -> int | tuple[int, int] | None:
    """A resize argument: ``None``, an int (the shorter side) or an ``(h, w)`` pair, all >= 1."""
    if value is None or isinstance(value, (tuple, list)):
        return check_pair(value, "size")
    return check_int(None, "size", value, 1)
