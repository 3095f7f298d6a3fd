"""pyvae.ops.reparameterize_kl on every backend against the eager float64 reference."""
import math

import pytest
import torch

from conftest import backend_params
from pyvae.ops import (available_backends, last_backend, nan_policy, reparameterize_kl,
                       reparameterize_kl_reference, use_backend)
from pyvae.ops._noise import philox4x32_10, philox_normal

BACKENDS = backend_params()
SHAPES = [(1,), (7,), (3, 5), (17, 33), (129, 10), (2, 3, 5), (2, 3, 4, 9), (4, 1000), (300, 1)]
TOL = {  # (rtol, atol) against the float64 reference, by input dtype
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def drawn_seed(seed: int, device) -> torch.Tensor:
    """The noise seed the op draws from a generator seeded with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device,
                         generator=generator)


def make_inputs(shape, dtype, device, *, prior=False, logvar_scale=1.0):
    mu = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    logvar = (logvar_scale * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    if not prior:
        return mu, logvar, {}
    prior_mu = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    prior_logvar = (0.5 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    return mu, logvar, dict(prior_mu=prior_mu, prior_logvar=prior_logvar)


def run(backend, *args, **kwargs):
    with use_backend(backend):
        out = reparameterize_kl(*args, **kwargs)
    assert last_backend("reparameterize_kl") == backend
    return out


def reference64(mu, logvar, eps=None, seed=None, **prior):
    up = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return reparameterize_kl_reference(up(mu), up(logvar), up(eps), seed=seed,
                                       **{k: up(v) for k, v in prior.items()})


def assert_close(actual, expected, dtype, name):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


# ---- the noise ----------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                     0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        words = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


def test_reference_noise_is_standard_normal():
    eps = philox_normal(987654321, 1000, 1001).double()
    assert abs(eps.mean().item()) < 5 / math.sqrt(eps.numel())
    assert abs(eps.std().item() - 1) < 5e-3
    assert abs((eps**3).mean().item()) < 0.02 and abs((eps**4).mean().item() - 3) < 0.05
    # quantiles of N(0, 1) and no correlation between neighbouring columns or rows
    for q, z in [(0.025, -1.959964), (0.5, 0.0), (0.841345, 1.0)]:
        assert abs(torch.quantile(eps.flatten()[:200000], q).item() - z) < 0.02
    assert abs((eps[:, 1:] * eps[:, :-1]).mean().item()) < 5e-3
    assert abs((eps[1:] * eps[:-1]).mean().item()) < 5e-3


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kernel_noise_equals_reference_noise(backend, device):
    mu, logvar, _ = make_inputs((37, 21), torch.float64, device)
    z, _ = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(7))
    eps = (z - mu) / torch.exp(0.5 * logvar)
    expected = philox_normal(drawn_seed(7, device), 37, 21, dtype=torch.float64)
    torch.testing.assert_close(eps, expected, rtol=1e-9, atol=1e-9)
    # float32 kernels compute the normals in float32: within a few ulp of the rounded reference
    z32, _ = run(backend, mu.float(), logvar.float(),
                 generator=torch.Generator(device=device).manual_seed(7))
    eps32 = (z32.double() - mu.float().double()) / torch.exp(0.5 * logvar.float().double())
    torch.testing.assert_close(eps32, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_noise_reproducible_and_fresh(backend, device):
    mu, logvar, _ = make_inputs((64, 16), torch.float32, device)
    torch.manual_seed(3)
    first, _ = run(backend, mu, logvar)
    second, _ = run(backend, mu, logvar)
    torch.manual_seed(3)
    replay, _ = run(backend, mu, logvar)
    assert torch.equal(first, replay)
    assert not torch.allclose(first, second)
    generator = torch.Generator(device=device).manual_seed(11)
    a, _ = run(backend, mu, logvar, generator=generator)
    b, _ = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(11))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_backends_share_the_noise(backend, device):
    mu, logvar, _ = make_inputs((33, 13), torch.float32, device)
    z, _ = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(5))
    z_ref, _ = run("reference", mu, logvar,
                   generator=torch.Generator(device=device).manual_seed(5))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_kernel_noise_statistics(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is too slow for a million samples")
    mu = torch.zeros(1000, 1000, device=device) + 0.25  # eps = (z - 0.25) / 2
    logvar = torch.full_like(mu, math.log(4.0))
    z, _ = run(backend, mu, logvar)
    eps = ((z - 0.25) / 2).double()
    assert abs(eps.mean().item()) < 5e-3
    assert abs(eps.std().item() - 1) < 5e-3
    assert abs((eps**4).mean().item() - 3) < 0.05


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_regenerates_forward_noise(backend, device):
    mu, logvar, _ = make_inputs((19, 23), torch.float64, device)
    mu.requires_grad_()
    logvar.requires_grad_()
    z, _ = run(backend, mu, logvar)
    grad_z = torch.rand_like(z) + 0.5
    (grad_logvar,) = torch.autograd.grad(z, logvar, grad_z)
    sigma = torch.exp(0.5 * logvar.detach())
    eps_forward = (z.detach() - mu.detach()) / sigma
    eps_backward = 2 * grad_logvar / (grad_z * sigma)
    torch.testing.assert_close(eps_backward, eps_forward, rtol=1e-9, atol=1e-9)


# ---- values and gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("prior", [False, True], ids=["std-prior", "gauss-prior"])
@pytest.mark.parametrize("given_eps", [False, True], ids=["philox", "eps"])
def test_matches_reference(backend, device, dtype, prior, given_eps):
    for shape in SHAPES:
        mu, logvar, prior_kw = make_inputs(shape, dtype, device, prior=prior)
        eps = torch.randn(shape, device=device).to(dtype) if given_eps else None
        z, kl = run(backend, mu, logvar, eps,
                    generator=torch.Generator(device=device).manual_seed(1), **prior_kw)
        seed = None if given_eps else drawn_seed(1, device)
        z_ref, kl_ref = reference64(mu, logvar, eps, seed, **prior_kw)
        assert z.shape == mu.shape and z.dtype == dtype
        assert kl.shape == mu.shape[:-1]
        assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(z, z_ref, dtype, f"z {shape}")
        assert_close(kl, kl_ref, dtype, f"kl {shape}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("prior", [False, True], ids=["std-prior", "gauss-prior"])
@pytest.mark.parametrize("upstream", ["both", "z-only", "kl-only"])
def test_gradients_match_reference(backend, device, dtype, prior, upstream):
    for shape in [(5,), (17, 33), (3, 4, 9), (64, 130)]:
        mu, logvar, prior_kw = make_inputs(shape, dtype, device, prior=prior)
        leaves = [mu, logvar, *prior_kw.values()]
        for leaf in leaves:
            leaf.requires_grad_()
        z, kl = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(2),
                    **prior_kw)
        ref_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
        ref_prior = dict(zip(prior_kw, ref_leaves[2:]))
        z_ref, kl_ref = reparameterize_kl_reference(ref_leaves[0], ref_leaves[1],
                                                    seed=drawn_seed(2, device), **ref_prior)
        grad_z = torch.randn(z.shape, dtype=torch.float64, device=device)
        grad_kl = torch.randn(kl.shape, dtype=torch.float64, device=device)
        outputs, ref_outputs, grads = [], [], []
        if upstream != "kl-only":
            outputs.append(z), ref_outputs.append(z_ref), grads.append(grad_z)
        if upstream != "z-only":
            outputs.append(kl), ref_outputs.append(kl_ref), grads.append(grad_kl)
        actual = torch.autograd.grad(outputs, leaves,
                                     [g.to(o.dtype) for g, o in zip(grads, outputs)])
        expected = torch.autograd.grad(ref_outputs, ref_leaves, grads, allow_unused=True,
                                       materialize_grads=True)
        for name, a, e in zip(["mu", "logvar", "prior_mu", "prior_logvar"], actual, expected):
            assert a.dtype == dtype
            assert_close(a, e, dtype, f"grad {name} {shape}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_logvar(backend, device):
    mu, _, prior_kw = make_inputs((9, 31), torch.float32, device, prior=True)
    logvar = torch.empty_like(mu).uniform_(-20, 20)
    logvar[0, :4] = torch.tensor([-20.0, 20.0, -19.5, 19.5])
    for kw in [{}, prior_kw]:
        z, kl = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(4),
                    **kw)
        z_ref, kl_ref = reference64(mu, logvar, None, drawn_seed(4, device), **kw)
        assert torch.isfinite(z).all() and torch.isfinite(kl).all()
        # float32 noise is exact to ~1e-6, so z's error scales with sigma = exp(logvar / 2)
        sigma = torch.exp(0.5 * logvar.double())
        error = (z.double() - z_ref).abs() / (sigma + z_ref.abs())
        assert error.max() < 1e-5
        torch.testing.assert_close(kl.double(), kl_ref, rtol=3e-5, atol=1e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base_mu, base_lv, _ = make_inputs((40, 26), torch.float32, device)
    mu, logvar = base_mu.t()[::2], base_lv.t()[::2]  # (13, 40), strided
    eps = torch.randn(40, 13, device=device).t()
    prior_mu = torch.randn(13, 80, device=device)[:, ::2]
    prior_logvar = torch.randn(13, 80, device=device)[:, 1::2]
    assert not mu.is_contiguous() and not eps.is_contiguous()
    for kw in [dict(eps=eps), dict(prior_mu=prior_mu, prior_logvar=prior_logvar), {}]:
        z, kl = run(backend, mu, logvar, generator=torch.Generator(device=device).manual_seed(9),
                    **kw)
        seed = None if "eps" in kw else drawn_seed(9, device)
        prior = {k: v for k, v in kw.items() if k.startswith("prior")}
        z_ref, kl_ref = reference64(mu, logvar, kw.get("eps"), seed, **prior)
        assert_close(z, z_ref, torch.float32, "z")
        assert_close(kl, kl_ref, torch.float32, "kl")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_inputs(backend, device):
    for shape in [(0, 5), (4, 0), (0,), (2, 0, 3)]:
        mu = torch.randn(shape, device=device)
        z, kl = run(backend, mu, torch.randn(shape, device=device))
        assert z.shape == shape and kl.shape == shape[:-1]
        assert torch.equal(kl, torch.zeros(shape[:-1], device=device))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("prior", [False, True], ids=["std-prior", "gauss-prior"])
def test_gradcheck_float64(backend, prior):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    mu, logvar, prior_kw = make_inputs((3, 7), torch.float64, "cpu", prior=prior)
    inputs = [mu, logvar, *prior_kw.values()]
    for t in inputs:
        t.requires_grad_()

    def fn(*args):
        kw = dict(zip(["prior_mu", "prior_logvar"], args[2:]))
        with use_backend(backend):  # the same noise on every call: a freshly seeded generator
            return reparameterize_kl(args[0], args[1], generator=torch.Generator().manual_seed(0),
                                     **kw)

    assert torch.autograd.gradcheck(fn, inputs)
    eps = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, lv, e: fn_eps(backend, m, lv, e), [mu, logvar, eps])


def fn_eps(backend, mu, logvar, eps):
    with use_backend(backend):
        return reparameterize_kl(mu, logvar, eps)


# ---- compile ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("given_eps", [False, True], ids=["philox", "eps"])
def test_torch_compile_fullgraph(backend, device, given_eps):
    mu, logvar, _ = make_inputs((8, 12), torch.float32, device)
    mu.requires_grad_()
    eps = torch.randn_like(mu) if given_eps else None

    def loss(mu, logvar, eps):
        with use_backend(backend):
            z, kl = reparameterize_kl(mu, logvar, eps)
        return (z * z).sum() + kl.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(mu, logvar, eps)
    (grad,) = torch.autograd.grad(value, mu)
    if given_eps:
        expected = loss(mu, logvar, eps)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, torch.autograd.grad(expected, mu)[0])
    else:
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_torch_compile_inductor_cpu():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    mu, logvar, _ = make_inputs((16, 10), torch.float32, "cpu")
    eps = torch.randn_like(mu)

    def fn(mu, logvar, eps):
        with use_backend("cpu"):
            z, kl = reparameterize_kl(mu * 2, logvar, eps)
        return z.sum(-1) + kl

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(mu, logvar, eps),
                               fn(mu, logvar, eps))


# ---- dispatch and bad inputs ----------------------------------------------------------------

def test_backend_selection(monkeypatch):
    assert "reference" in available_backends()
    mu, logvar, _ = make_inputs((4, 3), torch.float32, "cpu")
    reparameterize_kl(mu, logvar)
    expected_auto = "cpu" if "cpu" in available_backends("cpu") else "reference"
    assert last_backend("reparameterize_kl") == expected_auto
    monkeypatch.setenv("PYVAE_BACKEND", "reference")
    reparameterize_kl(mu, logvar)
    assert last_backend("reparameterize_kl") == "reference"
    with pytest.raises(ValueError, match="unknown pyvae backend 'fast'"):
        with use_backend("fast"):
            pass
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run tensors on cpu"):
        with use_backend("cuda"):
            reparameterize_kl(mu, logvar)


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_bad_inputs(backend, device):
    mu, logvar, _ = make_inputs((4, 3), torch.float32, device)
    cases = [
        (dict(mu=mu.long(), logvar=logvar), TypeError, "mu must be float16"),
        (dict(mu=mu[0, 0], logvar=logvar[0, 0]), ValueError, "at least 1-D"),
        (dict(mu=mu, logvar=logvar[:, :2]), ValueError, r"logvar has shape \(4, 2\)"),
        (dict(mu=mu, logvar=logvar.double()), TypeError, "logvar is torch.float64"),
        (dict(mu=mu, logvar=logvar.to("meta")), ValueError, "logvar is on meta"),
        (dict(mu=mu, logvar=logvar, eps=torch.randn(3, device=device)), ValueError, "eps has"),
        (dict(mu=mu, logvar=logvar, prior_mu=mu), ValueError, "given together"),
        (dict(mu=mu, logvar=logvar, prior_mu=mu, prior_logvar=logvar.half()), TypeError,
         "prior_logvar is torch.float16"),
        (dict(mu=mu, logvar="x"), TypeError, "logvar must be a torch.Tensor"),
    ]
    with use_backend(backend):
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                reparameterize_kl(**kwargs)
        bad = logvar.clone()
        bad[1, 2] = float("nan")
        z, kl = reparameterize_kl(mu, bad)  # default policy: NaN propagates like eager code
        assert torch.isnan(kl[1]) and not torch.isnan(kl[0])
        with nan_policy("raise"), pytest.raises(ValueError, match="logvar contains NaN"):
            reparameterize_kl(mu, bad)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    """torch.library.opcheck on the forward and backward kernel ops (odd sizes, both noise
    sources, with and without a prior)."""
    from conftest import opcheck_op

    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    seed = torch.tensor([77], dtype=torch.int64, device=device)
    rows, cols = 7, 5
    for eps, prior in [(rand(rows, cols), None), (None, (rand(rows, cols), rand(rows, cols)))]:
        prior_mu, prior_logvar = prior if prior else (None, None)
        forward = (rand(rows, cols, grad=True), rand(rows, cols, grad=True), eps,
                   None if eps is not None else seed, prior_mu, prior_logvar)
        opcheck_op("reparameterize_kl_forward", backend, forward)
        grads = (rand(rows, cols), torch.randn(rows, device=device, dtype=dtype))
        opcheck_op("reparameterize_kl_backward", backend,
                   (*grads, *(t.detach() if t is not None else None for t in forward)))


# ---- torch.func.vmap over models ----------------------------------------------------------------

def random_odd_size(low, high):
    return 2 * int(torch.randint(low // 2, high // 2, ())) + 1


VMAP_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-5)}


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("prior", [False, True], ids=["std-prior", "gauss-prior"])
def test_vmap_matches_the_loop_over_models(backend, device, dtype, prior):
    from conftest import assert_vmap_matches_loop

    k_models, rows, cols = 3, random_odd_size(3, 12), random_odd_size(1, 10)
    mu, logvar, priors = make_inputs((k_models, rows, cols), dtype, device, prior=prior)
    eps = torch.randn(k_models, rows, cols, dtype=dtype, device=device)

    def fn(mu, logvar, eps, *prior_args):
        kwargs = dict(zip(["prior_mu", "prior_logvar"], prior_args))
        with use_backend(backend):
            return reparameterize_kl(mu, logvar, eps, **kwargs)

    args = (mu, logvar, eps, *priors.values())
    assert_vmap_matches_loop(fn, args, (0,) * len(args), **VMAP_TOL[dtype])
    # a prior (or the noise) shared by all models, the models along dim 1 of logvar
    shared = (mu, logvar.transpose(0, 1), eps[0], *(v[0] for v in priors.values()))
    assert_vmap_matches_loop(fn, shared, (0, 1, None) + (None,) * len(priors),
                             **VMAP_TOL[dtype])
    assert last_backend("reparameterize_kl") == backend


@pytest.mark.parametrize("backend,device", backend_params(include_reference=True))
def test_vmap_noise_is_that_of_the_stacked_rows(backend, device):
    # randomness="same": one seed per call; model k's row r is row k·rows + r of one call on the
    # concatenated rows, so the models' noises differ, and the backward regenerates them.
    k_models, rows, cols = 3, 7, 5
    mu, logvar, _ = make_inputs((k_models, rows, cols), torch.float64, device)

    def loss(mu, logvar):
        with use_backend(backend):
            z, kl = reparameterize_kl(mu, logvar)
        return (z * z).sum() + kl.sum(), z

    torch.manual_seed(7)
    grads, z = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1), has_aux=True),
                               randomness="same")(mu, logvar)
    torch.manual_seed(7)
    stacked = [t.reshape(k_models * rows, cols) for t in (mu, logvar)]
    expected_grads, expected_z = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(*stacked)
    torch.testing.assert_close(z.reshape(-1, cols), expected_z, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.reshape(-1, cols), e, rtol=1e-12, atol=1e-12)
    eps = (z - mu) / torch.exp(0.5 * logvar)
    assert (eps[0] - eps[1]).abs().min() > 0 and (eps[1] - eps[2]).abs().min() > 0

    # randomness="different": a seed per model; the backward still regenerates each one's noise
    leaves = [t.detach().requires_grad_() for t in (mu, logvar)]
    z = torch.func.vmap(lambda m, lv: loss(m, lv)[1], randomness="different")(*leaves)
    (grad_logvar,) = torch.autograd.grad(z.sum(), leaves[1])
    sigma = torch.exp(0.5 * logvar)
    eps = (z.detach() - mu) / sigma
    torch.testing.assert_close(2 * grad_logvar / sigma, eps, rtol=1e-9, atol=1e-9)
    assert (eps[0] - eps[1]).abs().min() > 0

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda m, lv: loss(m, lv)[1])(mu, logvar)
