"""Streaming minibatch log-density (β-TCVAE KL decomposition) Triton kernels and their launchers.

For a batch of B samples z_i of the diagonal Gaussian posteriors N(mu_j, exp(logvar_j)) (j < B, D
dimensions), with ell_ijd = log N(z_id; mu_jd, exp(logvar_jd)) and the pair log-weight lw_ij
(log_weight_self for j == i, log_weight_next for j == (i + 1) mod B, log_weight_other otherwise),
the forward computes

    log_qz[i]          = logsumexp_j (lw_ij + sum_d ell_ijd)      (B,)
    lse_marginal[i, d] = logsumexp_j (lw_ij + ell_ijd)            (B, D)

and the backward the gradients of both outputs with respect to z, mu and logvar. A (K, B, D) input
holds K models' batches, each computed on its own in the same launch: program id 1 is the model,
whose (B,) and (B, D) slices every kernel moves its pointers to first. Neither pass ever
stores the B x B x D tensor ell: the forward streams over j in tiles with an online logsumexp (the
FlashAttention pattern) and the backward recomputes the pair terms from the saved logsumexps.

The joint term is a matrix product (issue 16). With a = exp(-logvar), a per-(model, d) centre m_d
(the batch mean of mu, from the launcher), zc = z - m and muc = mu - m,

    sum_d ell_ijd = c_j + sum_d [-0.5 a_jd zc_id^2 + a_jd muc_jd zc_id],
    c_j = -0.5 sum_d (log 2 pi + logvar_jd + a_jd muc_jd^2),

so a [BLOCK_I, BLOCK_J] tile of joint scores is [zc^2, zc]_i . [-0.5 a; muc a]_j + c_j: two tl.dot
calls over a BLOCK_D chunk of D (the two halves of the 2D-long contraction) into one accumulator.
The backward's joint part is products too: with P'_ij = grad_log_qz[i] p_ij,
grad_z = -(zc (P' a) - P' (muc a)), grad_mu = a (P'^T zc - muc colsum) and
grad_logvar = 0.5 a (P'^T zc^2 - 2 muc P'^T zc + muc^2 colsum) - 0.5 colsum (colsum_j = sum_i P'_ij).
Only the per-dimension marginal (its logsumexps in the forward, its r_ijd terms in the backward)
stays elementwise, B x B x D exp2s.

Precision of the products. float64 inputs: IEEE float64 products. float32 (and widened
float16/bfloat16) inputs: 3xTF32 tensor-core products (input_precision="tf32x3", ~float32
accuracy) with float32 accumulation. The expanded quadratic cancels: a score's rounding error is
about 2^-24 times its magnitude sum, sum_d 0.5 a_jd (|zc_id| + |muc_jd|)^2, which for narrow
posteriors (a large) far exceeds the score's own size (logvar = -6 gives a = 403). So the launcher
bounds, per posterior j, that sum over every i of the batch relative to a typical score's size
(_joint_operand_stats), and a tile holding a posterior whose ratio exceeds _FP32_GEMM_MAX_CONDITION
computes its products in float64 instead (still tl.dot, input_precision="ieee"). The backward's
joint gradients accumulate in float64 for float32 inputs either way (registers only). Under
TRITON_INTERPRET=1 tl.dot is a numpy matmul in the operands' dtype: float32 products with float32
accumulation, not TF32.

Tiles: every tl.dot dimension is >= 16, so row and column blocks are at least 16 (rows past the
batch are masked) and the product chunk of D is BLOCK_D = max(16, next_power_of_2(D)) up to 128,
its padded dims zero in every operand, so they contribute exactly 0. D beyond 128 is walked in
128-wide chunks: the joint scores sum their products over all chunks, the backward recomputes them
for every chunk of its outputs. The forward runs the joint (one pass over j) and the marginals (one
pass over j per chunk of D, in [BLOCK_I, BLOCK_JM, BLOCK_DM] elementwise tiles, BLOCK_DM the power
of two >= D without the padding to 16) separately. The marginal logsumexps run in base 2 on
log2-scaled terms, with the per-(j, d) coefficients 0.5 log2(e) exp(-logvar) and -0.5 log2(e)
(log 2 pi + logvar) computed once per tile load. Math runs in float32 (float64 for float64 inputs).
Every pair is visited in a fixed order, no atomics: the results are deterministic.
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
# tl.dot's smallest tile dimension.
_MIN_DOT = 16
# float32 products serve a tile whose posteriors' condition (see _joint_operand_stats) is at most
# this: their scores' rounding error stays within this factor of the elementwise form's. Typical
# posteriors (logvar ~ 0) have 10-30, from the spread of z over the batch alone.
_FP32_GEMM_MAX_CONDITION = 32.0
# Elements of an elementwise [BLOCK_I, BLOCK_J, BLOCK_D] tile and per thread (half as many in
# float64): 16 per live temporary keeps every kernel within the register file without spilling.
_TILE_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 16
# Rows per step of the streamed (inner-loop) axis of the products.
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
    mu = inv_var = c = 0, so their terms are exactly 0 in every sum over d and every gradient.
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
def _centred_rows(z_ptr, centre_ptr, rows, dims, n, n_dims, dtype: tl.constexpr):
    """zc = z - m of rows x dims in `dtype`: [BLOCK_I, BLOCK_D]; 0 outside the batch and D."""
    mask = (rows[:, None] < n) & (dims[None, :] < n_dims)
    centre = tl.load(centre_ptr + dims, mask=dims < n_dims, other=0.0).to(dtype)
    return tl.where(mask, _load_rows(z_ptr, rows, dims, n, n_dims, dtype) - centre[None, :], 0.0)


@triton.jit
def _centred_posteriors(mu_ptr, logvar_ptr, centre_ptr, cols, dims, n, n_dims, dtype: tl.constexpr):
    """a = exp(-logvar), muc = mu - m and the constant -0.5 log2(e) (log 2 pi + logvar + a muc^2) of
    posteriors `cols`, dims `dims`, in `dtype`: three [BLOCK_J, BLOCK_D]; all 0 outside."""
    mu, a, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, dtype)
    mask = (cols[:, None] < n) & (dims[None, :] < n_dims)
    centre = tl.load(centre_ptr + dims, mask=dims < n_dims, other=0.0).to(dtype)
    muc = tl.where(mask, mu - centre[None, :], 0.0)
    return muc, a, c - _HALF_LOG2E * a * muc * muc


@triton.jit
def _dot(x, y, acc, dtype: tl.constexpr):
    """acc + x @ y: IEEE products in float64, 3xTF32 (~float32) tensor-core products in float32."""
    if dtype == tl.float64:
        return tl.dot(x, y, acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc, input_precision="tf32x3")


@triton.jit
def _gemm_dtype_is_fp32(condition_ptr, cols, n, compute_dtype: tl.constexpr):
    """Whether the posteriors `cols` may take float32 products: float32 compute and every one's
    condition (condition_ptr, from the launcher) at most _FP32_GEMM_MAX_CONDITION."""
    if compute_dtype == tl.float64:
        return False
    else:
        condition = tl.load(condition_ptr + cols, mask=cols < n, other=0.0)
        return tl.max(condition, axis=0) <= _FP32_GEMM_MAX_CONDITION


@triton.jit
def _joint_scores_in(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims,
                     BLOCK_D: tl.constexpr, dtype: tl.constexpr):
    """[BLOCK_I, BLOCK_J] log2 q(z_i | x_j) in `dtype` as [zc^2, zc] . [-0.5 a; muc a] + c_j,
    summing the products over D in BLOCK_D chunks."""
    score = tl.zeros([rows.shape[0], cols.shape[0]], dtype=dtype)
    const = tl.zeros([cols.shape[0]], dtype=dtype)
    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        zc = _centred_rows(z_ptr, centre_ptr, rows, dims, n, n_dims, dtype)
        muc, a, c = _centred_posteriors(mu_ptr, logvar_ptr, centre_ptr, cols, dims, n, n_dims, dtype)
        score = _dot(zc * zc, tl.trans(a * -_HALF_LOG2E), score, dtype)
        score = _dot(zc, tl.trans(a * muc * _LOG2E), score, dtype)
        const += tl.sum(c, axis=1)
    return score + const[None, :]


@triton.jit
def _joint_scores(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm,
                  BLOCK_D: tl.constexpr, compute_dtype: tl.constexpr):
    """[BLOCK_I, BLOCK_J] log2 sum_d q(z_id | x_j) in compute_dtype: float32 products where
    fp32_gemm (see _gemm_dtype_is_fp32), float64 ones otherwise."""
    if fp32_gemm:
        score = _joint_scores_in(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, BLOCK_D,
                                 tl.float32).to(compute_dtype)
    else:
        score = _joint_scores_in(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, BLOCK_D,
                                 tl.float64).to(compute_dtype)
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
    centre_ptr,
    condition_ptr,
    log_qz_ptr,
    lse_marginal_ptr,
    n,
    n_dims,
    w_self_hi,
    w_self_lo,
    w_next_hi,
    w_next_lo,
    w_other_hi,
    w_other_lo,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_JM: tl.constexpr,
    BLOCK_DM: tl.constexpr,
):
    """One program per BLOCK_I rows i of one model: streams all j and writes log_qz[i] and
    lse_marginal[i, :].

    z/mu/logvar: (models, n, n_dims) contiguous; centre (models, n_dims) and condition (models, n) in the
    compute dtype and float32 (see kl_decomposition_forward); log_qz (n,) and lse_marginal
    (n, n_dims) in the compute dtype. The w_* pairs are the log2 pair weights (see _scalar_weight).
    The joint streams j in BLOCK_J columns of products over BLOCK_D dims, the marginals in
    [BLOCK_I, BLOCK_JM, BLOCK_DM] elementwise tiles.
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    model = tl.program_id(1).to(tl.int64)
    model_rows = model * n
    z_ptr += model_rows * n_dims
    mu_ptr += model_rows * n_dims
    logvar_ptr += model_rows * n_dims
    centre_ptr += model * n_dims
    condition_ptr += model_rows
    log_qz_ptr += model_rows
    lse_marginal_ptr += model_rows * n_dims
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < n

    m_joint = tl.full([BLOCK_I], float("-inf"), dtype=compute_dtype)
    l_joint = tl.zeros([BLOCK_I], dtype=compute_dtype)
    for j_start in range(0, n, BLOCK_J):
        cols = j_start + tl.arange(0, BLOCK_J)
        fp32_gemm = _gemm_dtype_is_fp32(condition_ptr, cols, n, compute_dtype)
        score = _joint_scores(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm,
                              BLOCK_D, compute_dtype)
        w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
        m_joint, l_joint = _lse_update(m_joint, l_joint, score + w, 1)
    # Rows past the batch saw only -inf terms (l = 0); l = 1 keeps their (unstored) log2 finite.
    tl.store(log_qz_ptr + rows, (m_joint + tl.log2(tl.where(row_mask, l_joint, 1.0))) * _LN2, mask=row_mask)

    for d_start in range(0, n_dims, BLOCK_DM):
        dims = d_start + tl.arange(0, BLOCK_DM)
        z = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)[:, None, :]
        m_marg = tl.full([BLOCK_I, BLOCK_DM], float("-inf"), dtype=compute_dtype)
        l_marg = tl.zeros([BLOCK_I, BLOCK_DM], dtype=compute_dtype)
        for j_start in range(0, n, BLOCK_JM):
            cols = j_start + tl.arange(0, BLOCK_JM)
            mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
            diff = z - mu[None, :, :]
            ell = c[None, :, :] - (inv_var * _HALF_LOG2E)[None, :, :] * diff * diff
            w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
            m_marg, l_marg = _lse_update(m_marg, l_marg, ell + w[:, :, None], 1)
        lse = (m_marg + tl.log2(tl.where(row_mask[:, None], l_marg, 1.0))) * _LN2
        offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
        tl.store(lse_marginal_ptr + offsets, lse, mask=row_mask[:, None] & (dims[None, :] < n_dims))


@triton.jit
def _marginal_coefficients(ell, w, log2_marg, grad_marg):
    """grad_lse_marginal[i, d] r_ijd of one [BI, BJ, BD] tile: ell, its log2 q(z_id | x_j); w, the
    [BI, BJ] log2 pair weights; log2_marg, grad_marg: [BI, BD]."""
    return grad_marg[:, None, :] * tl.exp2(ell + w[:, :, None] - log2_marg[:, None, :])


@triton.jit
def _joint_weights(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm, log2_qz,
                   grad_log_qz, w_self, w_next, w_other, BLOCK_D: tl.constexpr,
                   compute_dtype: tl.constexpr):
    """P'_ij = grad_log_qz[i] p_ij of rows x cols: [BLOCK_I, BLOCK_J] in compute_dtype."""
    score = _joint_scores(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm, BLOCK_D,
                          compute_dtype)
    w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
    return grad_log_qz[:, None] * tl.exp2(score + w - log2_qz[:, None])


@triton.jit
def _output(acc, ptr, compute_dtype: tl.constexpr):
    """A float64 accumulator in the element type of ptr, rounded through compute_dtype (a float64 ->
    half cast is not available everywhere)."""
    return acc.to(compute_dtype).to(ptr.dtype.element_ty)


@triton.jit
def _model_backward_pointers(grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr, mu_ptr, logvar_ptr, centre_ptr,
                             condition_ptr, log_qz_ptr, lse_marginal_ptr, n, n_dims, HAS_GRAD_JOINT: tl.constexpr,
                             HAS_GRAD_MARGINAL: tl.constexpr):
    """The backward's input pointers moved to the (B,), (B, D) and (D,) slices of model program_id(1)."""
    model = tl.program_id(1).to(tl.int64)
    model_rows = model * n
    if HAS_GRAD_JOINT:
        grad_log_qz_ptr += model_rows
    if HAS_GRAD_MARGINAL:
        grad_lse_marginal_ptr += model_rows * n_dims
    return (grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr + model_rows * n_dims, mu_ptr + model_rows * n_dims,
            logvar_ptr + model_rows * n_dims, centre_ptr + model * n_dims, condition_ptr + model_rows,
            log_qz_ptr + model_rows, lse_marginal_ptr + model_rows * n_dims, model_rows * n_dims)


@triton.jit
def _kl_decomposition_grad_z_kernel(
    grad_log_qz_ptr,
    grad_lse_marginal_ptr,
    z_ptr,
    mu_ptr,
    logvar_ptr,
    centre_ptr,
    condition_ptr,
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
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_JM: tl.constexpr,
):
    """One program per BLOCK_I rows i: grad_z[i, d] = -sum_j c_ijd (z_id - mu_jd) exp(-logvar_jd).

    Per BLOCK_D chunk of D: the joint part -(zc (P' a) - P' (muc a)) from products over BLOCK_J
    columns, then the marginal part -sum_j G_id r_ijd t_ijd in [BLOCK_I, BLOCK_JM, BLOCK_D] tiles.
    The incoming gradients and saved logsumexps are in the compute dtype; grad_log_qz_ptr is read
    only if HAS_GRAD_JOINT, grad_lse_marginal_ptr and lse_marginal_ptr only if HAS_GRAD_MARGINAL.
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    (grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr, mu_ptr, logvar_ptr, centre_ptr, condition_ptr, log_qz_ptr,
     lse_marginal_ptr, offset) = _model_backward_pointers(grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr, mu_ptr,
                                                         logvar_ptr, centre_ptr, condition_ptr, log_qz_ptr,
                                                         lse_marginal_ptr, n, n_dims, HAS_GRAD_JOINT,
                                                         HAS_GRAD_MARGINAL)
    grad_z_ptr += offset
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < n
    # Out-of-range rows read log q = 0 and gradient 0; their pair weights are -inf anyway.
    log2_qz = tl.zeros([BLOCK_I], dtype=compute_dtype)
    grad_log_qz = tl.zeros([BLOCK_I], dtype=compute_dtype)
    if HAS_GRAD_JOINT:
        log2_qz = tl.load(log_qz_ptr + rows, mask=row_mask, other=0.0).to(compute_dtype) * _LOG2E
        grad_log_qz = tl.load(grad_log_qz_ptr + rows, mask=row_mask, other=0.0).to(compute_dtype)

    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float64)
        if HAS_GRAD_JOINT:
            # sum_j P'_ij a_jd and sum_j P'_ij muc_jd a_jd, accumulated in float64.
            p_a = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float64)
            p_muc_a = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float64)
            for j_start in range(0, n, BLOCK_J):
                cols = j_start + tl.arange(0, BLOCK_J)
                fp32_gemm = _gemm_dtype_is_fp32(condition_ptr, cols, n, compute_dtype)
                p = _joint_weights(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm,
                                   log2_qz, grad_log_qz, w_self, w_next, w_other, BLOCK_D, compute_dtype)
                if fp32_gemm:
                    muc, a, _ = _centred_posteriors(mu_ptr, logvar_ptr, centre_ptr, cols, dims, n, n_dims,
                                                    tl.float32)
                    p32 = p.to(tl.float32)
                    p_a += _dot(p32, a, tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32), tl.float32)
                    p_muc_a += _dot(p32, muc * a, tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32), tl.float32)
                else:
                    muc, a, _ = _centred_posteriors(mu_ptr, logvar_ptr, centre_ptr, cols, dims, n, n_dims,
                                                    tl.float64)
                    p64 = p.to(tl.float64)
                    p_a = _dot(p64, a, p_a, tl.float64)
                    p_muc_a = _dot(p64, muc * a, p_muc_a, tl.float64)
            zc = _centred_rows(z_ptr, centre_ptr, rows, dims, n, n_dims, tl.float64)
            acc = zc * p_a - p_muc_a
        if HAS_GRAD_MARGINAL:
            z = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)[:, None, :]
            log2_marg = _load_rows(lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype) * _LOG2E
            grad_marg = _load_rows(grad_lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype)
            acc_marg = tl.zeros([BLOCK_I, BLOCK_D], dtype=compute_dtype)
            for j_start in range(0, n, BLOCK_JM):
                cols = j_start + tl.arange(0, BLOCK_JM)
                mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
                diff = z - mu[None, :, :]
                t = diff * inv_var[None, :, :]
                ell = c[None, :, :] - diff * t * _HALF_LOG2E
                w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
                acc_marg += tl.sum(_marginal_coefficients(ell, w, log2_marg, grad_marg) * t, axis=1)
            acc += acc_marg.to(tl.float64)
        offsets = rows.to(tl.int64)[:, None] * n_dims + dims[None, :]
        mask = row_mask[:, None] & (dims[None, :] < n_dims)
        tl.store(grad_z_ptr + offsets, _output(-acc, grad_z_ptr, compute_dtype), mask=mask)


@triton.jit
def _kl_decomposition_grad_posterior_kernel(
    grad_log_qz_ptr,
    grad_lse_marginal_ptr,
    z_ptr,
    mu_ptr,
    logvar_ptr,
    centre_ptr,
    condition_ptr,
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
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_IM: tl.constexpr,
):
    """One program per BLOCK_J posteriors j, streaming all i (each program owns its output rows, so
    no atomics): grad_mu[j, d] = sum_i c_ijd t_ijd and grad_logvar[j, d] = 0.5 sum_i c_ijd (q_ijd - 1),
    with t = (z_id - mu_jd) exp(-logvar_jd) and q = (z_id - mu_jd) t.

    Per BLOCK_D chunk of D: the joint part from the products P'^T zc, P'^T zc^2 and the column sums
    of P' over BLOCK_I rows at a time, then the marginal part in [BLOCK_IM, BLOCK_J, BLOCK_D] tiles.
    """
    compute_dtype: tl.constexpr = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    w_self = _scalar_weight(w_self_hi, w_self_lo, compute_dtype)
    w_next = _scalar_weight(w_next_hi, w_next_lo, compute_dtype)
    w_other = _scalar_weight(w_other_hi, w_other_lo, compute_dtype)
    (grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr, mu_ptr, logvar_ptr, centre_ptr, condition_ptr, log_qz_ptr,
     lse_marginal_ptr, offset) = _model_backward_pointers(grad_log_qz_ptr, grad_lse_marginal_ptr, z_ptr, mu_ptr,
                                                         logvar_ptr, centre_ptr, condition_ptr, log_qz_ptr,
                                                         lse_marginal_ptr, n, n_dims, HAS_GRAD_JOINT,
                                                         HAS_GRAD_MARGINAL)
    grad_mu_ptr += offset
    grad_logvar_ptr += offset
    cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < n
    # The product precision depends on the posteriors only: one for the whole program.
    fp32_gemm = _gemm_dtype_is_fp32(condition_ptr, cols, n, compute_dtype)

    for d_start in range(0, n_dims, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        acc_mu = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float64)
        acc_logvar = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float64)
        if HAS_GRAD_JOINT:
            # P'^T zc, P'^T zc^2 and colsum_j = sum_i P'_ij, accumulated in float64.
            p_zc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float64)
            p_zc2 = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float64)
            colsum = tl.zeros([BLOCK_J], dtype=tl.float64)
            for i_start in range(0, n, BLOCK_I):
                rows = i_start + tl.arange(0, BLOCK_I)
                row_mask = rows < n
                log2_qz = tl.load(log_qz_ptr + rows, mask=row_mask, other=0.0).to(compute_dtype) * _LOG2E
                grad_log_qz = tl.load(grad_log_qz_ptr + rows, mask=row_mask, other=0.0).to(compute_dtype)
                p = _joint_weights(z_ptr, mu_ptr, logvar_ptr, centre_ptr, rows, cols, n, n_dims, fp32_gemm,
                                   log2_qz, grad_log_qz, w_self, w_next, w_other, BLOCK_D, compute_dtype)
                colsum += tl.sum(p.to(tl.float64), axis=0)
                if fp32_gemm:
                    zc = _centred_rows(z_ptr, centre_ptr, rows, dims, n, n_dims, tl.float32)
                    pt = tl.trans(p.to(tl.float32))
                    p_zc += _dot(pt, zc, tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32), tl.float32)
                    p_zc2 += _dot(pt, zc * zc, tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32), tl.float32)
                else:
                    zc = _centred_rows(z_ptr, centre_ptr, rows, dims, n, n_dims, tl.float64)
                    pt = tl.trans(p.to(tl.float64))
                    p_zc = _dot(pt, zc, p_zc, tl.float64)
                    p_zc2 = _dot(pt, zc * zc, p_zc2, tl.float64)
            muc, a, _ = _centred_posteriors(mu_ptr, logvar_ptr, centre_ptr, cols, dims, n, n_dims, tl.float64)
            colsum = colsum[:, None]
            acc_mu = a * (p_zc - muc * colsum)
            # 0.5 (a sum_i P' (zc - muc)^2 - colsum); the factor 0.5 is applied at the store.
            acc_logvar = a * (p_zc2 - 2.0 * muc * p_zc + muc * muc * colsum) - colsum
        if HAS_GRAD_MARGINAL:
            mu, inv_var, c = _posterior_tile(mu_ptr, logvar_ptr, cols, dims, n, n_dims, compute_dtype)
            mu = mu[None, :, :]
            inv_var = inv_var[None, :, :]
            c = c[None, :, :]
            marg_mu = tl.zeros([BLOCK_J, BLOCK_D], dtype=compute_dtype)
            marg_logvar = tl.zeros([BLOCK_J, BLOCK_D], dtype=compute_dtype)
            for i_start in range(0, n, BLOCK_IM):
                rows = i_start + tl.arange(0, BLOCK_IM)
                z = _load_rows(z_ptr, rows, dims, n, n_dims, compute_dtype)[:, None, :]
                log2_marg = _load_rows(lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype) * _LOG2E
                grad_marg = _load_rows(grad_lse_marginal_ptr, rows, dims, n, n_dims, compute_dtype)
                diff = z - mu
                t = diff * inv_var
                q = diff * t
                ell = c - q * _HALF_LOG2E
                w = _pair_weights(rows, cols, n, w_self, w_next, w_other)
                coef = _marginal_coefficients(ell, w, log2_marg, grad_marg)
                marg_mu += tl.sum(coef * t, axis=0)
                marg_logvar += tl.sum(coef * (q - 1.0), axis=0)
            acc_mu += marg_mu.to(tl.float64)
            acc_logvar += marg_logvar.to(tl.float64)
        offsets = cols.to(tl.int64)[:, None] * n_dims + dims[None, :]
        mask = col_mask[:, None] & (dims[None, :] < n_dims)
        tl.store(grad_mu_ptr + offsets, _output(acc_mu, grad_mu_ptr, compute_dtype), mask=mask)
        tl.store(grad_logvar_ptr + offsets, _output(0.5 * acc_logvar, grad_logvar_ptr, compute_dtype), mask=mask)


def _launch_config(n, n_dims, dtype):
    """Block sizes and num_warps of the three kernels, as a dict.

    BLOCK_D: the products' chunk of D, max(16, next_power_of_2(D)) up to 128; BLOCK_DM: the forward
    marginals' chunk, the power of two >= D up to 128. owned: the rows (posteriors) a program owns,
    >= 16 (tl.dot's minimum) and filling a _TILE_ELEMENTS elementwise tile with 16 streamed rows, up
    to 64; stream: the streamed rows per product step (16). stream_fwd / stream_bwd: the streamed
    rows per elementwise marginal step, filling the rest of the tile of the forward (BLOCK_DM wide)
    and the backward (BLOCK_D wide). float64 halves the tile and the elements per thread.
    """
    pow2_d = triton.next_power_of_2(max(n_dims, 1))
    block_d = min(max(pow2_d, _MIN_DOT), _MAX_BLOCK_D)
    block_dm = min(pow2_d, _MAX_BLOCK_D)
    scale = 2 if dtype == torch.float64 else 1
    tile, per_thread = _TILE_ELEMENTS // scale, _ELEMENTS_PER_THREAD // scale
    batch_block = max(triton.next_power_of_2(n), _MIN_DOT)
    owned = min(max(tile // (block_dm * _STREAM_BLOCK), _MIN_DOT), _MAX_OWNED_BLOCK, batch_block)

    def stream(width):
        return min(max(tile // (owned * width), 1), _STREAM_BLOCK, triton.next_power_of_2(n))

    stream_fwd, stream_bwd = stream(block_dm), stream(block_d)
    elements = max(owned * stream_bwd * block_d, owned * _STREAM_BLOCK)
    num_warps = min(max(elements // (32 * per_thread), 4), 8)
    return dict(BLOCK_D=block_d, BLOCK_DM=block_dm, owned=owned, stream=_STREAM_BLOCK,
                stream_fwd=stream_fwd, stream_bwd=stream_bwd, num_warps=num_warps)


def _joint_operand_stats(z, mu, logvar):
    """The products' centre m and the conditioning of each posterior's expanded score.

    z, mu, logvar: (K, B, D). Returns centre (K, D), the batch mean of mu over j, and condition
    (K, B): magnitude_j / size_j, where magnitude_j = sum_d 0.5 exp(-logvar_jd) (spread_d +
    |mu_jd - m_d|)^2 with spread_d = max_i |z_id - m_d| bounds the magnitude sum of posterior j's
    terms in any pair's expanded score, and size_j = sum_d 0.5 (|log 2 pi + logvar_jd| + 1) is that of
    a typical pair's direct terms (q = 1): the factor by which the products' rounding error can
    exceed the elementwise form's. Both contiguous in the compute dtype; a few O(K B D) elementwise
    ops, no host synchronisation.
    """
    acc = accumulation_dtype(z.dtype)
    z, mu, logvar = z.to(acc), mu.to(acc), logvar.to(acc)
    centre = mu.mean(dim=1, keepdim=True)
    spread = (z - centre).abs().amax(dim=1, keepdim=True)
    magnitude = (0.5 * torch.exp(-logvar) * (spread + (mu - centre).abs()).square()).sum(dim=-1)
    size = (0.5 * ((logvar + _LOG_2PI.value).abs() + 1.0)).sum(dim=-1)
    return centre.squeeze(1).contiguous(), (magnitude / size).contiguous()


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
    """Streaming log q(z_i) and per-dimension log q(z_id) of a batch under its own posteriors.

    Args:
        z, mu, logvar: (B, D), or (K, B, D) for K models' batches (each on its own), contiguous
            on one device, float32/float64/float16/bfloat16.
        log_weight_self, log_weight_next, log_weight_other: natural-log pair weights (Python
            floats) for j == i, j == (i + 1) mod B and every other j.

    Returns:
        log_qz: ([K,] B) logsumexp_j (lw_ij + sum_d ell_ijd).
        lse_marginal: ([K,] B, D) logsumexp_j (lw_ij + ell_ijd).
        Both float32, or float64 for float64 inputs.
    """
    n, n_dims = z.shape[-2:]
    out_dtype = accumulation_dtype(z.dtype)
    log_qz = torch.empty(z.shape[:-1], dtype=out_dtype, device=z.device)
    lse_marginal = torch.empty(z.shape, dtype=out_dtype, device=z.device)
    if log_qz.numel() == 0:
        return log_qz, lse_marginal

    # D == 0 needs no special case: every dim lane is masked and log_qz[i] = logsumexp_j lw_ij.
    config = _launch_config(n, n_dims, z.dtype)
    tensors = [t.view(-1, n, n_dims) for t in (z, mu, logvar)]
    tensors += _joint_operand_stats(*tensors)
    outputs = [log_qz.view(-1, n), lse_marginal.view(-1, n, n_dims)]
    for first, end in _model_slices(tensors[0].shape[0]):
        _kl_decomposition_forward_kernel[(triton.cdiv(n, config["owned"]), end - first)](
            *(t[first:end] for t in tensors + outputs),
            n,
            n_dims,
            *_weight_args(log_weight_self, log_weight_next, log_weight_other),
            BLOCK_I=config["owned"],
            BLOCK_J=config["stream"],
            BLOCK_D=config["BLOCK_D"],
            BLOCK_JM=config["stream_fwd"],
            BLOCK_DM=config["BLOCK_DM"],
            num_warps=config["num_warps"],
        )
    return log_qz, lse_marginal


def kl_decomposition_backward(
    grad_log_qz,
    grad_lse_marginal,
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
        grad_log_qz: ([K,] B) in log_qz's dtype, or None for zero.
        grad_lse_marginal: ([K,] B, D) in lse_marginal's dtype, or None for zero.
        z, mu, logvar, log_weight_*: the forward's inputs; log_qz, lse_marginal: its outputs.

    Returns:
        (grad_z, grad_mu, grad_logvar): ([K,] B, D) in the input dtype.
    """
    has_joint, has_marginal = grad_log_qz is not None, grad_lse_marginal is not None
    n, n_dims = z.shape[-2:]
    if z.numel() == 0 or not (has_joint or has_marginal):
        return torch.zeros_like(z), torch.zeros_like(mu), torch.zeros_like(logvar)

    # Autograd may hand over expanded (stride-0) gradients, e.g. from a .sum() of the outputs.
    grad_log_qz = grad_log_qz.contiguous() if has_joint else None
    grad_lse_marginal = grad_lse_marginal.contiguous() if has_marginal else None
    grad_z, grad_mu, grad_logvar = torch.empty_like(z), torch.empty_like(mu), torch.empty_like(logvar)
    config = _launch_config(n, n_dims, z.dtype)
    weights = _weight_args(log_weight_self, log_weight_next, log_weight_other)
    # (K, B) and (K, B, D) views; pointers of absent gradients are never dereferenced, log_qz
    # stands in for them.
    log_qz_k = log_qz.view(-1, n)
    grads = (grad_log_qz.view(-1, n) if has_joint else log_qz_k,
             grad_lse_marginal.view(-1, n, n_dims) if has_marginal else log_qz_k)
    inputs = [t.view(-1, n, n_dims) for t in (z, mu, logvar)]
    inputs += _joint_operand_stats(*inputs)
    saved = [log_qz_k, lse_marginal.view(-1, n, n_dims)]
    outputs = [t.view(-1, n, n_dims) for t in (grad_z, grad_mu, grad_logvar)]
    flags = dict(HAS_GRAD_JOINT=has_joint, HAS_GRAD_MARGINAL=has_marginal, BLOCK_D=config["BLOCK_D"],
                 num_warps=config["num_warps"])
    owned, stream, stream_bwd = config["owned"], config["stream"], config["stream_bwd"]

    # grad_z: programs own rows i and stream j; grad_mu/grad_logvar: own posteriors j and stream i.
    for first, end in _model_slices(inputs[0].shape[0]):
        common = [t[first:end] for t in (*grads, *inputs, *saved)]
        grid = (triton.cdiv(n, owned), end - first)
        _kl_decomposition_grad_z_kernel[grid](
            *common, outputs[0][first:end], n, n_dims, *weights, **flags,
            BLOCK_I=owned, BLOCK_J=stream, BLOCK_JM=stream_bwd,
        )
        _kl_decomposition_grad_posterior_kernel[grid](
            *common, outputs[1][first:end], outputs[2][first:end], n, n_dims, *weights, **flags,
            BLOCK_I=stream, BLOCK_J=owned, BLOCK_IM=stream_bwd,
        )
    return grad_z, grad_mu, grad_logvar
