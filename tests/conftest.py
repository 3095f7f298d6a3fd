"""Shared fixtures. Without CUDA the Triton kernels run on CPU tensors under the interpreter;
the variable must be set before triton compiles (decorates) any kernel."""
import os
import signal
import socket
import subprocess
import sys
import tempfile

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


def run_torchrun(nproc: int, script, *args, env=None, timeout: float = 120):
    """``python -m torch.distributed.run --nproc_per_node NPROC SCRIPT ARGS`` on a free port;
    returns (exit status, combined output). A run that does not finish in ``timeout`` seconds
    fails the test after killing torchrun and every worker (torchrun may start its workers in
    sessions of their own, so killing its process group is not enough; the output goes to a
    file, so that a stray worker holding a pipe cannot hang the test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env=env)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as file:
                        if str(script).encode() in file.read():
                            os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            process.wait()
            log.seek(0)
            pytest.fail(f"torchrun did not finish in {timeout} s:\n{log.read()[-4000:]}")
        log.seek(0)
        return process.returncode, log.read()


def kernel_op(name: str, backend: str):
    """The registered op ``pyvae::NAME`` that ``backend`` runs: the C++ op (CPU or CUDA kernel,
    by the tensors' device) or its Triton twin ``pyvae::NAME_triton``."""
    return getattr(torch.ops.pyvae, f"{name}_triton" if backend == "triton" else name)


def opcheck_op(name: str, backend: str, args: tuple) -> None:
    """``torch.library.opcheck`` of one kernel op: schema, fake (meta) kernel against the real
    one, autograd registration and AOT dispatch."""
    torch.library.opcheck(kernel_op(name, backend), args)
