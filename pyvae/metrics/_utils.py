"""Argument checks and conversions shared by the metrics (private)."""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(owner: str, name: str, value) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device or dtype) or a sequence."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # bfloat16 / float16 have no (exact) numpy counterpart
        return value.cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # e.g. ragged lists
        raise TypeError(f"{owner}: {name} must be an array or a tensor, got "
                        f"{type(value).__name__}") from error


def as_matrix(owner: str, name: str, value, rows: int | None = None) -> np.ndarray:
    """A 2-D float64 array (N, F) from an (N, F) or (N, ...) array or tensor (trailing dims
    flattened, e.g. (N, D, H, W) feature maps), with finite values and ``rows`` rows if given."""
    array = to_numpy(owner, name, value)
    if array.ndim < 2:
        raise ValueError(f"{owner}: {name} must have shape (N, D) or (N, D, ...), got shape "
                         f"{array.shape}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{owner}: {name} must be numeric, got dtype {array.dtype}")
    array = array.reshape(len(array), -1).astype(np.float64, copy=False)
    if rows is not None and len(array) != rows:
        raise ValueError(f"{owner}: {name} must have {rows} rows, got {len(array)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{owner}: {name} contains NaN or infinite values")
    return array


def as_discrete(owner: str, name: str, value, rows: int | None = None) -> np.ndarray:
    """A 2-D int64 array (N, K) of discrete values (factor indices, class labels) from an integer,
    boolean or integer-valued float array or tensor of shape (N,) or (N, K)."""
    array = to_numpy(owner, name, value)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{owner}: {name} must have shape (N,) or (N, K), got shape "
                         f"{array.shape}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{owner}: {name} must hold integer values (discrete factors or "
                             "labels)")
    elif array.dtype.kind not in "biu":
        raise TypeError(f"{owner}: {name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if rows is not None and len(array) != rows:
        raise ValueError(f"{owner}: {name} must have {rows} rows, got {len(array)}")
    return array
