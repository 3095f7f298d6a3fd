"""Argument checks shared by every part of pyvae: one wording for one mistake."""
from __future__ import annotations

import numbers


def check_int(owner: str | None, name: str, value, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an int in [``minimum``, ``maximum``] (either bound optional).

    Raises TypeError for a non-integer (``bool`` included) and ValueError for one out of
    range, each naming ``owner: name`` (``owner`` None: just ``name``)."""
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{prefix}{name} must be <= {maximum}, got {value}")
    return value
