"""Input checks shared by pyvae's ops: errors that name the argument and say what was expected.

NaN policy: by default NaN/inf inputs propagate to the outputs as they would through the eager
PyTorch code (checking costs a device synchronisation). Inside ``with nan_policy("raise")``, or with
``PYVAE_NAN_POLICY=raise``, every op checks its floating-point inputs and raises a ValueError that
names the first argument holding a NaN or an infinity.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAN_POLICIES = ("propagate", "raise")
_policy: list[str] = []


@contextlib.contextmanager
def nan_policy(policy: str) -> Iterator[None]:
    """``"propagate"`` (default) or ``"raise"`` for the ops called inside the block."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    _policy.append(policy)
    try:
        yield
    finally:
        _policy.pop()


def current_nan_policy() -> str:
    policy = _policy[-1] if _policy else os.environ.get("PYVAE_NAN_POLICY", "propagate")
    if policy not in NAN_POLICIES:
        raise ValueError(f"PYVAE_NAN_POLICY must be one of {NAN_POLICIES}, got {policy!r}")
    return policy


def check_float_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, "
                        f"got {value.dtype}")
    return value


def check_like(op: str, name: str, value, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``value`` must be a tensor with ``ref``'s shape, dtype and device."""
    check_float_tensor(op, name, value)
    if value.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(value.shape)} but {ref_name} has "
                         f"{tuple(ref.shape)}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} is {value.dtype} but {ref_name} is {ref.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{op}: {name} is on {value.device} but {ref_name} is on {ref.device}")
    return value


def check_finite(op: str, **tensors: torch.Tensor | None) -> None:
    """Under the "raise" NaN policy, reject the first named tensor holding NaN or inf."""
    if current_nan_policy() != "raise":
        return
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{op}: {name} contains NaN or infinite values "
                             f"(nan_policy='raise')")
