"""Backend selection for pyvae's ops.

Backends: ``reference`` (eager PyTorch, the ground truth), ``cpu`` (C++ kernels in pyvae._C),
``cuda`` (CUDA C++ kernels in pyvae._C), ``triton`` (Triton kernels; on CPU tensors only under
``TRITON_INTERPRET=1``) and ``auto`` (the default: the fastest backend available for the
tensors' device). A backend that cannot run the given tensors is an error, never a silent
fallback, and :func:`last_backend` tells which kernel the latest call of an op ran.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
# What ``auto`` tries, in order, per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

try:
    from pyvae import _C  # noqa: F401  (registers the C++/CUDA ops with the dispatcher)
    EXTENSION_ERROR: str | None = None
except ImportError as error:  # a source tree whose extension was never built
    EXTENSION_ERROR = f"pyvae._C could not be imported ({error}); build it with `make setup`"

def _find_triton() -> str | None:
    try:  # find, don't import: importing triton is slow and needs no GPU until a kernel runs
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: masked in sys.modules
        found = False
    return None if found else "triton is not installed"


TRITON_ERROR: str | None = _find_triton()

_requested: list[str] = []
_last_backend: dict[str, str] = {}


#: The kernel ops defined so far (pyvae.ops._register.define_kernel_op adds each).
KERNEL_OPS: list[str] = []


def _cuda_kernels_built(op: str | None) -> bool:
    """Whether pyvae._C has CUDA kernels for ``op``'s forward and backward (None: every op's)."""
    ops = KERNEL_OPS if op is None else [op]
    return EXTENSION_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pyvae::{name}_{step}", "CUDA")
        for name in ops for step in ("forward", "backward"))


def unavailable_reason(backend: str, device: torch.device | str,
                       op: str | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` (None: every op) on ``device``'s tensors (None when it
    can)."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors only, not {device.type}"
        return EXTENSION_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, not {device.type}"
        if EXTENSION_ERROR is not None:
            return EXTENSION_ERROR
        if not _cuda_kernels_built(op):
            return ("pyvae._C was built without CUDA kernels (a CPU-only torch, no CUDA_HOME, or "
                    "PYVAE_NO_CUDA=1); rebuild with a CUDA torch")
        return None
    if backend == "triton":
        if TRITON_ERROR is not None:
            return TRITON_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (f"the triton backend runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; "
                f"got {device.type}")
    raise ValueError(f"unknown pyvae backend {backend!r}; choose one of {BACKENDS + ('auto',)}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device``; with no device, on any device of this machine."""
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [device]
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """Every backend, with why it cannot run tensors on ``device`` (None: it can)."""
    return {backend: unavailable_reason(backend, device) for backend in BACKENDS}


def auto_backend(device: torch.device | str, op: str | None = None) -> str:
    """The backend ``auto`` picks for ``op`` (None: every op) on ``device``: the first available
    of AUTO_ORDER, else the reference."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    return next(b for b in order if unavailable_reason(b, device, op) is None)


def requested_backend() -> str:
    """The innermost :func:`use_backend`, else ``$PYVAE_BACKEND``, else ``auto``."""
    if _requested:
        return _requested[-1]
    return os.environ.get("PYVAE_BACKEND", "auto") or "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pyvae's ops on backend ``name`` inside the ``with`` block (nests; thread-global)."""
    if name != "auto":
        unavailable_reason(name, "cpu")  # raises for unknown names
    _requested.append(name)
    try:
        yield
    finally:
        _requested.pop()


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` now; raises when the requested one cannot."""
    name = requested_backend()
    if name == "auto":
        name = auto_backend(device, op)
    else:
        reason = unavailable_reason(name, device, op)
        if reason is not None:
            raise RuntimeError(
                f"pyvae.ops.{op}: backend {name!r} cannot run tensors on {device}: {reason}. "
                f"Available there: {available_backends(device)}")
    _last_backend[op] = name
    return name


def last_backend(op: str) -> str | None:
    """The backend that ran the latest call of ``op`` (e.g. ``"reparameterize_kl"``)."""
    return _last_backend.get(op)

