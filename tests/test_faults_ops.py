"""Faults of the ops (issue 14, items 2 and 11).

Item 2: every kernel entry point (torch.ops.pyvae.<op>_{forward,backward}, and the Triton custom
ops <op>_{forward,backward}_triton) checks every tensor it reads -- incoming gradients and saved
tensors included -- and raises a RuntimeError naming the argument instead of reading out of
bounds. Item 11: the public ops give one behaviour on every backend at the edges (empty images,
huge dilations, a generator that is not a torch.Generator, numpy dataset sizes, NaN at masked
weights).
"""
import numpy as np
import pytest
import torch

from conftest import backend_params
from pyvae.ops import (kl_decomposition, masked_conv2d, masked_conv2d_mask,
                       reparameterize_kl, use_backend)

KERNEL_BACKENDS = backend_params()
ALL_BACKENDS = backend_params(include_reference=True)
INT32_MAX = 2**31 - 1


def entry(backend, name):
    """The kernel entry point ``name`` (e.g. "masked_conv2d_backward") of ``backend``."""
    return getattr(torch.ops.pyvae, name + "_triton" if backend == "triton" else name)


def noncontiguous(t):
    """``t``'s values in a non-contiguous tensor of the same shape."""
    return t.detach().clone().t().contiguous().t() if t.dim() == 2 else t.repeat_interleave(
        2, dim=-1)[..., ::2]


def assert_each_raises(op, good, cases):
    """Each case replaces some keyword arguments of ``good`` and must raise naming them."""
    op(*good.values())  # the unmodified call is valid: each failure below is the one change
    for overrides, message in cases:
        kwargs = dict(good, **overrides)
        with pytest.raises(RuntimeError, match=message):
            op(*kwargs.values())


# ---- item 2: kernel entry points ----------------------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_reparameterize_kl_backward_rejects_bad_grads(backend, device):
    rows, cols = 6, 5
    mu = torch.randn(rows, cols, device=device)
    logvar = torch.randn(rows, cols, device=device)
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    good = dict(grad_z=torch.randn(rows, cols, device=device),
                grad_kl=torch.randn(rows, device=device), mu=mu, logvar=logvar, eps=None,
                seed=seed, prior_mu=None, prior_logvar=None)
    cases = [
        (dict(grad_z=torch.randn(1, cols, device=device)), r"grad_z has shape \[1, 5\] but "
                                                           r"expected \[6, 5\]"),
        (dict(grad_z=torch.randn(rows, cols, dtype=torch.float64, device=device)),
         "grad_z has dtype"),
        (dict(grad_z=noncontiguous(torch.randn(rows, cols, device=device))),
         "grad_z must be contiguous"),
        (dict(grad_kl=torch.randn(rows - 1, device=device)), r"grad_kl has shape \[5\]"),
        (dict(grad_kl=torch.randn(rows, cols, device=device)), r"grad_kl has shape \[6, 5\]"),
        (dict(grad_kl=torch.randn(rows, dtype=torch.float16, device=device)),
         "grad_kl has dtype"),
        (dict(grad_kl=noncontiguous(torch.randn(rows, device=device))),
         "grad_kl must be contiguous"),
        (dict(seed=None), "need eps or a seed"),
        (dict(seed=seed.to(torch.int32)), "seed has dtype"),
        (dict(seed=seed.reshape(())), r"seed has shape \[\]"),
        (dict(eps=torch.randn(rows, cols + 1, device=device)), "eps has shape"),
        (dict(logvar=noncontiguous(logvar)), "logvar must be contiguous"),
        (dict(prior_mu=mu), "prior_mu and prior_logvar must be given together"),
        (dict(prior_mu=mu, prior_logvar=logvar[:3]), "prior_logvar has shape"),
        (dict(mu=mu.long(), logvar=logvar.long()), "mu must be float16"),
    ]
    assert_each_raises(entry(backend, "reparameterize_kl_backward"), good, cases)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_reparameterize_kl_backward_short_grad_z_is_refused_not_read(backend, device):
    # The call: a one-row grad_z against many rows of mu read past its end.
    mu = torch.randn(1000, 64, device=device)
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    op = entry(backend, "reparameterize_kl_backward")
    with pytest.raises(RuntimeError, match=r"reparameterize_kl: grad_z has shape \[1, 64\]"):
        op(torch.ones(1, 64, device=device), None, mu, mu, None, seed, None, None)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_reparameterize_kl_forward_rejects_bad_inputs(backend, device):
    rows, cols = 6, 5
    mu = torch.randn(rows, cols, device=device)
    good = dict(mu=mu, logvar=torch.randn(rows, cols, device=device), eps=None,
                seed=torch.tensor([3], dtype=torch.int64, device=device), prior_mu=None,
                prior_logvar=None)
    cases = [
        (dict(mu=mu[0]), "mu must be 2-D"),
        (dict(logvar=torch.randn(rows, cols, dtype=torch.float64, device=device)),
         "logvar has dtype"),
        (dict(eps=noncontiguous(torch.randn(rows, cols, device=device))),
         "eps must be contiguous"),
        (dict(seed=torch.ones(2, dtype=torch.int64, device=device)), r"seed has shape \[2\]"),
        (dict(prior_mu=mu, prior_logvar=torch.randn(cols, rows, device=device)),
         "prior_logvar has shape"),
    ]
    assert_each_raises(entry(backend, "reparameterize_kl_forward"), good, cases)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_kl_decomposition_backward_rejects_bad_grads(backend, device):
    batch, dim = 5, 3
    z, mu, logvar = (torch.randn(batch, dim, device=device) for _ in range(3))
    log_qz = torch.randn(batch, device=device)
    lse_marginal = torch.randn(batch, dim, device=device)
    good = dict(grad_log_qz=torch.randn(batch, device=device),
                grad_log_prod_qz=torch.randn(batch, device=device),
                grad_log_qz_x=torch.randn(batch, device=device),
                grad_log_pz=torch.randn(batch, device=device), z=z, mu=mu,
                logvar=logvar, log_qz=log_qz, lse_marginal=lse_marginal, w_self=-3.0,
                w_next=-3.0, w_other=-3.0)
    cases = [
        (dict(grad_log_qz=torch.randn(1, device=device)), r"grad_log_qz has shape \[1\] but "
                                                          r"expected \[5\]"),
        (dict(grad_log_qz=torch.randn(batch, dtype=torch.float64, device=device)),
         "grad_log_qz has dtype"),
        (dict(grad_log_qz=noncontiguous(torch.randn(batch, device=device))),
         "grad_log_qz must be contiguous"),
        (dict(grad_log_prod_qz=torch.randn(batch, dim, device=device)),
         r"grad_log_prod_qz has shape \[5, 3\] but expected \[5\]"),
        (dict(grad_log_qz_x=noncontiguous(torch.randn(batch, device=device))),
         "grad_log_qz_x must be contiguous"),
        (dict(grad_log_pz=torch.randn(batch, dtype=torch.float64, device=device)),
         "grad_log_pz has dtype"),
        (dict(log_qz=torch.randn(batch - 1, device=device)), "log_qz has shape"),
        (dict(lse_marginal=lse_marginal.half()), "lse_marginal has dtype"),
        (dict(mu=torch.randn(batch + 1, dim, device=device)), "mu has shape"),
        (dict(logvar=noncontiguous(logvar)), "logvar must be contiguous"),
        (dict(z=z[:1], mu=mu[:1], logvar=logvar[:1]), "batch of at least 2"),
    ]
    assert_each_raises(entry(backend, "kl_decomposition_backward"), good, cases)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_kl_decomposition_forward_rejects_bad_inputs(backend, device):
    batch, dim = 5, 3
    z, mu, logvar = (torch.randn(batch, dim, device=device) for _ in range(3))
    good = dict(z=z, mu=mu, logvar=logvar, w_self=-3.0, w_next=-3.0, w_other=-3.0)
    cases = [
        (dict(z=z[0]), "z must be 2-D"),
        (dict(mu=mu[:, :2]), r"mu has shape \[5, 2\] but expected \[5, 3\]"),
        (dict(logvar=logvar.double()), "logvar has dtype"),
        (dict(mu=noncontiguous(mu)), "mu must be contiguous"),
        (dict(z=z[:, :0], mu=mu[:, :0], logvar=logvar[:, :0]), "at least one latent dimension"),
    ]
    assert_each_raises(entry(backend, "kl_decomposition_forward"), good, cases)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_masked_conv2d_backward_rejects_bad_grads(backend, device):
    n, c_in, c_out, h, w, k = 2, 3, 6, 4, 5, 3
    x = torch.randn(n, c_in, h, w, device=device)
    weight = torch.randn(c_out, c_in, k, k, device=device)
    good = dict(grad_y=torch.randn(n, c_out, h, w, device=device), x=x, weight=weight,
                mask_type=0, color_channels=3, dilation=1, output_mask=[True, True, True])
    cases = [
        (dict(grad_y=torch.randn(n, c_out, h, w - 1, device=device)),
         r"grad_y has shape \[2, 6, 4, 4\] but expected \[2, 6, 4, 5\]"),
        (dict(grad_y=torch.randn(n, c_in, h, w, device=device)), "grad_y has shape"),
        (dict(grad_y=torch.randn(n, c_out, h, w, dtype=torch.float64, device=device)),
         "grad_y has dtype"),
        (dict(grad_y=torch.randn(n, c_out, w, h, device=device).transpose(2, 3)),
         "grad_y must be contiguous"),
        (dict(x=torch.randn(n, c_in, w, h, device=device).transpose(2, 3)),
         "x must be contiguous"),
        (dict(weight=weight.double()), "weight has dtype"),
        (dict(dilation=INT32_MAX // k + 1), "dilation"),
        (dict(dilation=0), "dilation"),
        (dict(mask_type=2), "mask_type"),
        (dict(color_channels=2), r"color_channels \(2\)"),
    ]
    assert_each_raises(entry(backend, "masked_conv2d_backward"), good, cases)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_masked_conv2d_forward_rejects_bad_inputs(backend, device):
    n, c_in, c_out, h, w, k = 2, 3, 6, 4, 5, 3
    x = torch.randn(n, c_in, h, w, device=device)
    weight = torch.randn(c_out, c_in, k, k, device=device)
    good = dict(x=x, weight=weight, bias=torch.randn(c_out, device=device), mask_type=1,
                color_channels=1, dilation=2)
    cases = [
        (dict(bias=torch.randn(c_out + 1, device=device)), r"bias has shape \[7\]"),
        (dict(bias=torch.randn(c_out, device=device).half()), "bias has dtype"),
        (dict(bias=noncontiguous(torch.randn(c_out, device=device))), "bias must be contiguous"),
        (dict(weight=weight.transpose(2, 3)), "weight must be contiguous"),
        (dict(weight=weight[:, :2]), "x has 3 channels but weight expects 2"),
        (dict(x=x[0]), "x must be 4-D"),
        (dict(x=x.long()), "x must be float16"),
        (dict(dilation=2**40), "dilation"),
    ]
    assert_each_raises(entry(backend, "masked_conv2d_forward"), good, cases)


# ---- item 11: one behaviour on every backend ----------------------------------------------------

@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 4, 4)])
def test_masked_conv2d_empty_image_gives_an_empty_output(backend, device, shape):
    x = torch.randn(*shape, device=device, requires_grad=True)
    weight = torch.randn(6, 3, 5, 5, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    with use_backend(backend):
        y = masked_conv2d(x, weight, bias, mask_type="B", color_channels=3, dilation=2)
    assert y.shape == (shape[0], 6, shape[2], shape[3]) and y.dtype == x.dtype
    (y * 2).sum().backward()  # differentiable on every backend, with nothing to propagate
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dilation", [INT32_MAX // 3 + 1, 2**31, 2**40])
def test_masked_conv2d_dilation_beyond_int32_is_a_value_error(backend, device, dilation):
    x = torch.randn(1, 1, 3, 3, device=device)
    weight = torch.randn(1, 1, 3, 3, device=device)
    with use_backend(backend), pytest.raises(ValueError, match="dilation must be at most"):
        masked_conv2d(x, weight, dilation=dilation)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("generator", [5, "cpu", torch.device("cpu")])
def test_reparameterize_kl_generator_must_be_a_generator(backend, device, generator):
    mu, logvar, eps = (torch.randn(3, 4, device=device) for _ in range(3))
    with use_backend(backend):
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            reparameterize_kl(mu, logvar, generator=generator)
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            reparameterize_kl(mu, logvar, eps, generator=generator)  # checked though unused


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_kl_decomposition_numpy_dataset_size_agrees_with_the_reference(backend, device,
                                                                       estimator):
    # A numpy int64 N·B overflowed in the reference only (math domain error or wrong weights).
    z, mu, logvar = (torch.randn(4, 3, dtype=torch.float64, device=device) for _ in range(3))
    size = np.int64(2**62)
    with use_backend("reference"):
        expected = kl_decomposition(z, mu, logvar, size, estimator=estimator)
    with use_backend(backend):
        got = kl_decomposition(z, mu, logvar, size, estimator=estimator)
    for name in ("mi", "tc", "dim_kl"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-9,
                                   atol=1e-9, msg=name)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_masked_conv2d_nan_at_masked_weights_is_ignored_on_every_backend(backend, device):
    x = torch.randn(2, 3, 5, 4, device=device)
    weight = torch.randn(6, 3, 3, 3, device=device)
    mask = masked_conv2d_mask(6, 3, 3, "A", 3, device=device)
    poisoned = weight.masked_fill(mask == 0, float("nan")).requires_grad_()
    with use_backend("cpu" if device == "cpu" else "cuda"):
        expected = masked_conv2d(x, weight * mask, mask_type="A", color_channels=3)
    with use_backend(backend):
        y = masked_conv2d(x, poisoned, mask_type="A", color_channels=3)
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)
    y.sum().backward()
    assert torch.isfinite(poisoned.grad).all() and poisoned.grad[mask == 0].eq(0).all()


def _op_calls(device):
    """Each op as a function of one input tensor x (requires grad), on fresh random inputs."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(5, 3, generator=g).to(device)
    weight = torch.randn(4, 2, 3, 3, generator=g).to(device)
    return {
        "reparameterize_kl": (mu, lambda x: reparameterize_kl(x, 0.1 * x, torch.ones_like(x))[1]),
        "kl_decomposition": (mu, lambda x: kl_decomposition(x, 0.5 * x, -x.abs(), 100).tc),
        "masked_conv2d": (torch.randn(2, 2, 5, 5, generator=g).to(device),
                          lambda x: masked_conv2d(x, weight, mask_type="B")),
    }


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["reparameterize_kl", "kl_decomposition", "masked_conv2d"])
def test_second_derivatives_are_refused_not_silently_wrong(backend, device, op):
    # A double backward through a kernel would miss the second-order terms of the kernel itself:
    # it is an error naming the op; the reference backend computes it.
    x0, f = _op_calls(device)[op]
    x = x0.clone().requires_grad_()
    with use_backend(backend):
        first, = torch.autograd.grad(f(x).square().sum(), x)  # first order: fine
        assert torch.isfinite(first).all()
        with pytest.raises(RuntimeError, match=f"pyvae.ops.{op}: second derivatives"):
            torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
    with use_backend("reference"):
        grad, = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        assert grad.requires_grad
