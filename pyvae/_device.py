"""One check of a user's ``device`` argument, shared by training, encoding, reports and the
command line, so that a device this machine lacks is a ValueError naming it rather than
torch's "Torch not compiled with CUDA enabled" AssertionError deep inside a job."""
from __future__ import annotations

import torch

#: ``precision`` names of training and encoding -> the ``torch.autocast`` dtype (None: float32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, after checking that this machine has it.

    Raises ValueError (naming ``name``) for a string that is not a device, a CUDA device when
    CUDA is unavailable, or a CUDA index beyond the visible GPUs."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {device!r} is not a device (expected e.g. cpu, cuda, "
                         f"cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no GPU is visible")
            raise ValueError(f"{name}: {device!r} was asked for, but CUDA is not available "
                             f"({why}); use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name}: {device!r} was asked for, but only {count} GPU(s) are "
                             f"visible (cuda:0 to cuda:{count - 1})")
    elif parsed.type != "cpu":
        raise ValueError(f"{name}: device type {parsed.type!r} is not supported by pyvae "
                         f"(use cpu or cuda)")
    return parsed
