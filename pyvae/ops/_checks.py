"""Input checks shared by pyvae's ops (errors that name the argument and say what was expected),
and their dtype rule (:func:`accumulation_dtype`, as ``accumulation_dtype`` in csrc/ops/common.h).

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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every op accumulates, and returns its reductions, in float64 for float64 inputs and in
    float32 for float32, float16 and bfloat16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---- kernel entry points ------------------------------------------------------------------------
# The Triton custom ops (pyvae::<op>_{forward,backward}_triton) check what their kernels read as
# the C++ ops do (csrc/ops/checks.h): a RuntimeError "<op>: <name> has shape [1, 64] but expected
# [4000000, 64] (like z)", so a direct torch.ops call never reads out of bounds. The public ops
# reject bad arguments earlier with ValueError / TypeError.

def _sizes(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def kernel_dtype(op: str, name: str, value) -> None:
    """``value`` must be a tensor of a dtype the kernels are instantiated for."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, "
                           f"got {value.dtype}")


def kernel_tensor(op: str, name: str, value, shape, dtype: torch.dtype, device: torch.device,
                  why: str) -> None:
    """``value`` must be a contiguous tensor of exactly ``shape``, ``dtype`` and ``device``;
    ``why`` (e.g. "like mu") ends the messages in parentheses."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"{op}: {name} is missing (got {type(value).__name__})")
    if tuple(value.shape) != tuple(shape):
        raise RuntimeError(f"{op}: {name} has shape {_sizes(value.shape)} but expected "
                           f"{_sizes(shape)} ({why})")
    if value.dtype != dtype:
        raise RuntimeError(f"{op}: {name} has dtype {value.dtype} but expected {dtype} ({why})")
    if value.device != device:
        raise RuntimeError(f"{op}: {name} is on {value.device} but expected {device} ({why})")
    if not value.is_contiguous():
        raise RuntimeError(f"{op}: {name} must be contiguous, got strides "
                           f"{_sizes(value.stride())} for shape {_sizes(value.shape)}")


def kernel_like(op: str, name: str, value, ref: torch.Tensor, why: str) -> None:
    """:func:`kernel_tensor` with ``ref``'s shape, dtype and device."""
    kernel_tensor(op, name, value, ref.shape, ref.dtype, ref.device, why)
