"""Fused reparameterisation and KL divergence of diagonal Gaussians.

``z = mu + exp(logvar / 2) * eps`` and the KL divergence of N(mu, exp(logvar)) to the prior,
summed over the last dimension, in one pass over ``mu`` and ``logvar``. With ``eps=None`` the
noise is generated inside the kernels by Philox (see :mod:`pyvae.ops._noise`) and regenerated in
the backward pass instead of being stored.

Under ``torch.func.vmap`` over K models (``pyvae.train.fit_grid``) the op is one launch on the
stacked (K·rows, cols) tensor. The noise of ``eps=None`` (vmap needs ``randomness="same"`` or
``"different"`` for the seed's draw; the default ``"error"`` refuses it): with ``"same"`` the one
seed drawn per call is shared, and row r of model k is row k·rows + r of the stacked tensor, so
every model gets its own Philox streams, exactly as one call on the models' concatenated rows;
with ``"different"`` each model draws its own seed, and the op runs once per model.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from pyvae.ops import _backend, _checks, _register
from pyvae.ops._noise import philox_normal

OP = "reparameterize_kl"


@torch.library.custom_op("pyvae::philox_normal_like", mutates_args=())
def philox_normal_like(like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The Philox noise of ``seed`` (:func:`pyvae.ops._noise.philox_normal`) for a tensor of
    ``like``'s shape (..., cols), dtype and device: rows are the flattened leading dims. Only
    ``like``'s shape is read. An op of its own for its vmap rule: under ``torch.func.vmap`` the
    models' rows are stacked, as in the kernels' vmap rule, so each model gets its own noise."""
    cols = like.shape[-1]
    noise = philox_normal(seed, like.numel() // max(cols, 1), cols, dtype=like.dtype,
                          device=like.device)
    return noise.reshape(like.shape)


@philox_normal_like.register_fake
def _(like, seed):
    return torch.empty_like(like)


@philox_normal_like.register_vmap
def _(info, in_dims, like, seed):
    if in_dims[1] is not None:  # a seed per model (vmap's randomness="different")
        return _register.per_model_rule(philox_normal_like, info, in_dims, like, seed)
    (like,) = _register.batched_args(info, in_dims[:1], (like,))
    return philox_normal_like(like, seed), 0


def reparameterize_kl_reference(mu, logvar, eps=None, *, prior_mu=None, prior_logvar=None,
                                seed=None):
    """Eager PyTorch version of the op: the ground truth of the tests.

    Same conventions as :func:`reparameterize_kl`; with ``eps=None`` the noise is the Philox
    noise of ``seed`` (a one-element int64 tensor), as in the kernels.
    """
    acc = _checks.accumulation_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    if eps is None:
        eps = philox_normal_like(m.detach(), seed)
    z = (m + torch.exp(0.5 * lv) * eps.to(acc)).to(mu.dtype)
    if prior_mu is None:
        kl = 0.5 * (m * m + torch.exp(lv) - 1.0 - lv).sum(-1)
    else:
        pm, plv = prior_mu.to(acc), prior_logvar.to(acc)
        kl = 0.5 * (plv - lv + (torch.exp(lv) + (m - pm) ** 2) * torch.exp(-plv) - 1.0).sum(-1)
    return z, kl


# ---- the kernel ops (pyvae::reparameterize_kl_forward / _backward and their Triton twins) --------

def _fake_forward(mu, logvar, eps, seed, prior_mu, prior_logvar):
    return torch.empty_like(mu), mu.new_empty(mu.shape[:1], dtype=_checks.accumulation_dtype(mu.dtype))


def _fake_backward(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu, prior_logvar):
    prior_shape = mu.shape if prior_mu is not None else (0,)
    return (torch.empty_like(mu), torch.empty_like(mu), mu.new_empty(prior_shape),
            mu.new_empty(prior_shape))


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, seed, prior_mu, prior_logvar = inputs
    ctx.save_for_backward(mu, logvar, eps, seed, prior_mu, prior_logvar)


def _backward(ctx, backward_op, grad_z, grad_kl):
    mu, logvar, eps, seed, prior_mu, prior_logvar = ctx.saved_tensors
    grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar = backward_op(
        None if grad_z is None else grad_z.contiguous(),
        None if grad_kl is None else grad_kl.contiguous(),
        mu, logvar, eps, seed, prior_mu, prior_logvar)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2] and grad_z is not None:
        grad_eps = grad_z * torch.exp(0.5 * logvar)  # rare: a caller differentiating its eps
    if prior_mu is None:
        grad_prior_mu = grad_prior_logvar = None
    return grad_mu, grad_logvar, grad_eps, None, grad_prior_mu, grad_prior_logvar


def _check_kernel_args(mu, logvar, eps, seed, prior_mu, prior_logvar) -> None:
    """The checks of check_reparameterize_kl_args (csrc/ops/reparameterize_kl.cpp), for the
    Triton custom ops: RuntimeErrors naming the argument before a kernel reads any pointer."""
    if not isinstance(mu, torch.Tensor) or mu.dim() != 2:
        raise RuntimeError(f"{OP}: mu must be 2-D (rows, cols), got "
                           f"{getattr(mu, 'shape', type(mu).__name__)}")
    _checks.kernel_dtype(OP, "mu", mu)
    if (prior_mu is None) != (prior_logvar is None):
        raise RuntimeError(f"{OP}: prior_mu and prior_logvar must be given together")
    if eps is None and seed is None:
        raise RuntimeError(f"{OP}: need eps or a seed")
    _checks.kernel_like(OP, "mu", mu, mu, "like mu")
    _checks.kernel_like(OP, "logvar", logvar, mu, "like mu")
    if eps is not None:
        _checks.kernel_like(OP, "eps", eps, mu, "like mu")
    if prior_mu is not None:
        _checks.kernel_like(OP, "prior_mu", prior_mu, mu, "like mu")
        _checks.kernel_like(OP, "prior_logvar", prior_logvar, mu, "like mu")
    if eps is None:
        _checks.kernel_tensor(OP, "seed", seed, (1,), torch.int64, mu.device,
                              "one int64 on mu's device")


def _check_kernel_backward_args(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu,
                                prior_logvar) -> None:
    """The forward's kernel checks plus grad_z (rows, cols) like z and grad_kl (rows,) like kl."""
    _check_kernel_args(mu, logvar, eps, seed, prior_mu, prior_logvar)
    if grad_z is not None:
        _checks.kernel_like(OP, "grad_z", grad_z, mu, "like z")
    if grad_kl is not None:
        _checks.kernel_tensor(OP, "grad_kl", grad_kl, mu.shape[:1], _checks.accumulation_dtype(mu.dtype),
                              mu.device, "like kl")


def _triton_launchers():
    from pyvae.kernels import reparameterize_kl
    return reparameterize_kl


def _stacked_rows(info, in_dims, tensors):
    """(K·rows, cols) tensors of the models' (rows, cols) ones (None stays None)."""
    return [None if t is None else t.reshape(-1, t.shape[-1]).contiguous()
            for t in _register.batched_args(info, in_dims, tensors)]


def _vmap_forward(op, info, in_dims, mu, logvar, eps, seed, prior_mu, prior_logvar):
    """vmap of the forward op: one launch on the models' stacked rows (with a seed per model,
    vmap's randomness="different", one launch per model)."""
    args = (mu, logvar, eps, seed, prior_mu, prior_logvar)
    if in_dims[3] is not None:
        return _register.per_model_rule(op, info, in_dims, *args)
    rows = mu.shape[-2] if in_dims[0] is None else mu.movedim(in_dims[0], 0).shape[-2]
    mu, logvar, eps, prior_mu, prior_logvar = _stacked_rows(
        info, in_dims[:3] + in_dims[4:], (mu, logvar, eps, prior_mu, prior_logvar))
    z, kl = op(mu, logvar, eps, seed, prior_mu, prior_logvar)
    return (z.reshape(info.batch_size, rows, -1), kl.reshape(info.batch_size, rows)), (0, 0)


def _vmap_backward(op, info, in_dims, grad_z, grad_kl, mu, logvar, eps, seed, prior_mu,
                   prior_logvar):
    """vmap of the backward op: one launch on the stacked rows, as the forward's."""
    args = (grad_z, grad_kl, mu, logvar, eps, seed, prior_mu, prior_logvar)
    if in_dims[5] is not None:
        return _register.per_model_rule(op, info, in_dims, *args)
    rows = mu.shape[-2] if in_dims[2] is None else mu.movedim(in_dims[2], 0).shape[-2]
    grad_kl = None if grad_kl is None else (
        grad_kl.movedim(in_dims[1], 0) if in_dims[1] is not None
        else grad_kl.expand(info.batch_size, *grad_kl.shape)).reshape(-1).contiguous()
    grad_z, mu, logvar, eps, prior_mu, prior_logvar = _stacked_rows(
        info, (in_dims[0],) + in_dims[2:5] + in_dims[6:],
        (grad_z, mu, logvar, eps, prior_mu, prior_logvar))
    grads = op(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu, prior_logvar)
    # Without a prior its gradients are empty placeholders, shared by the models.
    has_prior = prior_mu is not None
    out = tuple(g.reshape(info.batch_size, rows, -1) if has_prior or k < 2 else g
                for k, g in enumerate(grads))
    return out, (0, 0) + ((0, 0) if has_prior else (None, None))


KERNEL_OP = _register.define_kernel_op(
    OP,
    forward_schema="(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed, Tensor? prior_mu, "
                   "Tensor? prior_logvar) -> (Tensor z, Tensor kl)",
    backward_schema="(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor? eps, "
                    "Tensor? seed, Tensor? prior_mu, Tensor? prior_logvar) -> (Tensor grad_mu, "
                    "Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar)",
    triton_launchers=_triton_launchers, check_forward=_check_kernel_args,
    check_backward=_check_kernel_backward_args, fake_forward=_fake_forward,
    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    vmap_forward=_vmap_forward, vmap_backward=_vmap_backward)


# ---- the public op ------------------------------------------------------------------------------

def _check_generator(generator, device: torch.device) -> None:
    """None or a torch.Generator of ``device``'s type; checked whether or not eps is given."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"{OP}: generator is on {generator.device} but mu is on {device}")


# Functions that replace the seed draw of every call inside noise_seeds(...) (innermost last).
_seed_sources: list[Callable[[], torch.Tensor]] = []


@contextlib.contextmanager
def noise_seeds(draw: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, every :func:`reparameterize_kl` call with ``eps=None`` takes its noise
    seed from ``draw()`` (a (1,) int64 tensor, e.g. a per-model seed under ``torch.func.vmap``)
    instead of drawing it from a generator; the ``generator`` argument is then only checked.
    This is how :func:`pyvae.train.fit_grid` gives each model of a grid its own noise stream."""
    _seed_sources.append(draw)
    try:
        yield
    finally:
        _seed_sources.pop()


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """The noise seed of one call: one int64 from ``generator`` (default: the device's default
    generator), on ``device``, or the innermost :func:`noise_seeds` source's.

    Drawing it advances the generator, so consecutive calls get fresh noise and
    ``torch.manual_seed`` reproduces a call; it stays on the device (no host sync).
    """
    if _seed_sources:
        return _seed_sources[-1]()
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device,
                         generator=generator)


def reparameterize_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                      *, prior_mu: torch.Tensor | None = None,
                      prior_logvar: torch.Tensor | None = None,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``z ~ N(mu, exp(logvar))`` by reparameterisation and return it with its KL.

    Args:
        mu: posterior means, shape (..., D), float16 / bfloat16 / float32 / float64.
        logvar: posterior log-variances log σ², same shape, dtype and device as ``mu``.
        eps: standard-normal noise of ``mu``'s shape, used as is. ``None`` (default): generated
            inside the kernel from a seed drawn from ``generator`` and never stored.
        prior_mu, prior_logvar: a diagonal Gaussian prior N(prior_mu, exp(prior_logvar)) of
            ``mu``'s shape (both or neither); default the standard normal N(0, I).
        generator: the ``torch.Generator`` the noise seed is drawn from (default: the default
            generator of ``mu``'s device); it must be on ``mu``'s device type, and is checked
            (but not advanced) when ``eps`` is given.

    Returns:
        ``z`` of ``mu``'s shape and dtype, and ``kl`` of shape ``mu.shape[:-1]``: the KL
        divergence in nats summed over the last dimension, float32 (float64 for float64
        inputs), accumulated in float32 for half-precision inputs. Differentiable with respect
        to ``mu``, ``logvar``, ``eps`` and the prior parameters.
    """
    _checks.check_float_tensor(OP, "mu", mu)
    if mu.dim() < 1:
        raise ValueError(f"{OP}: mu must be at least 1-D (..., D), got a 0-D tensor")
    _checks.check_like(OP, "logvar", logvar, "mu", mu)
    if eps is not None:
        _checks.check_like(OP, "eps", eps, "mu", mu)
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError(f"{OP}: prior_mu and prior_logvar must be given together")
    if prior_mu is not None:
        _checks.check_like(OP, "prior_mu", prior_mu, "mu", mu)
        _checks.check_like(OP, "prior_logvar", prior_logvar, "mu", mu)
    _check_generator(generator, mu.device)
    _checks.check_finite(OP, mu=mu, logvar=logvar, eps=eps, prior_mu=prior_mu,
                         prior_logvar=prior_logvar)

    backend = _backend.resolve(OP, mu.device)
    seed = draw_seed(mu.device, generator) if eps is None else None
    if backend == "reference":
        return reparameterize_kl_reference(mu, logvar, eps, prior_mu=prior_mu,
                                           prior_logvar=prior_logvar, seed=seed)

    cols = mu.shape[-1]
    rows = math.prod(mu.shape[:-1])

    def as_rows(t):
        return None if t is None else t.reshape(rows, cols).contiguous()

    z, kl = KERNEL_OP.apply(backend, as_rows(mu), as_rows(logvar), as_rows(eps), seed,
                            as_rows(prior_mu), as_rows(prior_logvar))
    return z.reshape(mu.shape), kl.reshape(mu.shape[:-1])
