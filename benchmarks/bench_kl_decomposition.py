"""kl_decomposition: every pyvae backend against the eager B×B×D PyTorch code and torch.compile
of it, forward and forward+backward of the β-TCVAE terms (MSS estimator; MWS as well at B = 256
and 4096).

``exps`` in extra_info is B²·D, the number of pair-dimension exponentials of one forward pass,
so that a report can show exp/s; ``peak_mb`` is the tensor memory one call allocates beyond its
inputs (benchmarks/peak_memory.py).

The large cases B ∈ {4096, 8192, 16384} × D ∈ {4, 10, 32, 64} (issue 16: B = 8192, D = 32 within
300 MB) are not part of ``--quick``; select them with ``python benchmarks/run.py -k
"test_kl_decomposition and not models and (4096x or 8192x or 16384x)"``. The estimator does not
change the kernels' work (three pair log-weights either way), so MWS is timed at B = 256 (where
per-call costs weigh most against torch.compile) and 4096 only."""
import pytest
import torch

from conftest import timed
from pyvae.ops import available_backends, kl_decomposition, kl_decomposition_reference, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    BATCHES, DIMS = [256, 1024], [10, 32, 64]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    BATCHES, DIMS = [256, 1024, 2048], [10, 32]
    DTYPES = [torch.float32]
BIG_BATCHES, BIG_DIMS = [4096, 8192, 16384], [4, 10, 32, 64]
MWS_BATCHES = {256, 4096}
QUICK = {(1024, 32)}
# The eager code materialises B×B×D pair terms (about 3 such tensors in the forward and 6 in
# the forward+backward): it, and torch.compile of it, run only where one float32 B×B×D tensor
# takes at most this many bytes; the other cases are reported as skipped.
EAGER_LIMIT_BYTES = 4 * 2**30 if DEVICE == "cuda" else 2**30
IMPLS = ["eager", "compile"] + [b for b in available_backends(DEVICE) if b != "reference"]
DATASET_SIZE = 10**6


def implementation(impl, estimator="mss"):
    """The callable (z, mu, logvar) -> KLTerms timed as ``impl``: "eager" (pyvae's reference
    backend, the straightforward PyTorch code), "compile" (torch.compile of it) or a backend."""
    def eager(z, mu, logvar):
        return kl_decomposition_reference(z, mu, logvar, DATASET_SIZE, estimator=estimator)

    if impl == "eager":
        return eager
    if impl == "compile":
        return _compiled[estimator]

    def pyvae_op(z, mu, logvar):
        with use_backend(impl):
            return kl_decomposition(z, mu, logvar, DATASET_SIZE, estimator=estimator)
    return pyvae_op


_compiled = {est: torch.compile(implementation("eager", est)) for est in ("mss", "mws")}


def shapes():
    """(batch, dim) of every case: the per-device grid and the large grid, each once."""
    grid = [(b, d) for b in BATCHES for d in DIMS]
    return grid + [(b, d) for b in BIG_BATCHES for d in BIG_DIMS if (b, d) not in grid]


def cases():
    for batch, dim in shapes():
        for estimator in ("mss", "mws") if batch in MWS_BATCHES else ("mss",):
            for dtype in DTYPES:
                for mode in ("forward", "forward+backward"):
                    for impl in IMPLS:
                        marks = [pytest.mark.quick] if (batch, dim) in QUICK else []
                        pair_bytes = batch * batch * dim * 4
                        if impl in ("eager", "compile") and pair_bytes > EAGER_LIMIT_BYTES:
                            marks = [pytest.mark.skip(reason=(
                                f"{impl}: one B×B×D float32 tensor is {pair_bytes / 2**30:.1f} GiB, "
                                f"over EAGER_LIMIT_BYTES = {EAGER_LIMIT_BYTES / 2**30:.0f} GiB"))]
                        tag = "" if estimator == "mss" else "-mws"
                        name = f"{batch}x{dim}-{str(dtype)[6:]}{tag}-{mode}-{impl}"
                        yield pytest.param(batch, dim, dtype, estimator, mode, impl, id=name,
                                           marks=marks)


@pytest.mark.parametrize("batch,dim,dtype,estimator,mode,impl", list(cases()))
def test_kl_decomposition(benchmark, batch, dim, dtype, estimator, mode, impl):
    fn = implementation(impl, estimator)
    grad = mode != "forward"
    mu = torch.randn(batch, dim, device=DEVICE)
    logvar = 0.5 * torch.randn(batch, dim, device=DEVICE)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    z, mu, logvar = (t.to(dtype).requires_grad_(grad) for t in (z, mu, logvar))
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(z, mu, logvar)
    else:
        def step():
            terms = fn(z, mu, logvar)
            # the β-TCVAE combination: every term reaches z, mu and logvar
            (terms.mi + 6.0 * terms.tc + terms.dim_kl).sum().backward()
    exps = batch * batch * dim
    slow = exps >= 1 << 27 and DEVICE == "cpu"
    # op names the estimator where it is not MSS, so that run.py's ratios compare like with like
    timed(benchmark, step, device=DEVICE, rounds=3 if slow else 10,
          warmup=1 if impl != "compile" else 2,
          op="kl_decomposition" if estimator == "mss" else f"kl_decomposition ({estimator})",
          impl=impl, shape=f"{batch}x{dim}", dtype=str(dtype)[6:], mode=mode, exps=exps)


# ---- K models at once: one (K, B, D) launch against a loop of K (B, D) calls ---------------------

MODELS, MODEL_BATCH, MODEL_DIM = 16, 256, 10
MODEL_IMPLS = ["eager"] + [b for b in available_backends(DEVICE) if b != "reference"]


def model_cases():
    for mode in ("forward", "forward+backward"):
        for impl in MODEL_IMPLS:
            for launch in ("one-launch", "loop"):
                name = f"{MODELS}x{MODEL_BATCH}x{MODEL_DIM}-{mode}-{impl}-{launch}"
                yield pytest.param(mode, impl, launch, id=name, marks=[pytest.mark.quick])


@pytest.mark.parametrize("mode,impl,launch", list(model_cases()))
def test_kl_decomposition_models(benchmark, mode, impl, launch):
    """K = 16 models' (B, D) = (256, 10) batches (a pyvae.train.fit_grid step): the (K, B, D)
    call against a loop of K calls, same run; impl ``<backend>-loop`` in the results is the loop."""
    fn = implementation(impl)
    grad = mode != "forward"
    mu = torch.randn(MODELS, MODEL_BATCH, MODEL_DIM, device=DEVICE)
    logvar = 0.5 * torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    z, mu, logvar = (t.requires_grad_(grad) for t in (z, mu, logvar))

    def terms():
        if launch == "one-launch":
            return [fn(z, mu, logvar)]
        return [fn(z[k], mu[k], logvar[k]) for k in range(MODELS)]

    if mode == "forward":
        def step():
            with torch.no_grad():
                terms()
    else:
        def step():
            total = sum((t.mi + 6.0 * t.tc + t.dim_kl).sum() for t in terms())
            total.backward()
    timed(benchmark, step, device=DEVICE, rounds=20, warmup=2, op="kl_decomposition",
          impl=impl if launch == "one-launch" else f"{impl}-loop",
          shape=f"{MODELS}x{MODEL_BATCH}x{MODEL_DIM}", dtype="float32", mode=mode,
          exps=MODELS * MODEL_BATCH * MODEL_BATCH * MODEL_DIM)
