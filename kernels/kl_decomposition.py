"""Streaming minibatch log-density (β-TCVAE KL decomposition) Triton kernels and their launchers.

For a batch of B samples z_i of the diagonal Gaussian posteriors N(mu_j, exp(logvar_j)) (j < B, D
dimensions), with ell_ijd = log N(z_id; mu_jd, exp(logvar_jd)) and the pair log-weight lw_ij
(log_weight_self for j == i, log_weight_next for j == (i + 1) mod B, log_weight_other otherwise),
the forward computes

    log_qz[i]          = logsumexp_j (lw_ij + sum_d ell_ijd)                       (B,)
    lse_marginal[i, d] = logsumexp_j (lw_ij + ell_ijd)                             (B, D)
    log_prod_qz[i]     = sum_d lse_marginal[i, d]                                  (B,)
    log_qz_x[i]        = sum_d ell_iid  (log q(z_i | x_i), the self pair's density)  (B,)
    log_pz[i]          = sum_d -0.5 (log 2 pi + z_id^2)  (the standard normal prior) (B,)

and the backward the gradients of log_qz, log_prod_qz, log_qz_x and log_pz with respect to z, mu
and logvar (lse_marginal is saved for the backward only). A (K, B, D) input holds K models'
batches, each computed on its own in the same launch: program id 1 is the model, whose (B,) and
(B, D) slices every kernel moves its pointers to first. Neither pass ever stores the B x B x D
tensor ell: the forward streams over j in tiles with an online logsumexp (the FlashAttention
pattern) and the backward recomputes the pair terms from the saved logsumexps. log_qz_x and log_pz
involve no pair: each row's program computes them (and their gradients) from the row's own z, mu
and logvar, which it loads anyway.

Tiles are [BLOCK_I, BLOCK_J, BLOCK_D]; a tile holds the whole of D for D <= 128 and the kernels walk
D in 128-wide chunks beyond that (the forward in a separate pass for the joint, the backward by
recomputing the full-D joint scores for every chunk). All logsumexps run
in base 2 on log2-scaled terms, so each pair term costs a few FMAs and one exp2: the per-(j, d)
coefficients 0.5 log2(e) exp(-logvar) and -0.5 log2(e) (log 2 pi + logvar) are computed once per
tile load and shared by the BLOCK_I (or BLOCK_J) rows of the tile. Math runs in float32 (float64 for
float64 inputs).
"""
import math
import struct

import torch
import triton
import triton.language as tl

from pyvae.ops._checks import accumulation_dtype

_LOG2E = tl.constexpr(1.4426950408889634)
_HALF_LOG2E = tl.constexpr(0.7213475204444817)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG_2PI = tl.constexpr(1.8378770664093453)

# D up to this many dimensions lives in one tile; larger D is walked in chunks of this size.
_MAX_BLOCK_D = 128
# Elements of a [BLOCK_I, BLOCK_J, BLOCK_D] tile and per thread (half as many in float64): 16 per
# live temporary keeps every kernel within the register file without spilling (sm_80, sm_90).
_TILE_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 16
# Rows per step of the streamed (inner-loop) axis: the running-max rescale of the marginals costs
# one exp2 per (row, dim) per step, so a longer step amortises it over more pair terms.
_STREAM_BLOCK = 16
_MAX_OWNED_BLOCK = 64


@triton.jit
def _scalar_weight(hi, lo, compute_dtype: tl.constexpr):
    """A log2 weight passed as an fp32 (hi, lo) pair, reassembled in compute_dtype."""
    return tl.cast(hi, compute_dtype) + tl.cast(lo, compute_dtype)


@triton.jit
def _pair_weights(rows, cols, n, w_self, w_next, w_other):
    """[BLOCK_I, BLOCK_J] log2 pair weights of rows x cols; -inf where either index is >= n.

    -inf makes an out-of-range pair contribute exactly 0 to every sum of exp2 and every gradient.
    """
    i = rows[:, None]
    j = cols[None, :]
    next_j = tl.where(i + 1 == n, 0, i + 1)
    # The self weight wins over the next one, which only matters for B = 1 where (i + 1) mod B == i.
    w = tl.where(j == i, w_self, tl.where(j == next_j, w_next, w_other))
    return tl.where((i < n) & (j < n), w, float("-inf"))


@triton.jit
def _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype: tl.constexpr):
    """mu, exp(-logvar) and -0.5 log2(e) (log 2 pi + logvar) of rows `cols`, dims `dims`: [BJ, BD].

    log2 q(z_d | x_j) = c - 0.5 log2(e) (z_d - mu) (z_d - mu) exp(-logvar). Out-of-range lanes get
    inv_var = c = 0, so their terms are exactly 0 in every sum over d and every gradient.
    """
    mask = (cols[:, None] < n) & (dims[None, :] < n_dims)
    offsets = cols.to(tl.int64)[:, None] * n_dims + dims[None, :]
    mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
    logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(compute_dtype)
    inv_var = tl.where(mask, tl.exp(-logvar), 0.0)
    c = tl.where(mask, (logvar + _LOG_2PI) * -_HALF_LOG2E, 0.0)
    return mu, inv_var, c


@triton.jit
def _load_rows(ptr, rows, dims, n, n_dims, compute_dtype: tl.constexpr):
    """[BLOCK_I, BLOCK_D] tile of a contiguous (n, n_dims) tensor; 0 outside."""
    mask = (rows[:, None] < n) & (dims[None, :] < n_dims)
    offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(compute_dtype)


@triton.jit
def _row_log_densities(z, mu_ptr, logvar_ptr, rows, dims, n, n_dims, compute_dtype: tl.constexpr):
    """sum over `dims` of log q(z_id | x_i) and of log p(z_id) (natural log) for the rows' own z: [BI] each.

    z: [BLOCK_I, BLOCK_D] (0 outside); out-of-range lanes add exactly 0 to both sums.
    """
    mask = (rows[:, None] < n) & (dims[None, :] < n_dims)
    mu = _load_rows(mu_ptr, rows, dims, n, n_dims, compute_dtype)
    logvar = _load_rows(logvar_ptr, rows, dims, n, n_dims, compute_dtype)
    diff = z - mu
    log_qz_x = tl.where(mask, -0.5 * (_LOG_2PI + logvar + diff * diff * tl.exp(-logvar)), 0.0)
    log_pz = tl.where(mask, -0.5 * (_LOG_2PI + z * z), 0.0)
    return tl.sum(log_qz_x, axis=1), tl.sum(log_pz, axis=1)


@triton.jit
def _joint_scores(
    z_ptr, mu_ptr, logvar_ptr, rows, cols, n, n_dims, BLOCK_D: tl.constexpr, compute_dtype: tl.constexpr
):
    """[BLOCK_I, BLOCK_J] log2 sum_d q(z_id | x_j), walking D in BLOCK_D chunks (D > BLOCK_D only)."""
    score = tl.zeros([rows.shape[0], cols.shape[0]], dtype=compute_dtype)
    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        z = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)
        mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
        diff = z[:, None, :] - mu[None, :, :]
        score += tl.sum(c[None, :, :] - (inv_var * _HALF_LOG2E)[None, :, :] * diff * diff, axis=2)
    return score


@triton.jit
def _lse_update(m, l, x, AXIS: tl.constexpr):
    """One step of a streaming base-2 logsumexp of x along AXIS.

    (m, l): running max and running sum of exp2(. - m), with x's shape less AXIS. Lanes that have
    only seen -inf pivot on 0 instead of their max, so -inf - -inf (NaN) is never formed, and such
    lanes keep l = 0 until a finite term arrives.
    """
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - pivot) + tl.sum(tl.exp2(x - tl.expand_dims(pivot, AXIS)), axis=AXIS)
    return m_new, l


@triton.jit
def _kl_decomposition_forward_kernel(
    z_ptr,
    mu_ptr,
    logvar_ptr,
    log_qz_ptr,
    log_prod_qz_ptr,
    log_qz_x_ptr,
    log_pz_ptr,
    lse_marginal_ptr,
    n,
    n_dims,
    w_self_hi,
    w_self_lo,
    w_next_hi,
    w_next_lo,
    w_other_hi,
    w_other_lo,
    ONE_D_TILE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_I rows i of one model: streams all j and writes log_qz[i],
    lse_marginal[i, :] and its sum log_prod_qz[i], and (from the rows' own z, mu, logvar, no pair)
    log_qz_x[i] and log_pz[i].

    z/mu/logvar: (models, n, n_dims) contiguous; log_qz, log_prod_qz, log_qz_x, log_pz (n,) and
    lse_marginal (n, n_dims) in the compute dtype. The w_* pairs are the log2 pair weights (see
    _scalar_weight).
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    model_rows = tl.program_id(1).to(tl.int64) * n
    z_ptr += model_rows * n_dims
    mu_ptr += model_rows * n_dims
    logvar_ptr += model_rows * n_dims
    log_qz_ptr += model_rows
    log_prod_qz_ptr += model_rows
    log_qz_x_ptr += model_rows
    log_pz_ptr += model_rows
    lse_marginal_ptr += model_rows * n_dims
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < n

    m_joint = tl.full([BLOCK_I], float("-inf"), dtype=compute_dtype)
    l_joint = tl.zeros([BLOCK_I], dtype=compute_dtype)
    if ONE_D_TILE:
        # Joint and marginals from the same pair terms: one pass over j.
        dims = tl.arange(0, BLOCK_D)
        z_rows = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)
        log_qz_x, log_pz = _row_log_densities(z_rows, mu_ptr, logvar_ptr, rows, dims, n, n_dims, compute_dtype)
        z = z_rows[:, None, :]
        m_marg = tl.full([BLOCK_I, BLOCK_D], float("-inf"), dtype=compute_dtype)
        l_marg = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
        for j_start in range(0, n, BLOCK_J):
            cols = j_start + tl.arange(0, BLOCK_J)
            mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
            diff = z - mu[None, :, :]
            ell = c[None, :, :] - (inv_var * _HALF_LOG2E)[None, :, :] * diff * diff
            w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
            m_joint, l_joint = _lse_update(m_joint, l_joint, tl.sum(ell, axis=2) + w, 1)
            m_marg, l_marg = _lse_update(m_marg, l_marg, ell + w[:, :, None], 1)
        lse = (m_marg + tl.log2(tl.where(row_mask[:, None], l_marg, 1.0))) * _LN2
        offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
        mask = row_mask[:, None] & (dims[None, :] < n_dims)
        tl.store(lse_marginal_ptr + offsets, lse, mask=mask)
        log_prod_qz = tl.sum(tl.where(mask, lse, 0.0), axis=1)
    else:
        # The joint needs full-D scores before its exp2: one pass over j for it, then one per chunk of D
        # for the marginals, whose running state per chunk fits in registers.
        for j_start in range(0, n, BLOCK_J):
            cols = j_start + tl.arange(0, BLOCK_J)
            score = _joint_scores(z_ptr, mu_ptr, logvar_ptr, rows, cols, n, n_dims, BLOCK_D, compute_dtype)
            w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
            m_joint, l_joint = _lse_update(m_joint, l_joint, score + w, 1)
        log_prod_qz = tl.zeros([BLOCK_I], dtype=compute_dtype)
        log_qz_x = tl.zeros([BLOCK_I], dtype=compute_dtype)
        log_pz = tl.zeros([BLOCK_I], dtype=compute_dtype)
        for d_start in range(0, n_dims, BLOCK_D):
            dims = d_start + tl.arange(0, BLOCK_D)
            z_rows = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)
            chunk_qz_x, chunk_pz = _row_log_densities(z_rows, mu_ptr, logvar_ptr, rows, dims, n, n_dims,
                                                      compute_dtype)
            log_qz_x += chunk_qz_x
            log_pz += chunk_pz
            z = z_rows[:, None, :]
            m_marg = tl.full([BLOCK_I, BLOCK_D], float("-inf"), dtype=compute_dtype)
            l_marg = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
            for j_start in range(0, n, BLOCK_J):
                cols = j_start + tl.arange(0, BLOCK_J)
                mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
                diff = z - mu[None, :, :]
                ell = c[None, :, :] - (inv_var * _HALF_LOG2E)[None, :, :] * diff * diff
                w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
                m_marg, l_marg = _lse_update(m_marg, l_marg, ell + w[:, :, None], 1)
            lse = (m_marg + tl.log2(tl.where(row_mask[:, None], l_marg, 1.0))) * _LN2
            offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
            mask = row_mask[:, None] & (dims[None, :] < n_dims)
            tl.store(lse_marginal_ptr + offsets, lse, mask=mask)
            log_prod_qz += tl.sum(tl.where(mask, lse, 0.0), axis=1)
    # Rows past the batch saw only -inf terms (l = 0); l = 1 keeps their (unstored) log2 finite.
    tl.store(log_qz_ptr + rows, (m_joint + tl.log2(tl.where(row_mask, l_joint, 1.0))) * _LN2, mask=row_mask)
    tl.store(log_prod_qz_ptr + rows, log_prod_qz, mask=row_mask)
    tl.store(log_qz_x_ptr + rows, log_qz_x, mask=row_mask)
    tl.store(log_pz_ptr + rows, log_pz, mask=row_mask)


@triton.jit
def _pair_coefficients(
    ell,
    w,
    z_ptr,
    mu_ptr,
    logvar_ptr,
    rows,
    cols,
    n,
    n_dims,
    log2_qz,
    grad_log_qz,
    log2_marg,
    grad_marg,
    HAS_GRAD_JOINT: tl.constexpr,
    HAS_GRAD_MARGINAL: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    compute_dtype: tl.constexpr,
):
    """c_ijd = grad_log_qz[i] p_ij + grad_log_prod_qz[i] r_ijd for one [BI, BJ, BD] tile.

    ell: log2 q(z_id | x_j) of the tile's dims; w: [BI, BJ] log2 pair weights; log2_qz, grad_log_qz,
    grad_marg (grad_log_prod_qz): [BI]; log2_marg: [BI, BD]. Returns [BI, BJ, 1] when only the joint
    has a gradient. At least one of HAS_GRAD_JOINT, HAS_GRAD_MARGINAL must be set.
    """
    if HAS_GRAD_JOINT:
        if ONE_D_TILE:
            score = tl.sum(ell, axis=2)
        else:
            score = _joint_scores(z_ptr, mu_ptr, logvar_ptr, rows, cols, n, n_dims, BLOCK_D, compute_dtype)
        p = tl.exp2(score + w - log2_qz[:, None])
        coef = (grad_log_qz[:, None] * p)[:, :, None]
        if HAS_GRAD_MARGINAL:
            coef += grad_marg[:, None, None] * tl.exp2(ell + w[:, :, None] - log2_marg[:, None, :])
    else:
        coef = grad_marg[:, None, None] * tl.exp2(ell + w[:, :, None] - log2_marg[:, None, :])
    return coef


@triton.jit
def _model_backward_pointers(z_ptr, mu_ptr, logvar_ptr, log_qz_ptr, lse_marginal_ptr, n, n_dims):
    """The backward's input pointers moved to the (B,) and (B, D) slices of model program_id(1),
    and the offsets of those slices: (..., model_rows, model_rows * n_dims).

    The incoming gradients are all (B,) slices: a kernel moves each by model_rows. An absent one's
    stand-in (log_qz, also (models, n)) stays in bounds and is never read.
    """
    model_rows = tl.program_id(1).to(tl.int64) * n
    return (z_ptr + model_rows * n_dims, mu_ptr + model_rows * n_dims, logvar_ptr + model_rows * n_dims,
            log_qz_ptr + model_rows, lse_marginal_ptr + model_rows * n_dims, model_rows, model_rows * n_dims)


@triton.jit
def _load_row_vector(ptr, rows, n, HAS: tl.constexpr, compute_dtype: tl.constexpr):
    """ptr[rows] in the compute dtype if HAS (0 past n), else zeros without a load: [len(rows)]."""
    values = tl.zeros([rows.shape[0]], dtype=compute_dtype)
    if HAS:
        values = tl.load(ptr + rows, mask=rows < n, other=0.0).to(compute_dtype)
    return values


@triton.jit
def _kl_decomposition_grad_z_kernel(
    grad_log_qz_ptr,
    grad_log_prod_qz_ptr,
    grad_log_qz_x_ptr,
    grad_log_pz_ptr,
    z_ptr,
    mu_ptr,
    logvar_ptr,
    log_qz_ptr,
    lse_marginal_ptr,
    grad_z_ptr,
    n,
    n_dims,
    w_self_hi,
    w_self_lo,
    w_next_hi,
    w_next_lo,
    w_other_hi,
    w_other_lo,
    HAS_GRAD_JOINT: tl.constexpr,
    HAS_GRAD_MARGINAL: tl.constexpr,
    HAS_GRAD_QZ_X: tl.constexpr,
    HAS_GRAD_PZ: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_I rows i: grad_z[i, d] = -sum_j c_ijd (z_id - mu_jd) exp(-logvar_jd)
    - grad_log_qz_x[i] (z_id - mu_id) exp(-logvar_id) - grad_log_pz[i] z_id.

    The incoming gradients (n,) and saved logsumexps are in the compute dtype; grad_log_qz_ptr and
    log_qz_ptr are read only if HAS_GRAD_JOINT, grad_log_prod_qz_ptr and lse_marginal_ptr only if
    HAS_GRAD_MARGINAL, grad_log_qz_x_ptr only if HAS_GRAD_QZ_X, grad_log_pz_ptr only if HAS_GRAD_PZ.
    Without a joint or marginal gradient the pair loop is skipped.
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    z_ptr, mu_ptr, logvar_ptr, log_qz_ptr, lse_marginal_ptr, model_rows, offset = _model_backward_pointers(
        z_ptr, mu_ptr, logvar_ptr, log_qz_ptr, lse_marginal_ptr, n, n_dims)
    grad_log_qz_ptr += model_rows
    grad_log_prod_qz_ptr += model_rows
    grad_log_qz_x_ptr += model_rows
    grad_log_pz_ptr += model_rows
    grad_z_ptr += offset
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < n
    # Out-of-range rows read log q = 0 and gradient 0; their pair weights are -inf anyway.
    log2_qz = _load_row_vector(log_qz_ptr, rows, n, HAS_GRAD_JOINT, compute_dtype) * _LOG2E
    grad_log_qz = _load_row_vector(grad_log_qz_ptr, rows, n, HAS_GRAD_JOINT, compute_dtype)
    grad_marg = _load_row_vector(grad_log_prod_qz_ptr, rows, n, HAS_GRAD_MARGINAL, compute_dtype)
    grad_qz_x = _load_row_vector(grad_log_qz_x_ptr, rows, n, HAS_GRAD_QZ_X, compute_dtype)
    grad_pz = _load_row_vector(grad_log_pz_ptr, rows, n, HAS_GRAD_PZ, compute_dtype)

    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        z_rows = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)
        acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
        # The rows' own terms, no pair: d log q(z_i | x_i) / dz = -t_ii, d log p(z_i) / dz = -z_i.
        if HAS_GRAD_QZ_X:
            mu_self = _load_rows(mu_ptr, rows, dims, n, n_dims, compute_dtype)
            logvar_self = _load_rows(logvar_ptr, rows, dims, n, n_dims, compute_dtype)
            acc += grad_qz_x[:, None] * (z_rows - mu_self) * tl.exp(-logvar_self)
        if HAS_GRAD_PZ:
            acc += grad_pz[:, None] * z_rows
        if HAS_GRAD_JOINT or HAS_GRAD_MARGINAL:
            z = z_rows[:, None, :]
            log2_marg = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
            if HAS_GRAD_MARGINAL:
                log2_marg = _load_rows(lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype) * _LOG2E
            for j_start in range(0, n, BLOCK_J):
                cols = j_start + tl.arange(0, BLOCK_J)
                mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
                diff = z - mu[None, :, :]
                t = diff * inv_var[None, :, :]
                ell = c[None, :, :] - diff * t * _HALF_LOG2E
                w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
                coef = _pair_coefficients(
                    ell,
                    w,
                    z_ptr,
                    mu_ptr,
                    logvar_ptr,
                    rows,
                    cols,
                    n,
                    n_dims,
                    log2_qz,
                    grad_log_qz,
                    log2_marg,
                    grad_marg,
                    HAS_GRAD_JOINT,
                    HAS_GRAD_MARGINAL,
                    ONE_D_TILE,
                    BLOCK_D,
                    compute_dtype,
                )
                acc += tl.sum(coef * t, axis=1)
        offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
        mask = row_mask[:, None] & (dims[None, :] < n_dims)
        tl.store(grad_z_ptr + offsets, (-acc).to(grad_z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_decomposition_grad_posterior_kernel(
    grad_log_qz_ptr,
    grad_log_prod_qz_ptr,
    grad_log_qz_x_ptr,
    z_ptr,
    mu_ptr,
    logvar_ptr,
    log_qz_ptr,
    lse_marginal_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    n,
    n_dims,
    w_self_hi,
    w_self_lo,
    w_next_hi,
    w_next_lo,
    w_other_hi,
    w_other_lo,
    HAS_GRAD_JOINT: tl.constexpr,
    HAS_GRAD_MARGINAL: tl.constexpr,
    HAS_GRAD_QZ_X: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_J posteriors j, streaming all i (each program owns its output rows, so
    no atomics): grad_mu[j, d] = sum_i c_ijd t_ijd + grad_log_qz_x[j] t_jjd and grad_logvar[j, d] =
    0.5 sum_i c_ijd (q_ijd - 1) + 0.5 grad_log_qz_x[j] (q_jjd - 1), with t = (z_id - mu_jd)
    exp(-logvar_jd) and q = (z_id - mu_jd) t. log p(z) has no mu or logvar, hence no grad_log_pz.
    Without a joint or marginal gradient the pair loop is skipped.
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    z_ptr, mu_ptr, logvar_ptr, log_qz_ptr, lse_marginal_ptr, model_rows, offset = _model_backward_pointers(
        z_ptr, mu_ptr, logvar_ptr, log_qz_ptr, lse_marginal_ptr, n, n_dims)
    grad_log_qz_ptr += model_rows
    grad_log_prod_qz_ptr += model_rows
    grad_log_qz_x_ptr += model_rows
    grad_mu_ptr += offset
    grad_logvar_ptr += offset
    cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < n
    grad_qz_x = _load_row_vector(grad_log_qz_x_ptr, cols, n, HAS_GRAD_QZ_X, compute_dtype)

    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
        acc_mu = tl.zeros([BLOCK_J, BLOCK_D], dtype=compute_dtype)
        acc_logvar = tl.zeros([BLOCK_J, BLOCK_D], dtype=compute_dtype)
        # The posteriors' own sample, no pair: log q(z_j | x_j).
        if HAS_GRAD_QZ_X:
            # (Own names: the pair loop's diff and t are [BI, BJ, BD], and compiled Triton would carry
            # these [BJ, BD] ones into it.)
            diff_self = _load_rows(z_ptr, cols, dims, n, n_dims, compute_dtype) - mu
            t_self = diff_self * inv_var
            acc_mu += grad_qz_x[:, None] * t_self
            acc_logvar += grad_qz_x[:, None] * (diff_self * t_self - 1.0)
        if HAS_GRAD_JOINT or HAS_GRAD_MARGINAL:
            mu = mu[None, :, :]
            inv_var = inv_var[None, :, :]
            c = c[None, :, :]
            for i_start in range(0, n, BLOCK_I):
                rows = i_start + tl.arange(0, BLOCK_I)
                z = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)[:, None, :]
                log2_qz = _load_row_vector(log_qz_ptr, rows, n, HAS_GRAD_JOINT, compute_dtype) * _LOG2E
                grad_log_qz = _load_row_vector(grad_log_qz_ptr, rows, n, HAS_GRAD_JOINT, compute_dtype)
                grad_marg = _load_row_vector(grad_log_prod_qz_ptr, rows, n, HAS_GRAD_MARGINAL, compute_dtype)
                log2_marg = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
                if HAS_GRAD_MARGINAL:
                    log2_marg = _load_rows(lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype) * _LOG2E
                diff = z - mu
                t = diff * inv_var
                q = diff * t
                ell = c - q * _HALF_LOG2E
                w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
                coef = _pair_coefficients(
                    ell,
                    w,
                    z_ptr,
                    mu_ptr,
                    logvar_ptr,
                    rows,
                    cols,
                    n,
                    n_dims,
                    log2_qz,
                    grad_log_qz,
                    log2_marg,
                    grad_marg,
                    HAS_GRAD_JOINT,
                    HAS_GRAD_MARGINAL,
                    ONE_D_TILE,
                    BLOCK_D,
                    compute_dtype,
                )
                acc_mu += tl.sum(coef * t, axis=0)
                acc_logvar += tl.sum(coef * (q - 1.0), axis=0)
        offsets = cols.to(tl.int64)[:, None] * n_dims + dims[None, :]
        mask = col_mask[:, None] & (dims[None, :] < n_dims)
        tl.store(grad_mu_ptr + offsets, acc_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + offsets, (0.5 * acc_logvar).to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def _launch_config(n, n_dims, dtype):
    """(BLOCK_D, owned rows per program, streamed rows per step, num_warps, ONE_D_TILE).

    The streamed block is _STREAM_BLOCK rows (half that at D > 32, to keep the tile size); the owned
    block fills the rest of a _TILE_ELEMENTS tile, capped at 64 rows and at the batch; the warps give
    each thread _ELEMENTS_PER_THREAD elements of it (both halved in float64).
    """
    block_d = min(triton.next_power_of_2(max(n_dims, 1)), _MAX_BLOCK_D)
    scale = 2 if dtype == torch.float64 else 1
    tile, per_thread = _TILE_ELEMENTS // scale, _ELEMENTS_PER_THREAD // scale
    batch_block = triton.next_power_of_2(n)
    stream = min(_STREAM_BLOCK if block_d <= 32 else _STREAM_BLOCK // 2, batch_block)
    owned = min(max(tile // (block_d * stream), 1), _MAX_OWNED_BLOCK, batch_block)
    num_warps = min(max(owned * stream * block_d // (32 * per_thread), 1), 8)
    return block_d, owned, stream, num_warps, n_dims <= block_d



def _split_log2_weight(log_weight):
    """Natural-log weight -> (hi, lo) fp32 pair of its log2 value.

    Python floats reach a kernel as fp32 scalars; hi + lo carries the weight to ~48 bits, so float64
    inputs keep full precision without a device tensor (and without a host-to-device copy).
    """
    w = float(log_weight) * 1.4426950408889634
    if not math.isfinite(w):
        return w, 0.0
    hi = struct.unpack("f", struct.pack("f", w))[0]
    return hi, w - hi


def _weight_args(log_weight_self, log_weight_next, log_weight_other):
    return (
        *_split_log2_weight(log_weight_self),
        *_split_log2_weight(log_weight_next),
        *_split_log2_weight(log_weight_other),
    )


# Grid axis 1 (the models) holds at most this many programs on CUDA; more models are launched in
# slices.
_MAX_GRID_MODELS = 65535


def _model_slices(models):
    """(first, end) of the slices of at most _MAX_GRID_MODELS models that a launch covers."""
    return [(k, min(k + _MAX_GRID_MODELS, models)) for k in range(0, models, _MAX_GRID_MODELS)]


def kl_decomposition_forward(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other):
    """Streaming log q(z_i), log prod_d q(z_id), log q(z_i | x_i), log p(z_i) and per-dimension
    log q(z_id) of a batch under its own posteriors.

    Args:
        z, mu, logvar: (B, D), or (K, B, D) for K models' batches (each on its own), contiguous
            on one device, float32/float64/float16/bfloat16.
        log_weight_self, log_weight_next, log_weight_other: natural-log pair weights (Python
            floats) for j == i, j == (i + 1) mod B and every other j.

    Returns:
        log_qz: ([K,] B) logsumexp_j (lw_ij + sum_d ell_ijd).
        log_prod_qz: ([K,] B) sum_d lse_marginal[..., d].
        log_qz_x: ([K,] B) sum_d ell_iid = sum_d log N(z_id; mu_id, exp(logvar_id)).
        log_pz: ([K,] B) sum_d log N(z_id; 0, 1).
        lse_marginal: ([K,] B, D) logsumexp_j (lw_ij + ell_ijd), for the backward.
        All in nats, float32, or float64 for float64 inputs.
    """
    n, n_dims = z.shape[-2:]
    out_dtype = accumulation_dtype(z.dtype)
    log_qz, log_prod_qz, log_qz_x, log_pz = (
        torch.empty(z.shape[:-1], dtype=out_dtype, device=z.device) for _ in range(4))
    lse_marginal = torch.empty(z.shape, dtype=out_dtype, device=z.device)
    if log_qz.numel() == 0:
        return log_qz, log_prod_qz, log_qz_x, log_pz, lse_marginal

    # D == 0 needs no special case: every dim lane is masked, log_qz[i] = logsumexp_j lw_ij and the
    # three sums over d are 0.
    block_d, block_i, block_j, num_warps, one_d_tile = _launch_config(n, n_dims, z.dtype)
    tensors = [t.view(-1, n, n_dims) for t in (z, mu, logvar)]
    outputs = [*(t.view(-1, n) for t in (log_qz, log_prod_qz, log_qz_x, log_pz)), lse_marginal.view(-1, n, n_dims)]
    for first, end in _model_slices(tensors[0].shape[0]):
        _kl_decomposition_forward_kernel[(triton.cdiv(n, block_i), end - first)](
            *(t[first:end] for t in tensors + outputs),
            n,
            n_dims,
            *_weight_args(log_weight_self, log_weight_next, log_weight_other),
            ONE_D_TILE=one_d_tile,
            BLOCK_I=block_i,
            BLOCK_J=block_j,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return log_qz, log_prod_qz, log_qz_x, log_pz, lse_marginal


def kl_decomposition_backward(
    grad_log_qz,
    grad_log_prod_qz,
    grad_log_qz_x,
    grad_log_pz,
    z,
    mu,
    logvar,
    log_qz,
    lse_marginal,
    log_weight_self,
    log_weight_next,
    log_weight_other,
):
    """Gradients of kl_decomposition_forward, recomputing the pair terms from its saved outputs.

    Args:
        grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz: ([K,] B) in log_qz's dtype, or
            None for zero.
        z, mu, logvar, log_weight_*: the forward's inputs; log_qz, lse_marginal: its outputs.

    Returns:
        (grad_z, grad_mu, grad_logvar): ([K,] B, D) in the input dtype, all zero when every
        incoming gradient is None.
    """
    grads = (grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz)
    present = [g is not None for g in grads]
    has_joint, has_marginal, has_qz_x, has_pz = present
    n, n_dims = z.shape[-2:]
    if z.numel() == 0 or not any(present):
        return torch.zeros_like(z), torch.zeros_like(mu), torch.zeros_like(logvar)

    grad_z, grad_mu, grad_logvar = torch.empty_like(z), torch.empty_like(mu), torch.empty_like(logvar)
    block_d, owned, stream, num_warps, one_d_tile = _launch_config(n, n_dims, z.dtype)
    weights = _weight_args(log_weight_self, log_weight_next, log_weight_other)
    # (K, B) and (K, B, D) views; pointers of absent gradients are never dereferenced, log_qz
    # stands in for them. Autograd may hand over expanded (stride-0) gradients, e.g. from a .sum()
    # of the outputs.
    log_qz_k = log_qz.view(-1, n)
    joint, marginal, qz_x, pz = (log_qz_k if g is None else g.contiguous().view(-1, n) for g in grads)
    inputs = [t.view(-1, n, n_dims) for t in (z, mu, logvar)]
    saved = [log_qz_k, lse_marginal.view(-1, n, n_dims)]
    outputs = [t.view(-1, n, n_dims) for t in (grad_z, grad_mu, grad_logvar)]
    flags = dict(HAS_GRAD_JOINT=has_joint, HAS_GRAD_MARGINAL=has_marginal, HAS_GRAD_QZ_X=has_qz_x,
                 ONE_D_TILE=one_d_tile)

    # grad_z: programs own rows i and stream j; grad_mu/grad_logvar: own posteriors j and stream i.
    for first, end in _model_slices(inputs[0].shape[0]):
        tensors = [t[first:end] for t in (joint, marginal, qz_x, pz, *inputs, *saved)]
        grid = (triton.cdiv(n, owned), end - first)
        _kl_decomposition_grad_z_kernel[grid](
            *tensors,
            outputs[0][first:end],
            n,
            n_dims,
            *weights,
            **flags,
            HAS_GRAD_PZ=has_pz,
            BLOCK_I=owned,
            BLOCK_J=stream,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
        # log p(z) has no mu or logvar: the posterior kernel takes no grad_log_pz.
        _kl_decomposition_grad_posterior_kernel[grid](
            *tensors[:3],
            *tensors[4:],
            outputs[1][first:end],
            outputs[2][first:end],
            n,
            n_dims,
            *weights,
            **flags,
            BLOCK_I=stream,
            BLOCK_J=owned,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return grad_z, grad_mu, grad_logvar
