"""pyvae.ops.kl_decomposition on every backend against the eager float64 reference."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import backend_params
from pyvae.ops import (KLTerms, available_backends, kl_decomposition, kl_decomposition_reference,
                       last_backend, mss_log_weights, nan_policy, use_backend)

BACKENDS = backend_params()
FIELDS = KLTerms._fields
# (B, D): odd and even batches from the minimum of 2, D from 1 to 200.
SHAPES = [(2, 1), (3, 7), (17, 33), (64, 200), (129, 5), (301, 16)]
# The Triton interpreter runs kernels in numpy, one program at a time: small cases only.
INTERPRETED_SHAPES = [(2, 1), (3, 7), (17, 33), (9, 130)]  # D > 128: the kernels' chunked-D path
# Relative tolerances of the terms against the float64 reference, by input dtype. Half inputs
# are compared with the reference of the same rounded inputs: only the float32 accumulation
# differs, so their terms match as tightly as float32's; their gradients are rounded to the
# input dtype.
TERM_RTOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-6,
             torch.bfloat16: 2e-6}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3,
             torch.bfloat16: 1.6e-2}


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def shapes_for(backend, device):
    return INTERPRETED_SHAPES if interpreted(backend, device) else SHAPES


def make_inputs(batch, dim, dtype, device):
    """A batch whose samples z_i are drawn from their own posteriors, rounded to ``dtype``."""
    mu = torch.randn(batch, dim, dtype=torch.float64, device=device)
    logvar = 0.5 * torch.randn(batch, dim, dtype=torch.float64, device=device)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z.to(dtype), mu.to(dtype), logvar.to(dtype)


def run(backend, *args, **kwargs):
    with use_backend(backend):
        terms = kl_decomposition(*args, **kwargs)
    assert last_backend("kl_decomposition") == backend
    return terms


def reference64(z, mu, logvar, dataset_size, estimator):
    return kl_decomposition_reference(z.detach().double(), mu.detach().double(),
                                      logvar.detach().double(), dataset_size,
                                      estimator=estimator)


def assert_terms_close(actual, expected, rtol, what):
    """Every term within rtol of the reference, relative to the largest term's magnitude.

    mi, tc and dim_kl are differences of log-densities summed over D, so their rounding error
    scales with those sums rather than with the (possibly small) differences.
    """
    scale = max([1.0] + [getattr(expected, name).abs().max().item() for name in FIELDS])
    for name in FIELDS:
        a, e = getattr(actual, name).double(), getattr(expected, name).double()
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"{name} ({what}): {m}")


def assert_grad_close(actual, expected, rtol, what):
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def dataset_sizes(batch, dim, backend, device):
    """N from the batch size itself to a million; one of them per shape when interpreted."""
    sizes = [batch, 10 * batch + 3, 10**6]
    return [sizes[(batch + dim) % 3]] if interpreted(backend, device) else sizes


# ---- the MSS weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [2, 3, 5, 64])
def test_mss_weights_sum_to_one_and_sit_where_stated(batch):
    for n in [batch, batch + 1, 1000]:
        log_w = mss_log_weights(batch, n)
        assert log_w.shape == (batch, batch) and log_w.dtype == torch.float64
        torch.testing.assert_close(log_w.exp().sum(1), torch.ones(batch, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        w = log_w.exp()
        for i in range(batch):
            for j in range(batch):
                if j == i:
                    expected = 1 / n
                elif j == (i + 1) % batch:
                    expected = (n - batch + 1) / (n * (batch - 1))
                else:
                    expected = 1 / (batch - 1)
                assert math.isclose(w[i, j].item(), expected, rel_tol=1e-12), (i, j, n)


def test_mss_weights_are_not_the_strided_copy():
    # The widely copied code strides by B instead of B + 1, putting 1/N in column 0 of every row.
    w = mss_log_weights(6, 100).exp()
    assert torch.all(w[1:, 0] > 1 / 100)
    torch.testing.assert_close(torch.diagonal(w), torch.full((6,), 1 / 100, dtype=torch.float64))


# ---- values -------------------------------------------------------------------------------------

def test_reference_terms_are_consistent():
    z, mu, logvar = make_inputs(23, 4, torch.float64, "cpu")
    terms = kl_decomposition_reference(z, mu, logvar, 1000, estimator="mss")
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    torch.testing.assert_close(terms.log_qz_x, posterior.log_prob(z).sum(1))
    prior = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(terms.log_pz, prior.log_prob(z).sum(1))
    torch.testing.assert_close(terms.mi + terms.tc + terms.dim_kl, terms.log_qz_x - terms.log_pz)
    # MWS by brute force over the pairs
    n, b = 1000, 23
    log_q = torch.distributions.Normal(mu[None], torch.exp(0.5 * logvar[None])).log_prob(z[:, None])
    expected = torch.logsumexp(log_q.sum(-1), 1) - math.log(n * b)
    mws = kl_decomposition_reference(z, mu, logvar, n, estimator="mws")
    torch.testing.assert_close(mws.log_qz, expected)
    torch.testing.assert_close(mws.log_prod_qz,
                               (torch.logsumexp(log_q, 1) - math.log(n * b)).sum(-1))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(backend, device, estimator, dtype):
    for batch, dim in shapes_for(backend, device):
        z, mu, logvar = make_inputs(batch, dim, dtype, device)
        for n in dataset_sizes(batch, dim, backend, device):
            terms = run(backend, z, mu, logvar, n, estimator=estimator)
            assert isinstance(terms, KLTerms)
            for name in FIELDS:
                value = getattr(terms, name)
                assert value.shape == (batch,) and value.dtype == dtype, name
            assert_terms_close(terms, reference64(z, mu, logvar, n, estimator),
                               TERM_RTOL[dtype], f"{batch}x{dim} N={n}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(backend, device, dtype):
    for batch, dim in shapes_for(backend, device)[1:4]:
        z, mu, logvar = make_inputs(batch, dim, dtype, device)
        terms = run(backend, z, mu, logvar, 5 * batch, estimator="mss")
        assert all(getattr(terms, name).dtype == torch.float32 for name in FIELDS)
        assert_terms_close(terms, reference64(z, mu, logvar, 5 * batch, "mss"),
                           TERM_RTOL[dtype], f"{batch}x{dim}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_logvar(backend, device):
    # Posteriors from very narrow to very wide: pair terms from ~-1e9 to ~0, all finite.
    batch, dim = (9, 12) if interpreted(backend, device) else (33, 24)
    z, mu, logvar = make_inputs(batch, dim, torch.float32, device)
    logvar = torch.empty_like(mu).uniform_(-20, 20)
    logvar[0, :4] = torch.tensor([-20.0, 20.0, -19.5, 19.5])
    z = (mu.double() + torch.exp(0.5 * logvar.double()) * torch.randn_like(mu.double())).float()
    for estimator in ["mws", "mss"]:
        terms = run(backend, z, mu, logvar, 1000, estimator=estimator)
        assert all(torch.isfinite(getattr(terms, name)).all() for name in FIELDS)
        assert_terms_close(terms, reference64(z, mu, logvar, 1000, estimator), 2e-6, estimator)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sample_far_from_every_posterior(backend, device, dtype):
    # z_0 sits tens of standard deviations from every posterior in dim 1 (a marginal term of
    # -300 nats or less): a logsumexp shifted by anything but the row's own maximum (a bound
    # known before the pass, say) underflows there.
    batch, dim = (7, 3) if interpreted(backend, device) else (37, 5)
    z, mu, logvar = make_inputs(batch, dim, dtype, device)
    z[0, 1] = 60.0
    z[batch - 1, 0] = -45.0  # the last row: its stratified neighbour wraps to j = 0
    for estimator in ["mws", "mss"]:
        terms = run(backend, z, mu, logvar, 1000, estimator=estimator)
        expected = reference64(z, mu, logvar, 1000, estimator)
        assert expected.log_prod_qz[0] < -300
        assert_terms_close(terms, expected, TERM_RTOL[dtype], estimator)


# The accuracy every backend states, of log q(z_i) and log prod_d q(z_id) against the float64
# reference, in nats, for posteriors like a trained VAE's: means spread over a few units and, in
# its informative dimensions, standard deviations down to 0.0025 (logvar -12). Float32 inputs:
# 3e-5 nats for logvar ~ 0.5 N(0, 1) and in [-6, 0], 2e-3 in [-12, -8] (where a pair term is up
# to ~1e5 nats); bfloat16 inputs: the same against the reference of the rounded inputs. The
# expanded-square (GEMM) form of the joint term misses this by 30x and 300x in float32 (which
# tf32x3 emulates at best): benchmarks/results/kl-joint-gemm-accuracy-2026-12-07-cpu.md.
ACCURACY_NATS = {"typical": 3e-5, "trained": 3e-5, "narrow": 2e-3}


def accuracy_inputs(regime, batch, dim, device):
    mu = 2 * torch.randn(batch, dim, dtype=torch.float64, device=device)
    logvar = {"typical": lambda: 0.5 * torch.randn_like(mu),
              "trained": lambda: -6 * torch.rand_like(mu),
              "narrow": lambda: -8 - 4 * torch.rand_like(mu)}[regime]()
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return z, mu, logvar


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("regime", list(ACCURACY_NATS))
def test_stated_accuracy_of_log_qz(backend, device, dtype, regime):
    batch, dim = (17, 7) if interpreted(backend, device) else (257, 10)
    z, mu, logvar = (t.to(dtype) for t in accuracy_inputs(regime, batch, dim, device))
    terms = run(backend, z, mu, logvar, 10**5, estimator="mss")
    expected = reference64(z, mu, logvar, 10**5, "mss")
    for name in ("log_qz", "log_prod_qz"):
        error = (getattr(terms, name).double() - getattr(expected, name)).abs().max().item()
        assert error <= ACCURACY_NATS[regime], f"{name} {regime}: {error:.2e} nats"


def test_stated_accuracy_rules_out_the_expanded_gemm():
    # The bound above is one the expanded-square matrix product of the joint term fails in
    # float32 for trained and narrow posteriors (so a kernel that switched to it would fail too).
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "kl_joint_gemm_accuracy.py")
    spec = importlib.util.spec_from_file_location("kl_joint_gemm_accuracy", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    torch.manual_seed(0)
    for regime in ("trained", "narrow"):
        z, mu, logvar = accuracy_inputs(regime, 257, 10, "cpu")
        exact = reference64(z, mu, logvar, 10**5, "mss").log_qz
        joint = study.expanded_joint(z.float(), mu.float(), logvar.float())
        weights = mss_log_weights(257, 10**5)
        error = (torch.logsumexp(joint.double() + weights, 1) - exact).abs().max().item()
        assert error > 10 * ACCURACY_NATS[regime], (regime, error)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base_z, base_mu, base_lv = make_inputs(24, 40, torch.float32, device)
    z, mu, logvar = base_z.t()[::2], base_mu.t()[::2], base_lv.t()[::2]  # (20, 24), strided
    assert not z.is_contiguous()
    terms = run(backend, z, mu, logvar, 100, estimator="mss")
    assert_terms_close(terms, reference64(z, mu, logvar, 100, "mss"), 2e-6, "strided")


# ---- gradients ----------------------------------------------------------------------------------

def gradients(backend, z, mu, logvar, n, estimator, upstream):
    """d(sum_k upstream[k] · term_k)/d(z, mu, logvar) from ``backend``, in the inputs' dtype."""
    leaves = [t.detach().requires_grad_() for t in (z, mu, logvar)]
    with use_backend(backend):
        terms = kl_decomposition(*leaves, n, estimator=estimator)
    outputs = [getattr(terms, name) for name in upstream]
    grads = [upstream[name].to(out.dtype) for name, out in zip(upstream, outputs)]
    # log_pz depends on z alone: the other gradients are zeros
    return torch.autograd.grad(outputs, leaves, grads, allow_unused=True, materialize_grads=True)


def reference_gradients(z, mu, logvar, n, estimator, upstream):
    return gradients("reference", z.double(), mu.double(), logvar.double(), n, estimator,
                     {k: v.double() for k, v in upstream.items()})


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("dtype", list(GRAD_RTOL), ids=str)
def test_gradients_match_reference(backend, device, estimator, dtype):
    cases = shapes_for(backend, device)[:4] if dtype in (torch.float64, torch.float32) else \
        shapes_for(backend, device)[1:3]
    for batch, dim in cases:
        z, mu, logvar = make_inputs(batch, dim, dtype, device)
        n = 3 * batch
        upstream = {name: torch.randn(batch, dtype=torch.float64, device=device)
                    for name in FIELDS}
        actual = gradients(backend, z, mu, logvar, n, estimator, upstream)
        expected = reference_gradients(z, mu, logvar, n, estimator, upstream)
        for name, a, e in zip(["z", "mu", "logvar"], actual, expected):
            assert a.dtype == dtype
            assert_grad_close(a, e, GRAD_RTOL[dtype], f"grad {name} {batch}x{dim}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("output", FIELDS)
def test_gradient_of_each_output(backend, device, output):
    # One output at a time: the kernels' backward sees a gradient for one or two of the four
    # densities (mi through log_qz_x and log_qz, dim_kl through log_prod_qz and log_pz, ...).
    batch, dim = (7, 5) if interpreted(backend, device) else (45, 19)
    z, mu, logvar = make_inputs(batch, dim, torch.float64, device)
    upstream = {output: torch.randn(batch, dtype=torch.float64, device=device)}
    actual = gradients(backend, z, mu, logvar, 1000, "mss", upstream)
    expected = reference_gradients(z, mu, logvar, 1000, "mss", upstream)
    for name, a, e in zip(["z", "mu", "logvar"], actual, expected):
        assert_grad_close(a, e, 1e-9, f"grad {name} of {output}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_extreme_logvar(backend, device):
    batch, dim = (9, 6) if interpreted(backend, device) else (31, 10)
    z, mu, _ = make_inputs(batch, dim, torch.float32, device)
    logvar = torch.empty_like(mu).uniform_(-12, 12)
    z = (mu.double() + torch.exp(0.5 * logvar.double()) * torch.randn_like(mu.double())).float()
    upstream = {name: torch.randn(batch, dtype=torch.float64, device=device) for name in FIELDS}
    actual = gradients(backend, z, mu, logvar, 500, "mss", upstream)
    expected = reference_gradients(z, mu, logvar, 500, "mss", upstream)
    for name, a, e in zip(["z", "mu", "logvar"], actual, expected):
        assert torch.isfinite(a).all()
        # grad_z of the narrowest posteriors is ~1e5 times the rest: compare per element too.
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * e.abs().median().item(),
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("estimator", ["mws", "mss"])
def test_gradcheck_float64(backend, estimator):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    z, mu, logvar = make_inputs(4, 3, torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (z, mu, logvar)]

    def fn(z, mu, logvar):
        with use_backend(backend):
            return tuple(kl_decomposition(z, mu, logvar, 10, estimator=estimator))

    assert torch.autograd.gradcheck(fn, inputs)


# ---- the estimators approach a closed form ----------------------------------------------------

def gaussian_mixture_batch(cov, batch, s2, generator):
    """Posteriors N(mu_j, s² I) with mu_j ~ N(0, cov - s² I): their mixture is N(0, cov)."""
    dim = cov.shape[0]
    chol = torch.linalg.cholesky(cov - s2 * torch.eye(dim, dtype=torch.float64))
    mu = torch.randn(batch, dim, dtype=torch.float64, generator=generator) @ chol.T
    logvar = torch.full_like(mu, math.log(s2))
    z = mu + math.sqrt(s2) * torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    return z.float(), mu.float(), logvar.float()


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_total_correlation_of_a_known_gaussian(backend, device):
    if interpreted(backend, device):
        pytest.skip("B=2048 is too slow for the Triton interpreter")
    covariances = [torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64),
                   torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.5, -0.5], [0.3, -0.5, 0.8]],
                                dtype=torch.float64)]
    generator = torch.Generator().manual_seed(0)
    for cov in covariances:
        exact = 0.5 * torch.log(torch.diagonal(cov)).sum() - 0.5 * torch.logdet(cov)
        errors = {}
        for batch in [64, 2048]:
            z, mu, logvar = gaussian_mixture_batch(cov, batch, 0.1, generator)
            terms = run(backend, z.to(device), mu.to(device), logvar.to(device), 10**6,
                        estimator="mss")
            errors[batch] = abs(terms.tc.double().mean().item() - exact.item())
        assert errors[2048] < 0.1 * exact.item(), (cov, errors, exact)
        assert errors[2048] < errors[64], (cov, errors)


# ---- memory -------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import torch
    from pyvae.ops import kl_decomposition, use_backend

    def peak_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    torch.manual_seed(0)
    B, D = 8192, 32
    z, mu, logvar = (torch.randn(B, D, requires_grad=True) for _ in range(3))
    with use_backend("cpu"):  # warm up allocator and threads on a small batch
        kl_decomposition(z[:64], mu[:64], logvar[:64], 10**6, estimator="mss").tc.sum().backward()
    before = peak_kb()
    with use_backend("cpu"):
        terms = kl_decomposition(z, mu, logvar, 10**6, estimator="mss")
    (terms.mi + terms.tc + terms.dim_kl).sum().backward()
    print((peak_kb() - before) * 1024)
""")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="no cpu backend")
def test_memory_is_linear_in_the_batch():
    # The reference would materialise B·B·D float32 pair terms: 8.6 GB (and more for autograd).
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True,
                            text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    extra = int(result.stdout.strip().splitlines()[-1])
    assert extra < 300 * 2**20, f"peak RSS grew by {extra / 2**20:.0f} MiB"


# ---- compile, dispatch and bad inputs -----------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_torch_compile_fullgraph(backend, device):
    batch, dim = (6, 3) if interpreted(backend, device) else (37, 8)
    z, mu, logvar = (t.requires_grad_() for t in make_inputs(batch, dim, torch.float32, device))

    def fn(z, mu, logvar):
        with use_backend(backend):
            terms = kl_decomposition(z, mu * 2, logvar, 1000, estimator="mss")
        return terms.mi + 6.0 * terms.tc + terms.dim_kl

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    actual = compiled(z, mu, logvar)
    expected = fn(z, mu, logvar)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
    grads = torch.autograd.grad(actual.sum(), (z, mu, logvar))
    expected_grads = torch.autograd.grad(expected.sum(), (z, mu, logvar))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_backend_selection(monkeypatch):
    z, mu, logvar = make_inputs(5, 3, torch.float32, "cpu")
    kl_decomposition(z, mu, logvar, 100)
    expected_auto = "cpu" if "cpu" in available_backends("cpu") else "reference"
    assert last_backend("kl_decomposition") == expected_auto
    monkeypatch.setenv("PYVAE_BACKEND", "reference")
    kl_decomposition(z, mu, logvar, 100)
    assert last_backend("kl_decomposition") == "reference"
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run tensors on cpu"):
        with use_backend("cuda"):
            kl_decomposition(z, mu, logvar, 100)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bad_inputs(backend, device):
    z, mu, logvar = make_inputs(4, 3, torch.float32, device)
    cases = [
        (dict(z=z.long()), TypeError, "z must be float16"),
        (dict(z=z[0], mu=mu[0], logvar=logvar[0]), ValueError, r"z must be 2-D"),
        (dict(mu=mu[:, :2]), ValueError, r"mu has shape \(4, 2\)"),
        (dict(logvar=logvar[:3]), ValueError, r"logvar has shape \(3, 3\)"),
        (dict(mu=mu.double()), TypeError, "mu is torch.float64"),
        (dict(logvar=logvar.to("meta")), ValueError, "logvar is on meta"),
        (dict(mu="x"), TypeError, "mu must be a torch.Tensor"),
        (dict(z=z[:1], mu=mu[:1], logvar=logvar[:1]), ValueError, "at least 2 samples"),
        (dict(z=z[:, :0], mu=mu[:, :0], logvar=logvar[:, :0]), ValueError,
         "at least one latent dimension"),
        (dict(dataset_size=3), ValueError, r"dataset_size \(3\) must be at least the batch"),
        (dict(dataset_size=100.0), TypeError, "dataset_size must be an int, got float"),
        (dict(dataset_size=True), TypeError, "dataset_size must be an int, got bool"),
        (dict(estimator="mss2"), ValueError, "estimator must be one of"),
    ]
    with use_backend(backend):
        for overrides, error, message in cases:
            kwargs = dict(dict(z=z, mu=mu, logvar=logvar, dataset_size=100), **overrides)
            with pytest.raises(error, match=message):
                kl_decomposition(**kwargs)
        bad = logvar.clone()
        bad[1, 2] = float("nan")
        terms = kl_decomposition(z, mu, bad, 100)  # default policy: NaN propagates
        assert torch.isnan(terms.log_qz_x[1]) and not torch.isnan(terms.log_qz_x[0])
        with nan_policy("raise"), pytest.raises(ValueError, match="logvar contains NaN"):
            kl_decomposition(z, mu, bad, 100)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mss_log_weights(1, 10)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    """torch.library.opcheck on the forward and backward kernel ops (odd B and D)."""
    from conftest import kernel_op, opcheck_op

    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    weights = (-1.5, -2.5, -3.5)
    z, mu, logvar = rand(9, 5, grad=True), rand(9, 5, grad=True), rand(9, 5, grad=True)
    opcheck_op("kl_decomposition_forward", backend, (z, mu, logvar, *weights))
    saved = [t.detach() for t in (z, mu, logvar)]
    log_qz, *_, lse = kernel_op("kl_decomposition_forward", backend)(*saved, *weights)
    every = [torch.randn_like(log_qz) for _ in range(4)]
    for grads in [every, [every[0], None, None, None], [None, None, every[2], every[3]]]:
        opcheck_op("kl_decomposition_backward", backend, (*grads, *saved, log_qz, lse, *weights))


@pytest.mark.parametrize("backend, device", backend_params())
def test_kernel_returns_four_densities_and_saves_lse_marginal(backend, device):
    """The forward op's outputs: the four log-densities (differentiable, equal to the public
    terms) and lse_marginal, which only its backward reads (not differentiable)."""
    import importlib
    kernel = importlib.import_module("pyvae.ops.kl_decomposition").KERNEL_OP
    z, mu, logvar = (t.requires_grad_() for t in make_inputs(9, 5, torch.float64, device))
    weights = (-2.0, -1.0, -3.0)
    *densities, lse = kernel.apply(backend, z, mu, logvar, *weights)
    assert all(d.requires_grad for d in densities) and not lse.requires_grad
    expected = reference64(z, mu, logvar, 1000, "mss")
    actual = run(backend, z, mu, logvar, 1000, estimator="mss")
    for name in ("log_qz", "log_prod_qz", "log_qz_x", "log_pz"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name))
    torch.testing.assert_close(densities[1], lse.sum(-1))


# ---- model batches: (K, B, D) inputs and torch.func.vmap ---------------------------------------

def model_batch(k_models, batch, dim, dtype, device):
    """K models' batches, each as make_inputs draws one: (K, B, D) tensors."""
    parts = [make_inputs(batch, dim, dtype, device) for _ in range(k_models)]
    return [torch.stack(t) for t in zip(*parts)]


def random_odd_size(low, high):
    return 2 * int(torch.randint(low // 2, high // 2, ())) + 1


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_model_batch_equals_per_model_calls(backend, device, dtype):
    # (K, B, D) in one call: each model's terms and gradients are those of its own (B, D) call.
    batch, dim = random_odd_size(3, 12), random_odd_size(1, 10)
    for contiguous in (True, False):
        z, mu, logvar = model_batch(3, batch, dim, dtype, device)
        if not contiguous:  # (B, K, D) storage seen as (K, B, D)
            z, mu, logvar = (t.transpose(0, 1).contiguous().transpose(0, 1)
                             for t in (z, mu, logvar))
            assert not z.is_contiguous()
        upstream = {name: torch.randn(3, batch, dtype=torch.float64, device=device)
                    for name in FIELDS}
        leaves = [t.detach().requires_grad_() for t in (z, mu, logvar)]
        terms = run(backend, *leaves, 200, estimator="mss")
        for name in FIELDS:
            assert getattr(terms, name).shape == (3, batch), name
        outputs = [getattr(terms, name) for name in FIELDS]
        grads = torch.autograd.grad(outputs, leaves,
                                    [upstream[n].to(o.dtype) for n, o in zip(FIELDS, outputs)])
        for k in range(3):
            model = [t[k].detach().requires_grad_() for t in (z, mu, logvar)]
            expected = run(backend, *model, 200, estimator="mss")
            assert_terms_close(KLTerms(*(t[k] for t in terms)), expected, TERM_RTOL[dtype],
                               f"model {k} of {batch}x{dim}")
            model_outputs = [getattr(expected, name) for name in FIELDS]
            model_grads = torch.autograd.grad(
                model_outputs, model,
                [upstream[n][k].to(o.dtype) for n, o in zip(FIELDS, model_outputs)])
            for arg, a, e in zip(["z", "mu", "logvar"], grads, model_grads):
                assert_grad_close(a[k], e.double(), GRAD_RTOL[dtype], f"grad {arg} model {k}")


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_vmap_matches_the_loop_over_models(backend, device, dtype):
    from conftest import assert_vmap_matches_loop

    batch, dim = random_odd_size(3, 12), random_odd_size(1, 10)

    def fn(z, mu, logvar):
        with use_backend(backend):
            return tuple(kl_decomposition(z, mu, logvar, 100, estimator="mss"))

    z, mu, logvar = model_batch(3, batch, dim, dtype, device)
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    assert_vmap_matches_loop(fn, (z, mu, logvar), (0, 0, 0), **tol)
    # the models along another dim, and a logvar shared by every model
    assert_vmap_matches_loop(fn, (z.transpose(0, 1), mu, logvar[0]), (1, 0, None), **tol)
    assert last_backend("kl_decomposition") == backend


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bad_model_batch_shapes(backend, device):
    z, mu, logvar = model_batch(3, 4, 2, torch.float32, device)
    cases = [
        (dict(z=z[None], mu=mu[None], logvar=logvar[None]), ValueError,
         r"z must be 2-D \(batch, dim\) or 3-D \(models, batch, dim\), got shape \(1, 3, 4, 2\)"),
        (dict(mu=mu[:2]), ValueError, r"mu has shape \(2, 4, 2\) but z has \(3, 4, 2\)"),
        (dict(logvar=logvar[0]), ValueError, r"logvar has shape \(4, 2\) but z has \(3, 4, 2\)"),
        (dict(z=z[:, :1], mu=mu[:, :1], logvar=logvar[:, :1]), ValueError, "at least 2 samples"),
        (dict(dataset_size=3), ValueError, r"dataset_size \(3\) must be at least the batch size"),
    ]
    with use_backend(backend):
        for overrides, error, message in cases:
            kwargs = dict(dict(z=z, mu=mu, logvar=logvar, dataset_size=100), **overrides)
            with pytest.raises(error, match=message):
                kl_decomposition(**kwargs)


@pytest.mark.parametrize("backend, device", backend_params())
def test_kernel_ops_check_model_batches(backend, device):
    """The kernel ops take (K, B, D) (opcheck of both), and name a bad 3-D argument."""
    from conftest import kernel_op, opcheck_op

    weights = (-1.5, -2.5, -3.5)
    z, mu, logvar = (torch.randn(3, 5, 4, device=device, dtype=torch.float64, requires_grad=True)
                     for _ in range(3))
    opcheck_op("kl_decomposition_forward", backend, (z, mu, logvar, *weights))
    saved = [t.detach() for t in (z, mu, logvar)]
    forward, backward = (kernel_op(f"kl_decomposition_{s}", backend) for s in ("forward", "backward"))
    *densities, lse = forward(*saved, *weights)
    log_qz = densities[0]
    assert [d.shape for d in densities] == [(3, 5)] * 4 and lse.shape == (3, 5, 4)
    grads = [torch.randn_like(log_qz) for _ in densities]
    opcheck_op("kl_decomposition_backward", backend, (*grads, *saved, log_qz, lse, *weights))
    with pytest.raises(RuntimeError, match=r"z must be 2-D \(batch, dim\) or 3-D"):
        forward(saved[0][None], saved[1][None], saved[2][None], *weights)
    with pytest.raises(RuntimeError, match=r"need a batch of at least 2, got 1"):
        forward(*(t[:, :1].contiguous() for t in saved), *weights)
    with pytest.raises(RuntimeError, match=r"mu has shape \[2, 5, 4\] but expected \[3, 5, 4\]"):
        forward(saved[0], saved[1][:2].contiguous(), saved[2], *weights)
    with pytest.raises(RuntimeError, match=r"log_qz has shape \[5\] but expected \[3, 5\]"):
        backward(torch.randn_like(log_qz), None, None, None, *saved, log_qz[0].contiguous(), lse,
                 *weights)
