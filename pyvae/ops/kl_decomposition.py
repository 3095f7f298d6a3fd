"""Minibatch estimates of the KL decomposition of β-TCVAE (Chen et al. 2018).

For a batch of B samples ``z_i ~ q(z | x_i)`` with diagonal Gaussian posteriors
``N(mu_j, exp(logvar_j))`` from a data set of N points, the aggregate posterior q(z) and the
product of its marginals are estimated from the batch by weighted logsumexps over all pairs
(i, j), with ``ell_ijd = log N(z_id; mu_jd, exp(logvar_jd))``:

    log q(z_i)     ≈ logsumexp_j (log w_ij + Σ_d ell_ijd)
    log q(z_id)    ≈ logsumexp_j (log w_ij + ell_ijd)

where minibatch-weighted sampling (MWS) takes w_ij = 1/(N·B) for every pair and
minibatch-stratified sampling (MSS) the weights of :func:`mss_log_weights`. The average KL to
the prior then splits into index-code mutual information, total correlation and dimension-wise
KL (see :class:`KLTerms`).

The kernels (cpu, cuda, triton) stream over j with an online logsumexp and keep O(B·D) memory;
they return the four log-densities of :class:`KLTerms` (``log_qz``, ``log_prod_qz``, ``log_qz_x``,
``log_pz``) and take all four gradients in one backward, so that only the three differences are
left to autograd.

Model batches: inputs of shape (K, B, D) hold the batches of K models (``pyvae.train.fit_grid``),
each decomposed on its own (pairs never cross models) in one launch; ``torch.func.vmap`` over the
op turns the vmapped dim into that K (the vmap rules below).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from pyvae.ops import _backend, _checks, _register

OP = "kl_decomposition"
ESTIMATORS = ("mws", "mss")
LOG_2PI = math.log(2 * math.pi)


class KLTerms(NamedTuple):
    """Per-sample terms of the decomposition, each of shape (B,) (or (K, B) for K models), in
    nats.

    ``mi + tc + dim_kl == log_qz_x - log_pz`` (the single-sample KL to the prior), up to
    rounding.
    """

    mi: torch.Tensor           # index-code mutual information: log_qz_x - log_qz
    tc: torch.Tensor           # total correlation: log_qz - log_prod_qz
    dim_kl: torch.Tensor       # dimension-wise KL: log_prod_qz - log_pz
    log_qz: torch.Tensor       # log q(z_i), the aggregate posterior's estimate
    log_prod_qz: torch.Tensor  # log prod_d q(z_id), the product of its marginals' estimate
    log_qz_x: torch.Tensor     # log q(z_i | x_i)
    log_pz: torch.Tensor       # log p(z_i) under the standard normal prior


def pair_log_weights(estimator: str, batch: int, dataset_size: int) -> tuple[float, float, float]:
    """The log-weights (self, next, other) of the pairs (i, i), (i, (i+1) mod B) and the rest.

    ``"mws"``: -log(N·B) for every pair. ``"mss"``: log(1/N), log((N-B+1)/(N(B-1))) and
    log(1/(B-1)), so that each row's weights sum to one (Chen et al. 2018, Appendix C).
    """
    # Python ints: a numpy int64 N·B would overflow silently.
    n, b = int(dataset_size), int(batch)
    if estimator == "mws":
        w = -math.log(n * b)
        return w, w, w
    if estimator == "mss":
        return (-math.log(n), math.log(n - b + 1) - math.log(n) - math.log(b - 1),
                -math.log(b - 1))
    raise ValueError(f"{OP}: estimator must be one of {ESTIMATORS}, got {estimator!r}")


def _pair_log_weight_matrix(estimator: str, batch: int, dataset_size: int, *,
                            dtype: torch.dtype, device) -> torch.Tensor:
    w_self, w_next, w_other = pair_log_weights(estimator, batch, dataset_size)
    weights = torch.full((batch, batch), w_other, dtype=dtype, device=device)
    rows = torch.arange(batch, device=device)
    weights[rows, (rows + 1) % batch] = w_next
    weights[rows, rows] = w_self
    return weights


def mss_log_weights(batch: int, dataset_size: int, *, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The dense (B, B) matrix of minibatch-stratified-sampling log-weights log w_ij.

    Row i weighs the posteriors q(z_i | x_j) of the batch: 1/N on j = i,
    (N-B+1)/(N(B-1)) on the stratified neighbour j = (i+1) mod B and 1/(B-1) elsewhere; each
    row sums to one. For tests and the reference; the kernels use the three values directly.
    """
    _check_sizes(batch, dataset_size)
    return _pair_log_weight_matrix("mss", batch, dataset_size, dtype=dtype, device=device)


def _check_sizes(batch: int, dataset_size) -> None:
    if not isinstance(dataset_size, numbers.Integral) or isinstance(dataset_size, bool):
        raise TypeError(f"{OP}: dataset_size must be an int, got {type(dataset_size).__name__}")
    if batch < 2:
        raise ValueError(f"{OP}: the batch must hold at least 2 samples, got {batch}")
    if dataset_size < batch:
        raise ValueError(f"{OP}: dataset_size ({dataset_size}) must be at least the batch size "
                         f"({batch})")


def _log_normal(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(logvar)), broadcasting."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _terms(log_qz, log_prod_qz, log_qz_x, log_pz) -> KLTerms:
    """The decomposition from its four log-densities."""
    return KLTerms(mi=log_qz_x - log_qz, tc=log_qz - log_prod_qz, dim_kl=log_prod_qz - log_pz,
                   log_qz=log_qz, log_prod_qz=log_prod_qz, log_qz_x=log_qz_x, log_pz=log_pz)


def kl_decomposition_reference(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                               dataset_size: int, *, estimator: str = "mws") -> KLTerms:
    """Eager PyTorch version of the op, materialising the ([K,] B, B, D) pair log-densities.

    The ground truth of the tests and the eager baseline of the benchmarks; needs
    K·B²·D elements of memory. Same conventions as :func:`kl_decomposition`.
    """
    acc = _checks.accumulation_dtype(z.dtype)
    batch = z.shape[-2]
    _check_sizes(batch, dataset_size)
    zc, m, lv = z.to(acc), mu.to(acc), logvar.to(acc)
    ell = _log_normal(zc[..., :, None, :], m[..., None, :, :], lv[..., None, :, :])  # [k, i, j, d]
    lw = _pair_log_weight_matrix(estimator, batch, dataset_size, dtype=acc, device=z.device)
    log_qz = torch.logsumexp(lw + ell.sum(-1), dim=-1)
    log_prod_qz = torch.logsumexp(lw[:, :, None] + ell, dim=-2).sum(-1)
    log_qz_x = _log_normal(zc, m, lv).sum(-1)
    log_pz = (-0.5 * (LOG_2PI + zc * zc)).sum(-1)
    return _terms(log_qz, log_prod_qz, log_qz_x, log_pz)


# ---- the kernel ops (pyvae::kl_decomposition_forward / _backward and their Triton twins) ------

# The forward op returns the four log-densities, then lse_marginal ([K,] B, D), the per-dimension
# logsumexps that only its backward uses; the backward op takes the four densities' gradients.
DENSITIES = ("log_qz", "log_prod_qz", "log_qz_x", "log_pz")


def _fake_forward(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other):
    acc = _checks.accumulation_dtype(z.dtype)
    rows = [z.new_empty(z.shape[:-1], dtype=acc) for _ in DENSITIES]
    return (*rows, z.new_empty(z.shape, dtype=acc))


def _fake_backward(grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz, z, mu, logvar,
                   log_qz, lse_marginal, log_weight_self, log_weight_next, log_weight_other):
    return torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, mu, logvar, *log_weights = inputs
    log_qz, lse_marginal = output[0], output[-1]
    ctx.log_weights = log_weights
    ctx.mark_non_differentiable(lse_marginal)
    # The backward recomputes the pair terms from these: O(B·D), never the B×B×D tensor.
    ctx.save_for_backward(z, mu, logvar, log_qz, lse_marginal)


def _backward(ctx, backward_op, *grads):
    # grads: those of the four densities, then lse_marginal's (not differentiable: ignored).
    z, mu, logvar, log_qz, lse_marginal = ctx.saved_tensors
    density_grads = [None if g is None else g.contiguous() for g in grads[:len(DENSITIES)]]
    grad_z, grad_mu, grad_logvar = backward_op(*density_grads, z, mu, logvar, log_qz,
                                               lse_marginal, *ctx.log_weights)
    return grad_z, grad_mu, grad_logvar, None, None, None


def _check_kernel_args(z, mu, logvar, *log_weights) -> None:
    """The checks of check_kl_decomposition_args (csrc/ops/kl_decomposition.cpp), for the
    Triton custom ops: RuntimeErrors naming the argument before a kernel reads any pointer.
    The pair log-weights are any floats."""
    if not isinstance(z, torch.Tensor) or z.dim() not in (2, 3):
        raise RuntimeError(f"{OP}: z must be 2-D (batch, dim) or 3-D (models, batch, dim), got "
                           f"{getattr(z, 'shape', type(z).__name__)}")
    _checks.kernel_dtype(OP, "z", z)
    if z.shape[-2] < 2:
        raise RuntimeError(f"{OP}: need a batch of at least 2, got {z.shape[-2]} (z of shape "
                           f"{_checks._sizes(z.shape)})")
    if z.shape[-1] < 1:
        raise RuntimeError(f"{OP}: need at least one latent dimension, got z of shape "
                           f"{tuple(z.shape)}")
    _checks.kernel_like(OP, "z", z, z, "like z")
    _checks.kernel_like(OP, "mu", mu, z, "like z")
    _checks.kernel_like(OP, "logvar", logvar, z, "like z")


def _check_kernel_backward_args(grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz, z,
                                mu, logvar, log_qz, lse_marginal, *log_weights) -> None:
    """The forward's kernel checks plus the saved outputs, ([K,] B) and ([K,] B, D), and the
    incoming gradients, ([K,] B) each: contiguous, in the accumulation dtype of z."""
    _check_kernel_args(z, mu, logvar)
    acc = _checks.accumulation_dtype(z.dtype)
    rows = z.shape[:-1]
    _checks.kernel_tensor(OP, "log_qz", log_qz, rows, acc, z.device, "like the forward's log_qz")
    _checks.kernel_tensor(OP, "lse_marginal", lse_marginal, z.shape, acc, z.device,
                          "like the forward's lse_marginal")
    grads = (grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz)
    for density, grad in zip(DENSITIES, grads):
        if grad is not None:
            _checks.kernel_tensor(OP, f"grad_{density}", grad, rows, acc, z.device, "like log_qz")


def _triton_launchers():
    from pyvae.kernels import kl_decomposition
    return kl_decomposition


def _models_first(info, in_dims, args, z_index: int):
    """The vmap rules' arguments as (K', B, D) launches: every tensor with the vmapped models
    first (expanded where not vmapped), and a (K, K2, B, D) stack (vmap over an op already given
    (K2, B, D) inputs) flattened to (K·K2, B, D); returns them and the (K[, K2]) leading shape
    (that of ``args[z_index]``, z, less its (B, D))."""
    args = _register.batched_args(info, in_dims, args)
    lead = args[z_index].shape[:-2]

    def flat(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.reshape(-1, *t.shape[len(lead):]).contiguous()

    return [flat(a) for a in args], lead


def _vmap_forward(op, info, in_dims, z, mu, logvar, *log_weights):
    """vmap of the forward op: the vmapped dim becomes the K of one (K, B, D) launch."""
    (z, mu, logvar), lead = _models_first(info, in_dims[:3], (z, mu, logvar), 0)
    outputs = op(z, mu, logvar, *log_weights)
    return (tuple(out.reshape(*lead, *out.shape[1:]) for out in outputs),
            (0,) * len(outputs))


def _vmap_backward(op, info, in_dims, *args):
    """vmap of the backward op: every tensor (incoming gradients, inputs, saved outputs) with the
    models first, one (K, B, D) launch."""
    tensors, lead = _models_first(info, in_dims[:9], args[:9], 4)
    grads = op(*tensors, *args[9:])
    return tuple(g.reshape(*lead, *g.shape[1:]) for g in grads), (0, 0, 0)


KERNEL_OP = _register.define_kernel_op(
    OP,
    forward_schema="(Tensor z, Tensor mu, Tensor logvar, float log_weight_self, "
                   "float log_weight_next, float log_weight_other) -> (Tensor log_qz, "
                   "Tensor log_prod_qz, Tensor log_qz_x, Tensor log_pz, Tensor lse_marginal)",
    backward_schema="(Tensor? grad_log_qz, Tensor? grad_log_prod_qz, Tensor? grad_log_qz_x, "
                    "Tensor? grad_log_pz, Tensor z, Tensor mu, Tensor logvar, Tensor log_qz, "
                    "Tensor lse_marginal, float log_weight_self, float log_weight_next, "
                    "float log_weight_other) -> (Tensor grad_z, Tensor grad_mu, "
                    "Tensor grad_logvar)",
    triton_launchers=_triton_launchers, check_forward=_check_kernel_args,
    check_backward=_check_kernel_backward_args, fake_forward=_fake_forward,
    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    vmap_forward=_vmap_forward, vmap_backward=_vmap_backward)


# ---- the public op ------------------------------------------------------------------------------

def kl_decomposition(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int,
                     *, estimator: str = "mws") -> KLTerms:
    """Minibatch estimates of the β-TCVAE decomposition of the KL to the standard normal prior.

    Args:
        z: one sample per posterior, ``z_i ~ N(mu_i, exp(logvar_i))``, shape (B, D), B >= 2,
            float16 / bfloat16 / float32 / float64; or (K, B, D): the batches of K models, each
            decomposed on its own in one launch (as K calls would, up to rounding).
        mu: posterior means of the batch, shape of ``z``, same dtype and device as ``z``.
        logvar: posterior log-variances log σ², shape of ``z``, same dtype and device.
        dataset_size: N, the number of training points the batch is drawn from (an int >= B).
        estimator: ``"mws"`` (minibatch-weighted sampling, weight 1/(N·B) for every pair) or
            ``"mss"`` (minibatch-stratified sampling, Chen et al. 2018, Appendix C).

    Returns:
        :class:`KLTerms` of per-sample tensors of shape (B,) (or (K, B)) in nats: ``mi``, ``tc``,
        ``dim_kl``, ``log_qz``, ``log_prod_qz``, ``log_qz_x`` and ``log_pz``; float32 (float64
        for float64 inputs), accumulated in float32 for half-precision inputs. Differentiable
        with respect to ``z``, ``mu`` and ``logvar``. The kernel backends use O(B·D) memory; the
        reference backend materialises B×B×D elements.

        Under ``torch.func.vmap`` (forward, and backward through autograd, ``torch.func.grad``
        or ``vjp``) the vmapped models are the K of one launch; the numbers equal the per-model
        calls.
    """
    _checks.check_float_tensor(OP, "z", z)
    if z.dim() not in (2, 3):
        raise ValueError(f"{OP}: z must be 2-D (batch, dim) or 3-D (models, batch, dim), got "
                         f"shape {tuple(z.shape)}")
    _checks.check_like(OP, "mu", mu, "z", z)
    _checks.check_like(OP, "logvar", logvar, "z", z)
    batch, dim = z.shape[-2:]
    _check_sizes(batch, dataset_size)
    if dim < 1:
        raise ValueError(f"{OP}: z must have at least one latent dimension, got shape "
                         f"{tuple(z.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{OP}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _checks.check_finite(OP, z=z, mu=mu, logvar=logvar)

    backend = _backend.resolve(OP, z.device)
    if backend == "reference":
        return kl_decomposition_reference(z, mu, logvar, dataset_size, estimator=estimator)
    log_weights = pair_log_weights(estimator, batch, int(dataset_size))
    *densities, _ = KERNEL_OP.apply(backend, z.contiguous(), mu.contiguous(),
                                    logvar.contiguous(), *log_weights)
    return _terms(*densities)
