"""Shared fixtures. Without CUDA the Triton kernels run on CPU tensors under the interpreter;
the variable must be set before triton compiles (decorates) any kernel."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyvae.ops import _backend  # noqa: E402  (after TRITON_INTERPRET)

DEVICES = ["cpu", "cuda"]


def backend_params(include_reference: bool = False):
    """(backend, device) pairs for every kernel backend; absent ones skip with the reason."""
    params = []
    for device in DEVICES:
        for backend in _backend.BACKENDS:
            if backend == "reference" and not include_reference:
                continue
            if (backend, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue  # these backends exist for one device type only
            if device == "cuda" and not torch.cuda.is_available():
                reason = "CUDA is not available"
            else:
                reason = _backend.unavailable_reason(backend, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(1234)


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a freshly mounted 2 MiB tmpfs, for full-disk tests: ``small_disk(size)``
    mounts one of ``size`` bytes and returns its path. Needs root and mount permission (the CI
    machines have both); skips where the mount is refused."""
    import subprocess

    mounted = []

    def mount(size: int = 2 << 20):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
