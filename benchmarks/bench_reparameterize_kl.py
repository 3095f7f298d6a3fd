"""reparameterize_kl: every pyvae backend against eager PyTorch and torch.compile of the same
eager code, forward and forward+backward, with in-kernel noise (eps=None)."""
import pytest
import torch

from conftest import timed
from pyvae.ops import available_backends, use_backend, reparameterize_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    SHAPES = [(256, 32), (4096, 128), (16384, 256), (65536, 256), (65536, 512)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(256, 32), (4096, 128), (65536, 256)]
    DTYPES = [torch.float32]
QUICK = {(4096, 128), (65536, 256)}
IMPLS = ["eager", "compile"] + [b for b in available_backends(DEVICE) if b != "reference"]


def eager_reparameterize_kl(mu, logvar):
    """What VAE code usually writes."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return z, kl


_compiled = torch.compile(eager_reparameterize_kl)


def implementation(impl):
    if impl == "eager":
        return eager_reparameterize_kl
    if impl == "compile":
        return _compiled

    def pyvae_op(mu, logvar):
        with use_backend(impl):
            return reparameterize_kl(mu, logvar)
    return pyvae_op


def cases():
    for shape in SHAPES:
        for dtype in DTYPES:
            for mode in ("forward", "forward+backward"):
                for impl in IMPLS:
                    marks = [pytest.mark.quick] if shape in QUICK else []
                    name = f"{shape[0]}x{shape[1]}-{str(dtype)[6:]}-{mode}-{impl}"
                    yield pytest.param(shape, dtype, mode, impl, id=name, marks=marks)


@pytest.mark.parametrize("shape,dtype,mode,impl", list(cases()))
def test_reparameterize_kl(benchmark, shape, dtype, mode, impl):
    rows, cols = shape
    fn = implementation(impl)
    mu = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=mode != "forward")
    logvar = (0.5 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_(mode != "forward")
    grad_z = torch.randn_like(mu)
    grad_kl = torch.randn(rows, device=DEVICE)
    size = mu.element_size()
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(mu, logvar)
        # the fewest bytes: read mu, logvar; write z and kl
        moved = 3 * mu.numel() * size + rows * 4
    else:
        def step():
            z, kl = fn(mu, logvar)
            torch.autograd.backward((z, kl), (grad_z, grad_kl.to(kl.dtype)))
        # + backward: read grad_z, mu, logvar, grad_kl; write grad_mu, grad_logvar
        moved = 8 * mu.numel() * size + 2 * rows * 4
    big = mu.numel() >= 1 << 22
    timed(benchmark, step, device=DEVICE, rounds=5 if (big and DEVICE == "cpu") else 20,
          warmup=2 if impl != "compile" else 3, op="reparameterize_kl", impl=impl,
          shape=f"{rows}x{cols}", dtype=str(dtype)[6:], mode=mode, bytes=moved)
