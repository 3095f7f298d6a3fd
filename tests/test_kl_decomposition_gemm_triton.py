"""The Triton kl_decomposition's joint term as matrix products (issue 16): float32 inputs against
the float64 eager reference, at D = 4 (products padded to 16 dims) and D = 200 (two 128-dim chunks),
with batches that leave masked rows in every 16-row block, and the float64 products that serve
narrow posteriors. Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""
import math

import pytest
import torch

from pyvae.ops import kl_decomposition, kl_decomposition_reference, use_backend
from pyvae.ops import _backend

pytestmark = pytest.mark.skipif(_backend.unavailable_reason("triton", "cpu") is not None,
                                reason=str(_backend.unavailable_reason("triton", "cpu")))


def kernels():
    from pyvae.kernels import kl_decomposition as module
    return module


def inputs(batch, dim, logvar_low=None):
    """float32 z, mu, logvar; logvar ~ 0.5 randn, or uniform on [logvar_low, 1]."""
    mu = torch.randn(batch, dim, dtype=torch.float64)
    if logvar_low is None:
        logvar = 0.5 * torch.randn(batch, dim, dtype=torch.float64)
    else:
        logvar = torch.empty(batch, dim, dtype=torch.float64).uniform_(logvar_low, 1.0)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z.float(), mu.float(), logvar.float()


def terms_and_grads(backend, z, mu, logvar, upstream):
    leaves = [t.detach().requires_grad_() for t in (z, mu, logvar)]
    with use_backend(backend):
        terms = kl_decomposition(*leaves, 10 * z.shape[0], estimator="mss")
    loss = sum((getattr(terms, name) * w.to(terms.log_qz.dtype)).sum() for name, w in upstream.items())
    return terms, torch.autograd.grad(loss, leaves)


def assert_matches_float64(z, mu, logvar, term_rtol, grad_rtol):
    upstream = {name: torch.randn(z.shape[0], dtype=torch.float64) for name in ("log_qz", "tc", "mi")}
    terms, grads = terms_and_grads("triton", z, mu, logvar, upstream)
    expected, expected_grads = terms_and_grads("reference", z.double(), mu.double(), logvar.double(),
                                               upstream)
    for name in ("log_qz", "log_prod_qz"):
        e = getattr(expected, name)
        torch.testing.assert_close(getattr(terms, name).double(), e, rtol=0,
                                   atol=term_rtol * e.abs().max().item(), msg=lambda m: f"{name}: {m}")
    for name, a, e in zip(("z", "mu", "logvar"), grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=grad_rtol * e.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")


# Gradient tolerances relative to the largest gradient: at D = 200 the float32 path measured
# 2.7e-5 (grad z, through log_qz, tc and mi), at D = 4 below 1e-5.
@pytest.mark.parametrize("batch,dim,grad_rtol", [(7, 4, 1e-5), (20, 4, 1e-5), (7, 200, 5e-5)])
def test_float32_products_match_float64(batch, dim, grad_rtol):
    z, mu, logvar = inputs(batch, dim)
    _, condition = kernels()._joint_operand_stats(*(t[None] for t in (z, mu, logvar)))
    assert condition.max() <= kernels()._FP32_GEMM_MAX_CONDITION  # these take float32 products
    assert_matches_float64(z, mu, logvar, term_rtol=1e-6, grad_rtol=grad_rtol)


def test_narrow_posteriors_take_float64_products():
    # logvar down to -8 (a ~ 3000): float32 products would lose ~1e-3 nats per score.
    z, mu, logvar = inputs(20, 12, logvar_low=-8.0)
    _, condition = kernels()._joint_operand_stats(*(t[None] for t in (z, mu, logvar)))
    assert condition.max() > kernels()._FP32_GEMM_MAX_CONDITION
    assert_matches_float64(z, mu, logvar, term_rtol=1e-6, grad_rtol=2e-5)


def test_condition_bounds_the_expanded_terms():
    # condition_j * size_j >= max_i sum_d of the |terms| of posterior j in the expanded score.
    z, mu, logvar = (t.double() for t in inputs(9, 6, logvar_low=-4.0))
    centre, condition = kernels()._joint_operand_stats(z[None], mu[None], logvar[None])
    torch.testing.assert_close(centre[0], mu.mean(0))
    zc, muc, a = z - centre, mu - centre, torch.exp(-logvar)
    magnitude = (0.5 * a[None] * zc[:, None] ** 2 + (a * muc)[None].abs() * zc[:, None].abs()
                 + 0.5 * (a * muc * muc)[None]).sum(-1)  # [i, j]
    size = (0.5 * ((logvar + math.log(2 * math.pi)).abs() + 1)).sum(-1)
    assert (magnitude.amax(0) <= condition[0] * size * (1 + 1e-12)).all()
