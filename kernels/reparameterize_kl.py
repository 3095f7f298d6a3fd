"""Fused reparameterize + KL Triton kernels (forward and backward) and their launchers.

For a diagonal Gaussian posterior N(mu, exp(logvar)) over contiguous row-major (rows, cols)
tensors, the forward kernel computes in one pass

    z[r, c] = mu + exp(logvar / 2) * eps
    kl[r]   = 0.5 * sum_c (mu^2 + exp(logvar) - 1 - logvar)                  (N(0, 1) prior)
    kl[r]   = 0.5 * sum_c (plv - logvar + (exp(logvar) + (mu - pm)^2) / exp(plv) - 1)
                                                                  (N(pm, exp(plv)) prior)

and the backward kernel the gradients of both outputs with respect to mu, logvar and the prior.
``eps`` is either given or generated inside the kernels from a 64-bit seed with the counter-based
Philox4x32-10 noise specified in ``pyvae/ops/_noise.py`` (and ``csrc/ops/philox.h``): the noise of
element (r, c) depends only on (seed, r, c), so the backward regenerates it instead of storing it.

Each program owns a block of rows and walks their columns as a [BLOCK_ROWS, BLOCK_GROUPS, 4] tile:
one Philox evaluation per (row, column group of 4) yields the noise of the 4 columns of the group,
which are contiguous in memory along the last tile axis. Math runs in float32 (float64 for float64
inputs); the KL row sums are accumulated in that precision.
"""
import math

import torch
import triton
import triton.language as tl

from pyvae.ops._checks import accumulation_dtype

# Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, Random123).
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_TWO_PI = tl.constexpr(2.0 * math.pi)

# Launch heuristic: ~2K elements per tile (1K in float64, whose values take two registers each),
# i.e. 8 (4) elements per thread at 8 warps; larger tiles make the noise path spill registers.
_TILE_ELEMENTS = 2048


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counter words (broadcastable tensors) under the key (k0, k1).

    Returns the four uint32 output words with the broadcast shape of the counter words.
    """
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_ROUND_A)
        hi1 = tl.umulhi(c2, _PHILOX_ROUND_B)
        # The low words wrap around on purpose: keep TRITON_DEBUG's overflow checks off them.
        lo0 = tl.mul(c0, _PHILOX_ROUND_A, sanitize_overflow=False)
        lo1 = tl.mul(c2, _PHILOX_ROUND_B, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _unit_uniform(word, compute_dtype: tl.constexpr):
    """uint32 words -> (2 * (word >> 9) + 1) * 2^-24 (exact in float32) in compute_dtype."""
    odd = (word >> 9).to(tl.int32) * 2 + 1
    return (odd.to(tl.float32) * 5.9604644775390625e-08).to(compute_dtype)


@triton.jit
def _philox_normal(seed, rows, groups, compute_dtype: tl.constexpr):
    """Standard-normal noise of the column groups ``groups`` of rows ``rows`` under ``seed``.

    seed: int64 scalar; rows: [BLOCK_ROWS] int64; groups: [BLOCK_GROUPS] int32 (group q holds
    columns 4q..4q+3). Returns [BLOCK_ROWS, BLOCK_GROUPS, 4] in compute_dtype, where [i, j, k] is
    the noise of row rows[i], column 4 * groups[j] + k.
    """
    key_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    key_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # counter = (group, row & 0xffffffff, row >> 32, 0), broadcast to [BLOCK_ROWS, BLOCK_GROUPS].
    c0 = groups.to(tl.uint32)[None, :]
    c1 = (rows & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = (rows >> 32).to(tl.uint32)[:, None]
    c3 = tl.zeros_like(c2)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, key_lo, key_hi)

    # Box-Muller on both word pairs: four normals per Philox evaluation.
    radius_a = tl.sqrt(-2.0 * tl.log(_unit_uniform(w0, compute_dtype)))
    radius_b = tl.sqrt(-2.0 * tl.log(_unit_uniform(w2, compute_dtype)))
    angle_a = _TWO_PI * _unit_uniform(w1, compute_dtype)
    angle_b = _TWO_PI * _unit_uniform(w3, compute_dtype)
    normal0 = (radius_a * tl.cos(angle_a))[:, :, None]
    normal1 = (radius_a * tl.sin(angle_a))[:, :, None]
    normal2 = (radius_b * tl.cos(angle_b))[:, :, None]
    normal3 = (radius_b * tl.sin(angle_b))[:, :, None]

    lanes = tl.arange(0, 4)[None, None, :]
    return tl.where(lanes == 0, normal0,
                    tl.where(lanes == 1, normal1, tl.where(lanes == 2, normal2, normal3)))


@triton.jit
def _load(ptr, offsets, mask, compute_dtype: tl.constexpr):
    """Masked tile load converted to compute_dtype; masked-out elements read 0."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(compute_dtype)


@triton.jit
def _store(ptr, offsets, value, mask):
    """Masked tile store, rounded to the element type of ptr."""
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reparameterize_kl_forward_kernel(
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    seed_ptr,
    prior_mu_ptr,
    prior_logvar_ptr,
    z_ptr,
    kl_ptr,
    n_rows,
    n_cols,
    HAS_EPS: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    """One program per BLOCK_ROWS rows: writes z (rows, cols) and kl (rows,).

    mu/logvar/eps/prior_mu/prior_logvar/z: (n_rows, n_cols) contiguous; kl: (n_rows,) float32
    (float64 for float64 inputs). eps_ptr is read only if HAS_EPS, seed_ptr (one int64) only if not;
    the prior pointers only if HAS_PRIOR.
    """
    is_fp64: tl.constexpr = mu_ptr.dtype.element_ty == tl.float64
    compute_dtype: tl.constexpr = tl.float64 if is_fp64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    # int64 row offsets: rows * cols may exceed 2^31.
    row_offsets = rows[:, None, None] * n_cols
    lanes = tl.arange(0, 4)[None, None, :]
    if not HAS_EPS:
        seed = tl.load(seed_ptr)

    kl = tl.zeros([BLOCK_ROWS], dtype=compute_dtype)
    for group_start in range(0, (n_cols + 3) // 4, BLOCK_GROUPS):
        groups = group_start + tl.arange(0, BLOCK_GROUPS)
        cols = groups[None, :, None] * 4 + lanes
        mask = row_mask[:, None, None] & (cols < n_cols)
        offsets = row_offsets + cols

        # Masked-out elements load 0 everywhere, which makes their KL term exactly 0.
        mu = _load(mu_ptr, offsets, mask, compute_dtype)
        logvar = _load(logvar_ptr, offsets, mask, compute_dtype)
        if HAS_EPS:
            eps = _load(eps_ptr, offsets, mask, compute_dtype)
        else:
            eps = _philox_normal(seed, rows, groups, compute_dtype)

        # One exp serves both sigma and sigma^2 = exp(logvar).
        sigma = tl.exp(0.5 * logvar)
        var = sigma * sigma
        z = mu + sigma * eps
        _store(z_ptr, offsets, z, mask)

        if HAS_PRIOR:
            prior_mu = _load(prior_mu_ptr, offsets, mask, compute_dtype)
            prior_logvar = _load(prior_logvar_ptr, offsets, mask, compute_dtype)
            diff = mu - prior_mu
            term = prior_logvar - logvar + (var + diff * diff) * tl.exp(-prior_logvar) - 1.0
        else:
            term = mu * mu + var - 1.0 - logvar
        kl += tl.sum(tl.sum(term, axis=2), axis=1)

    tl.store(kl_ptr + rows, 0.5 * kl, mask=row_mask)


@triton.jit
def _reparameterize_kl_backward_kernel(
    grad_z_ptr,
    grad_kl_ptr,
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    seed_ptr,
    prior_mu_ptr,
    prior_logvar_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    grad_prior_mu_ptr,
    grad_prior_logvar_ptr,
    n_rows,
    n_cols,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    HAS_EPS: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    """One program per BLOCK_ROWS rows: writes grad_mu and grad_logvar (rows, cols), and with
    HAS_PRIOR and HAS_GRAD_KL also grad_prior_mu and grad_prior_logvar (rows, cols).

    grad_z and all (rows, cols) tensors are contiguous; grad_kl: (n_rows,) in kl's dtype. Only the
    inputs that the enabled gradient paths need are read: grad_z, eps/seed for HAS_GRAD_Z;
    grad_kl, mu and the prior for HAS_GRAD_KL.
    """
    is_fp64: tl.constexpr = mu_ptr.dtype.element_ty == tl.float64
    compute_dtype: tl.constexpr = tl.float64 if is_fp64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_offsets = rows[:, None, None] * n_cols
    lanes = tl.arange(0, 4)[None, None, :]
    if HAS_GRAD_Z and not HAS_EPS:
        seed = tl.load(seed_ptr)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0).to(compute_dtype)
        grad_kl = grad_kl[:, None, None]

    for group_start in range(0, (n_cols + 3) // 4, BLOCK_GROUPS):
        groups = group_start + tl.arange(0, BLOCK_GROUPS)
        cols = groups[None, :, None] * 4 + lanes
        mask = row_mask[:, None, None] & (cols < n_cols)
        offsets = row_offsets + cols

        logvar = _load(logvar_ptr, offsets, mask, compute_dtype)
        sigma = tl.exp(0.5 * logvar)
        grad_mu = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=compute_dtype)
        grad_logvar = tl.zeros([BLOCK_ROWS, BLOCK_GROUPS, 4], dtype=compute_dtype)

        if HAS_GRAD_Z:
            # dz/dmu = 1, dz/dlogvar = sigma * eps / 2.
            grad_z = _load(grad_z_ptr, offsets, mask, compute_dtype)
            if HAS_EPS:
                eps = _load(eps_ptr, offsets, mask, compute_dtype)
            else:
                eps = _philox_normal(seed, rows, groups, compute_dtype)
            grad_mu += grad_z
            grad_logvar += 0.5 * grad_z * sigma * eps

        if HAS_GRAD_KL:
            mu = _load(mu_ptr, offsets, mask, compute_dtype)
            var = sigma * sigma
            if HAS_PRIOR:
                prior_mu = _load(prior_mu_ptr, offsets, mask, compute_dtype)
                prior_logvar = _load(prior_logvar_ptr, offsets, mask, compute_dtype)
                inv_prior_var = tl.exp(-prior_logvar)
                diff = mu - prior_mu
                # dKL/dmu = -dKL/dprior_mu = (mu - pm) / prior_var.
                grad_diff = grad_kl * diff * inv_prior_var
                grad_mu += grad_diff
                grad_logvar += 0.5 * grad_kl * (var * inv_prior_var - 1.0)
                grad_prior_logvar = 0.5 * grad_kl * (1.0 - (var + diff * diff) * inv_prior_var)
                _store(grad_prior_mu_ptr, offsets, -grad_diff, mask)
                _store(grad_prior_logvar_ptr, offsets, grad_prior_logvar, mask)
            else:
                grad_mu += grad_kl * mu
                grad_logvar += 0.5 * grad_kl * (var - 1.0)

        _store(grad_mu_ptr, offsets, grad_mu, mask)
        _store(grad_logvar_ptr, offsets, grad_logvar, mask)


def _launch_config(n_rows, n_cols, dtype):
    """(BLOCK_ROWS, BLOCK_GROUPS, num_warps) for a (n_rows, n_cols) problem of the given dtype.

    A tile spans up to ~2K columns (1K in float64; wider rows loop over column blocks) and, for
    narrower rows, enough rows to reach that many elements.
    """
    tile_elements = _TILE_ELEMENTS // 2 if dtype == torch.float64 else _TILE_ELEMENTS
    block_groups = min(triton.next_power_of_2(triton.cdiv(n_cols, 4)), tile_elements // 4)
    block_rows = min(tile_elements // (4 * block_groups), triton.next_power_of_2(n_rows))
    num_warps = 8 if block_rows * block_groups * 4 >= 1024 else 4
    return block_rows, block_groups, num_warps



def reparameterize_kl_forward(mu, logvar, eps, seed, prior_mu, prior_logvar):
    """Fused z = mu + exp(logvar / 2) * eps and per-row KL(N(mu, exp(logvar)) || prior).

    Args:
        mu, logvar: (rows, cols) contiguous, float32/float64/float16/bfloat16.
        eps: (rows, cols) contiguous noise in mu's dtype, or None to generate it from ``seed``.
        seed: (1,) int64 tensor on mu's device, read inside the kernel (no host sync); may be
            None when ``eps`` is given.
        prior_mu, prior_logvar: (rows, cols) contiguous in mu's dtype, or both None for N(0, 1).

    Returns:
        z: (rows, cols) in mu's dtype.
        kl: (rows,) float32, or float64 for float64 inputs.
    """
    n_rows, n_cols = mu.shape
    z = torch.empty_like(mu)
    if n_rows == 0 or n_cols == 0:
        return z, torch.zeros(n_rows, dtype=accumulation_dtype(mu.dtype), device=mu.device)
    kl = torch.empty(n_rows, dtype=accumulation_dtype(mu.dtype), device=mu.device)

    has_eps, has_prior = eps is not None, prior_mu is not None
    block_rows, block_groups, num_warps = _launch_config(n_rows, n_cols, mu.dtype)
    # Pointers of disabled paths are never dereferenced; mu stands in for them.
    _reparameterize_kl_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
        mu,
        logvar,
        eps if has_eps else mu,
        mu if has_eps else seed,
        prior_mu if has_prior else mu,
        prior_logvar if has_prior else mu,
        z,
        kl,
        n_rows,
        n_cols,
        HAS_EPS=has_eps,
        HAS_PRIOR=has_prior,
        BLOCK_ROWS=block_rows,
        BLOCK_GROUPS=block_groups,
        num_warps=num_warps,
    )
    return z, kl


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu, prior_logvar):
    """Gradients of the fused op; the noise is regenerated from ``seed`` when ``eps`` is None.

    Args:
        grad_z: (rows, cols) contiguous in mu's dtype, or None when no gradient reaches z.
        grad_kl: (rows,) contiguous in kl's dtype, or None when no gradient reaches kl.
        mu, logvar, eps, seed, prior_mu, prior_logvar: the forward's inputs.

    Returns:
        (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar): (rows, cols) in mu's dtype;
        the prior gradients are None without a prior.
    """
    has_grad_z, has_grad_kl = grad_z is not None, grad_kl is not None
    has_eps, has_prior = eps is not None, prior_mu is not None
    n_rows, n_cols = mu.shape
    if n_rows == 0 or n_cols == 0 or not (has_grad_z or has_grad_kl):
        grad_mu, grad_logvar = torch.zeros_like(mu), torch.zeros_like(logvar)
        if not has_prior:
            return grad_mu, grad_logvar, None, None
        return grad_mu, grad_logvar, torch.zeros_like(prior_mu), torch.zeros_like(prior_logvar)

    grad_mu, grad_logvar = torch.empty_like(mu), torch.empty_like(logvar)
    grad_prior_mu = grad_prior_logvar = None
    if has_prior:
        # The prior only enters the KL: without grad_kl its gradients are zero (kernel skips them).
        new_prior_grad = torch.empty_like if has_grad_kl else torch.zeros_like
        grad_prior_mu, grad_prior_logvar = new_prior_grad(prior_mu), new_prior_grad(prior_logvar)

    block_rows, block_groups, num_warps = _launch_config(n_rows, n_cols, mu.dtype)
    # Pointers of disabled paths are never dereferenced; mu stands in for them.
    _reparameterize_kl_backward_kernel[(triton.cdiv(n_rows, block_rows),)](
        grad_z if has_grad_z else mu,
        grad_kl if has_grad_kl else mu,
        mu,
        logvar,
        eps if has_eps else mu,
        mu if has_eps else seed,
        prior_mu if has_prior else mu,
        prior_logvar if has_prior else mu,
        grad_mu,
        grad_logvar,
        grad_prior_mu if has_prior else mu,
        grad_prior_logvar if has_prior else mu,
        n_rows,
        n_cols,
        HAS_GRAD_Z=has_grad_z,
        HAS_GRAD_KL=has_grad_kl,
        HAS_EPS=has_eps,
        HAS_PRIOR=has_prior,
        BLOCK_ROWS=block_rows,
        BLOCK_GROUPS=block_groups,
        num_warps=num_warps,
    )
    return grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar
