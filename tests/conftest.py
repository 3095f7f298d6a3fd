"""Shared fixtures. Without CUDA the Triton kernels run on CPU tensors under the interpreter;
the variable must be set before triton compiles (decorates) any kernel."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import warnings

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


def _model_args(args, in_dims, k):
    return [a.select(d, k) if isinstance(a, torch.Tensor) and d is not None else a
            for a, d in zip(args, in_dims)]


def _weighted_sum(outputs) -> torch.Tensor:
    """A scalar that every element of every output reaches with its own (fixed) weight."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return sum((o * torch.arange(o.numel(), dtype=o.dtype, device=o.device)
                .reshape(o.shape).sin()).sum() for o in outputs)


def assert_vmap_matches_loop(fn, args, in_dims, *, rtol: float, atol: float,
                             argnums: tuple[int, ...] | None = None) -> None:
    """``torch.func.vmap(fn, in_dims)`` over K models equals the loop of ``fn`` per model: the
    outputs, the gradients by ``vmap(torch.func.grad(...))`` and by plain autograd through the
    vmapped outputs (of a weighted sum of the outputs, with respect to the arguments ``argnums``,
    default every floating-point tensor argument; an argument shared by the models gets the sum
    of their gradients)."""
    k_models = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args)
                        if isinstance(a, torch.Tensor) and a.is_floating_point())

    def loss(*a):
        return _weighted_sum(fn(*a))

    def check(actual, expected, what):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")

    # forward, by the ops' vmap rules (PyTorch's per-model fallback warns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = torch.func.vmap(fn, in_dims=in_dims)(*args)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not fallbacks, fallbacks
    loop = [fn(*_model_args(args, in_dims, k)) for k in range(k_models)]
    if isinstance(actual, torch.Tensor):
        check(actual, torch.stack(loop), "vmap forward")
    else:
        for i, out in enumerate(actual):
            check(out, torch.stack([o[i] for o in loop]), f"vmap forward output {i}")

    # torch.func.grad under vmap: one gradient per model, for shared arguments too
    per_model = [torch.func.grad(loss, argnums=argnums)(*_model_args(args, in_dims, k))
                 for k in range(k_models)]
    vmapped = torch.func.vmap(torch.func.grad(loss, argnums=argnums), in_dims=in_dims)(*args)
    for j, i in enumerate(argnums):
        check(vmapped[j], torch.stack([g[j] for g in per_model]), f"vmap(grad) of argument {i}")

    # plain autograd through vmap's outputs
    leaves = [a.detach().requires_grad_() if i in argnums else a for i, a in enumerate(args)]
    total = torch.func.vmap(loss, in_dims=in_dims)(*leaves).sum()
    grads = torch.autograd.grad(total, [leaves[i] for i in argnums])
    for j, i in enumerate(argnums):
        stacked = torch.stack([g[j] for g in per_model])
        expected = stacked.sum(0) if in_dims[i] is None else stacked.movedim(0, in_dims[i])
        check(grads[j], expected, f"autograd through vmap, argument {i}")
