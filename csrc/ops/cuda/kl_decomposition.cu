// CUDA kernels of the streaming minibatch log-density estimator behind the β-TCVAE KL
// decomposition (the maths is in ops/kl_decomposition.h): log q(z_i) and log q(z_id) as
// logsumexps over the batch of posteriors, and their gradients, without a B x B x D tensor. The
// per-row terms that come with them, log prod_d q(z_id) = sum_d log q(z_id), log q(z_i | x_i) and
// log p(z_i), are computed (forward) and differentiated (backward) in the same kernels, added to
// the pair sums before the single rounding to the input dtype.
//
// Work split: a row (a sample i in the forward and grad_z kernels, a posterior j in the
// grad_mu/grad_logvar kernel) belongs to a group of `lanes` threads of one warp, a power of two up
// to 32, and lane l holds dims l, l + lanes, ... (up to kMaxDimsPerLane of them) in registers. A
// block owns blockDim / lanes rows and streams the other side of the pair in tiles staged in
// shared memory, with the per-(j, d) constants exp(-logvar) and log 2 pi + logvar computed once
// per tile load. The joint sum over d is a shuffle reduction within the lane group. D beyond
// 32 * kMaxDimsPerLane = 256 is walked in chunks of 256 dims; then the joint score of a pair is
// recomputed over all D by the lane group straight from global memory (kFused = false).
//
// K models' batches, (K, B, D), are one launch: blockIdx.y is the model k, whose rows the kernels
// reach through model_params (grids of more than 65535 models are launched in slices of that).
//
// Logsumexps run in base 2 on log2-scaled terms. The forward keeps a running (max, sum) per
// output and pushes one term at a time, which costs one exp2 per term: no tile-wide max pass and
// no rescale. Every pair term is visited in a fixed order, so the results are deterministic; no
// atomics anywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/device_math.cuh"
#include "ops/cuda/kl_decomposition.h"

namespace pyvae {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMinThreads = 64;
// An explicit minimum (one 256-thread block, i.e. the full 255-register budget) also stops ptxas
// from parking live values in local memory, which it otherwise does for the fused forward.
constexpr int kMinBlocksPerSm = 1;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxDimsPerLane = 8;
// Staged rows x dims per tile (3 arrays of it): 24 KiB of shared memory in float32 and float64.
constexpr int kTileElementsFloat = 2048;
constexpr int kTileElementsDouble = 1024;
constexpr int kMaxTileRows = 64;

constexpr double kLog2E = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kLog2Pi = 1.8378770664093453;

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

template <typename A>
__device__ __forceinline__ A lowest() {
  return std::is_same<A, double>::value ? A(-DBL_MAX) : A(-FLT_MAX);
}

// Streaming base-2 logsumexp: (m, l) is the running max and the sum of exp2(term - m). One exp2
// per term: exp2(-|x - m|) is either the new term's share or the rescale of the old sum. m starts
// at the lowest finite value rather than -inf, so x - m is never -inf - -inf: a -inf term (a zero
// pair weight) adds exactly 0, and a row of only -inf terms ends at l = 0, i.e. -inf.
template <typename A>
__device__ __forceinline__ void lse_push(A& m, A& l, A x) {
  const A delta = x - m;
  const A e = exp2_acc(-fabs(delta));
  const bool up = delta > A(0);
  l = up ? fma(l, e, A(1)) : l + e;
  m = up ? x : m;
}

template <typename A>
__device__ __forceinline__ A lse_finish(A m, A l) {
  return (m + log2_acc(l)) * A(kLn2);
}

// Sum over the `lanes` threads of a lane group (aligned within a warp); every lane gets the same,
// bitwise identical result. All 32 lanes of the warp must call it.
template <typename A>
__device__ __forceinline__ A lane_sum(A v, int lanes_log2) {
#pragma unroll
  for (int offset = kWarpSize >> 1; offset > 0; offset >>= 1) {
    if (offset < (1 << lanes_log2)) v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Rows of the tile that starts at `start`: tile_rows, or what is left of the batch.
__device__ __forceinline__ int tile_extent(int64_t batch, int64_t start, int tile_rows) {
  return batch - start < tile_rows ? static_cast<int>(batch - start) : tile_rows;
}

// Log2 pair weight of (i, j); next_i = (i + 1) mod B. The self weight wins, which only matters for
// B = 1, where next_i == i.
template <typename A>
__device__ __forceinline__ A pair_weight(int64_t i, int64_t next_i, int64_t j, A w_self, A w_next,
                                         A w_other) {
  return j == i ? w_self : (j == next_i ? w_next : w_other);
}

// log2 q(z_i | x_j) = sum_d log2 q(z_id | x_j) over all D, by the lane group of row i (or j) from
// global memory. Only the chunked kernels (D > 256) call it.
template <typename T>
__device__ acc_t<T> joint_score_direct(const T* __restrict__ z_row, const T* __restrict__ mu_row,
                                       const T* __restrict__ logvar_row, int64_t dim, int lane,
                                       int lanes_log2) {
  using A = acc_t<T>;
  A part = 0;
  for (int64_t d = lane; d < dim; d += int64_t{1} << lanes_log2) {
    const A lv = to_acc(logvar_row[d]);
    const A diff = to_acc(z_row[d]) - to_acc(mu_row[d]);
    part += A(-0.5 * kLog2E) * (A(kLog2Pi) + lv + diff * diff * exp_acc(-lv));
  }
  return lane_sum(part, lanes_log2);
}

// Stages `rows` posteriors from j0, dims [d0, d0 + chunk), as [rows][chunk] arrays:
// mu, inv_var_scale * exp(-logvar) and -0.5 log2(e) (log 2 pi + logvar). Dims >= D get zeros,
// which make their log-density terms exactly 0.
template <typename T>
__device__ __forceinline__ void stage_posteriors(const T* __restrict__ mu,
                                                 const T* __restrict__ logvar, int64_t j0,
                                                 int rows, int64_t d0, int64_t dim, int chunk,
                                                 acc_t<T> inv_var_scale, acc_t<T>* s_mu,
                                                 acc_t<T>* s_inv_var, acc_t<T>* s_c) {
  using A = acc_t<T>;
  for (int idx = threadIdx.x; idx < rows * chunk; idx += blockDim.x) {
    const int r = idx / chunk;
    const int64_t d = d0 + (idx - r * chunk);
    A m = 0;
    A inv_var = 0;
    A c = 0;
    if (d < dim) {
      const int64_t offset = (j0 + r) * dim + d;
      const A lv = to_acc(logvar[offset]);
      m = to_acc(mu[offset]);
      inv_var = inv_var_scale * exp_acc(-lv);
      c = A(-0.5 * kLog2E) * (A(kLog2Pi) + lv);
    }
    s_mu[idx] = m;
    s_inv_var[idx] = inv_var;
    s_c[idx] = c;
  }
}

// Which rows and dims a thread owns; rows of `lanes` threads, blockDim / lanes rows per block.
struct LaneSplit {
  int lanes_log2;
  int lane;
  int64_t row;

  __device__ explicit LaneSplit(int lanes_log2_) : lanes_log2(lanes_log2_) {
    lane = threadIdx.x & ((1 << lanes_log2) - 1);
    row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> lanes_log2) +
          (threadIdx.x >> lanes_log2);
  }
  // Column of the k-th dim of this lane within a chunk.
  __device__ int dim(int k) const { return lane + (k << lanes_log2); }
};

// Launch geometry shared by the three kernels (make_geometry).
struct Geometry {
  int lanes_log2;     // threads per row = 1 << lanes_log2
  int dims_per_lane;  // <= kMaxDimsPerLane; chunk = dims_per_lane << lanes_log2
  int chunk;          // dims per pass, >= D when fused
  int tile_rows;      // streamed rows per shared-memory tile
};

template <typename T>
struct ForwardParams {
  const T* z;
  const T* mu;
  const T* logvar;
  acc_t<T>* log_qz;
  acc_t<T>* log_prod_qz;
  acc_t<T>* log_qz_x;
  acc_t<T>* log_pz;
  acc_t<T>* lse_marginal;
  acc_t<T> w_self;  // log2 pair weights
  acc_t<T> w_next;
  acc_t<T> w_other;
  int64_t batch;
  int64_t dim;
  Geometry geo;
};

template <typename T>
struct BackwardParams {
  const acc_t<T>* grad_log_qz;  // (B,) each, nullptr: zero
  const acc_t<T>* grad_log_prod_qz;
  const acc_t<T>* grad_log_qz_x;
  const acc_t<T>* grad_log_pz;
  const T* z;
  const T* mu;
  const T* logvar;
  const acc_t<T>* log_qz;
  const acc_t<T>* lse_marginal;
  acc_t<T> w_self;
  acc_t<T> w_next;
  acc_t<T> w_other;
  T* grad_z;
  T* grad_mu;
  T* grad_logvar;
  int64_t batch;
  int64_t dim;
  Geometry geo;
};

// The params of model k: every pointer moved to model k's (B,) and (B, D) slices.
template <typename T>
__host__ __device__ ForwardParams<T> model_params(ForwardParams<T> p, int64_t k) {
  const int64_t rows = k * p.batch, elements = rows * p.dim;
  p.z += elements;
  p.mu += elements;
  p.logvar += elements;
  p.log_qz += rows;
  p.log_prod_qz += rows;
  p.log_qz_x += rows;
  p.log_pz += rows;
  p.lse_marginal += elements;
  return p;
}

template <typename T>
__host__ __device__ BackwardParams<T> model_params(BackwardParams<T> p, int64_t k) {
  const int64_t rows = k * p.batch, elements = rows * p.dim;
  if (p.grad_log_qz != nullptr) p.grad_log_qz += rows;
  if (p.grad_log_prod_qz != nullptr) p.grad_log_prod_qz += rows;
  if (p.grad_log_qz_x != nullptr) p.grad_log_qz_x += rows;
  if (p.grad_log_pz != nullptr) p.grad_log_pz += rows;
  p.z += elements;
  p.mu += elements;
  p.logvar += elements;
  p.log_qz += rows;
  p.lse_marginal += elements;
  p.grad_z += elements;
  p.grad_mu += elements;
  p.grad_logvar += elements;
  return p;
}

// One row i per lane group: log_qz[i] and lse_marginal[i, :], streaming all j in staged tiles,
// then the row's sums over d: log_prod_qz[i], log_qz_x[i] and log_pz[i].
template <typename T, bool kFused>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    kl_decomposition_forward_kernel(const ForwardParams<T> params) {
  const ForwardParams<T> p = model_params(params, blockIdx.y);
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Geometry geo = p.geo;
  const int tile = geo.tile_rows * geo.chunk;
  A* s_mu = reinterpret_cast<A*>(smem);
  A* s_h = s_mu + tile;
  A* s_c = s_h + tile;

  const LaneSplit split(geo.lanes_log2);
  const int64_t i = split.row;
  const bool row_ok = i < p.batch;
  // Rows past the batch compute on row B - 1 and store nothing: every thread must reach the
  // barriers and shuffles.
  const int64_t i_load = row_ok ? i : p.batch - 1;
  const int64_t next_i = i + 1 == p.batch ? 0 : i + 1;

  A m_joint = lowest<A>();
  A l_joint = 0;
  A sum_marg = 0;  // this lane's share of log_prod_qz[i], over all chunks
  // D == 0 still runs one pass, over padded dims only: log_qz[i] = logsumexp_j lw_ij, and the
  // sums over d are 0.
  int64_t d0 = 0;
  do {
    A z[kMaxDimsPerLane];
    A m[kMaxDimsPerLane];
    A l[kMaxDimsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k) {
      const int64_t d = d0 + split.dim(k);
      z[k] = k < geo.dims_per_lane && d < p.dim ? to_acc(p.z[i_load * p.dim + d]) : A(0);
      m[k] = lowest<A>();
      l[k] = 0;
    }
    const bool joint = d0 == 0;

    for (int64_t j0 = 0; j0 < p.batch; j0 += geo.tile_rows) {
      const int rows = tile_extent(p.batch, j0, geo.tile_rows);
      __syncthreads();  // the previous tile is consumed
      stage_posteriors(p.mu, p.logvar, j0, rows, d0, p.dim, geo.chunk, A(0.5 * kLog2E), s_mu, s_h,
                       s_c);
      __syncthreads();
      for (int jj = 0; jj < rows; ++jj) {
        const int64_t j = j0 + jj;
        const A w = pair_weight(i, next_i, j, p.w_self, p.w_next, p.w_other);
        const int base = jj * geo.chunk;
        A part = 0;
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) {
          if (k < geo.dims_per_lane) {
            const int c = base + split.dim(k);
            const A diff = z[k] - s_mu[c];
            const A ell = fma(-s_h[c] * diff, diff, s_c[c]);
            part += ell;
            lse_push(m[k], l[k], ell + w);
          }
        }
        if (joint) {
          A score;
          if constexpr (kFused) {
            score = lane_sum(part, geo.lanes_log2);
          } else {
            score = joint_score_direct(p.z + i_load * p.dim, p.mu + j * p.dim,
                                       p.logvar + j * p.dim, p.dim, split.lane, geo.lanes_log2);
          }
          lse_push(m_joint, l_joint, score + w);
        }
      }
    }

#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k) {
      const int64_t d = d0 + split.dim(k);
      if (k < geo.dims_per_lane && d < p.dim) {
        const A lse = lse_finish(m[k], l[k]);
        sum_marg += lse;
        if (row_ok) p.lse_marginal[i * p.dim + d] = lse;
      }
    }
    d0 += geo.chunk;
    // The fused kernel (D <= chunk) makes exactly one pass; saying so stops ptxas from reserving
    // registers for a loop that never repeats (the loop-carried sum_marg cost some 16).
  } while (!kFused && d0 < p.dim);

  // The self pair's log-density and the prior's, in nats, over all D from global memory: one
  // pass over the row, so not worth registers across the pair loop.
  A part_qz_x = 0;
  A part_pz = 0;
  const T* z_row = p.z + i_load * p.dim;
  const T* mu_row = p.mu + i_load * p.dim;
  const T* logvar_row = p.logvar + i_load * p.dim;
  for (int64_t d = split.lane; d < p.dim; d += int64_t{1} << geo.lanes_log2) {
    const A zd = to_acc(z_row[d]);
    const A lv = to_acc(logvar_row[d]);
    const A diff = zd - to_acc(mu_row[d]);
    part_qz_x += A(-0.5) * (A(kLog2Pi) + lv + diff * diff * exp_acc(-lv));
    part_pz += A(-0.5) * (A(kLog2Pi) + zd * zd);
  }
  // Outside the row_ok branch: every lane of the warp takes part in the shuffles.
  const A log_prod_qz = lane_sum(sum_marg, geo.lanes_log2);
  const A log_qz_x = lane_sum(part_qz_x, geo.lanes_log2);
  const A log_pz = lane_sum(part_pz, geo.lanes_log2);
  if (row_ok && split.lane == 0) {
    p.log_qz[i] = lse_finish(m_joint, l_joint);
    p.log_prod_qz[i] = log_prod_qz;
    p.log_qz_x[i] = log_qz_x;
    p.log_pz[i] = log_pz;
  }
}

// One row i per lane group: grad_z[i, d] = -sum_j c_ijd (z_id - mu_jd) exp(-logvar_jd), streaming
// all j in staged tiles, plus the per-row terms -gx_i t_iid - gp_i z_id of log q(z_i | x_i) and
// log p(z_i). Rows past the batch read zero gradients and store nothing.
template <typename T, bool kFused>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    kl_decomposition_grad_z_kernel(const BackwardParams<T> params) {
  const BackwardParams<T> p = model_params(params, blockIdx.y);
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Geometry geo = p.geo;
  const int tile = geo.tile_rows * geo.chunk;
  A* s_mu = reinterpret_cast<A*>(smem);
  A* s_inv_var = s_mu + tile;
  A* s_c = s_inv_var + tile;

  const LaneSplit split(geo.lanes_log2);
  const int64_t i = split.row;
  const bool row_ok = i < p.batch;
  const int64_t i_load = row_ok ? i : p.batch - 1;
  const int64_t next_i = i + 1 == p.batch ? 0 : i + 1;
  const bool has_joint = p.grad_log_qz != nullptr;
  const bool has_marginal = p.grad_log_prod_qz != nullptr;
  const bool has_qz_x = p.grad_log_qz_x != nullptr;
  // With only per-row gradients the pair sums are exactly 0: no pair loop (uniform per launch,
  // so skipping its barriers is safe).
  const int64_t pair_rows = has_joint || has_marginal ? p.batch : 0;

  const A g_joint = has_joint && row_ok ? p.grad_log_qz[i] : A(0);
  const A log2_qz = has_joint ? p.log_qz[i_load] * A(kLog2E) : A(0);
  // log_prod_qz[i] = sum_d lse_marginal[i, d]: one gradient for all the row's dims.
  const A g_marg = has_marginal && row_ok ? p.grad_log_prod_qz[i] : A(0);
  const A g_qz_x = has_qz_x && row_ok ? p.grad_log_qz_x[i] : A(0);
  const A g_pz = p.grad_log_pz != nullptr && row_ok ? p.grad_log_pz[i] : A(0);

  for (int64_t d0 = 0; d0 < p.dim; d0 += geo.chunk) {
    A z[kMaxDimsPerLane];
    A log2_marg[kMaxDimsPerLane];
    A acc[kMaxDimsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k) {
      const int64_t d = d0 + split.dim(k);
      const bool ok = k < geo.dims_per_lane && d < p.dim;
      const int64_t offset = i_load * p.dim + d;
      z[k] = ok ? to_acc(p.z[offset]) : A(0);
      log2_marg[k] = ok && has_marginal ? p.lse_marginal[offset] * A(kLog2E) : A(0);
      acc[k] = 0;
    }

    for (int64_t j0 = 0; j0 < pair_rows; j0 += geo.tile_rows) {
      const int rows = tile_extent(p.batch, j0, geo.tile_rows);
      __syncthreads();
      stage_posteriors(p.mu, p.logvar, j0, rows, d0, p.dim, geo.chunk, A(1), s_mu, s_inv_var,
                       s_c);
      __syncthreads();
      for (int jj = 0; jj < rows; ++jj) {
        const int64_t j = j0 + jj;
        const A w = pair_weight(i, next_i, j, p.w_self, p.w_next, p.w_other);
        const int base = jj * geo.chunk;
        A t[kMaxDimsPerLane];
        A ell[kMaxDimsPerLane];
        A part = 0;
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) {
          const int c = base + split.dim(k);
          const bool ok = k < geo.dims_per_lane;
          const A diff = ok ? z[k] - s_mu[c] : A(0);
          t[k] = ok ? diff * s_inv_var[c] : A(0);
          ell[k] = ok ? fma(diff * t[k], A(-0.5 * kLog2E), s_c[c]) : A(0);
          part += ell[k];
        }
        // c_ijd = g_i p_ij + G_i r_ijd with p, r <= 1 recomputed against the saved logsumexps.
        A gp = 0;
        if (has_joint) {
          A score;
          if constexpr (kFused) {
            score = lane_sum(part, geo.lanes_log2);
          } else {
            score = joint_score_direct(p.z + i_load * p.dim, p.mu + j * p.dim,
                                       p.logvar + j * p.dim, p.dim, split.lane, geo.lanes_log2);
          }
          gp = g_joint * exp2_acc(score + w - log2_qz);
        }
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) {
          if (k < geo.dims_per_lane) {
            const A coef =
                has_marginal ? fma(g_marg, exp2_acc(ell[k] + w - log2_marg[k]), gp) : gp;
            acc[k] = fma(coef, t[k], acc[k]);
          }
        }
      }
    }

    if (row_ok) {
#pragma unroll
      for (int k = 0; k < kMaxDimsPerLane; ++k) {
        const int64_t d = d0 + split.dim(k);
        if (k < geo.dims_per_lane && d < p.dim) {
          // The per-row terms join the pair sum before the one rounding; t_iid uses row i's
          // own posterior, which no tile holds in registers here.
          A sum = fma(g_pz, z[k], acc[k]);
          if (has_qz_x) {
            const A lv = to_acc(p.logvar[i * p.dim + d]);
            sum = fma(g_qz_x, (z[k] - to_acc(p.mu[i * p.dim + d])) * exp_acc(-lv), sum);
          }
          p.grad_z[i * p.dim + d] = from_acc<T>(-sum);
        }
      }
    }
  }
}

// One posterior j per lane group, streaming all i in staged tiles of z, the saved logsumexps and
// the incoming gradients: grad_mu[j, d] = sum_i c_ijd t_ijd and
// grad_logvar[j, d] = 0.5 sum_i c_ijd (q_ijd - 1), t = (z_id - mu_jd) exp(-logvar_jd),
// q = (z_id - mu_jd) t, plus the self term of log q(z_j | x_j): gx_j t_jjd and
// 0.5 gx_j (q_jjd - 1). Each block owns its output rows, so the sums need no atomics.
template <typename T, bool kFused>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    kl_decomposition_grad_posterior_kernel(const BackwardParams<T> params) {
  const BackwardParams<T> p = model_params(params, blockIdx.y);
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Geometry geo = p.geo;
  const int tile = geo.tile_rows * geo.chunk;
  // Two [tile_rows][chunk] arrays, then three per-row ones (backward_typed sizes them).
  A* s_z = reinterpret_cast<A*>(smem);
  A* s_log2_marg = s_z + tile;
  A* s_log2_qz = s_log2_marg + tile;
  A* s_g_joint = s_log2_qz + geo.tile_rows;
  A* s_g_marg = s_g_joint + geo.tile_rows;

  const LaneSplit split(geo.lanes_log2);
  const int64_t j = split.row;
  const bool col_ok = j < p.batch;
  const int64_t j_load = col_ok ? j : p.batch - 1;
  const bool has_joint = p.grad_log_qz != nullptr;
  const bool has_marginal = p.grad_log_prod_qz != nullptr;
  const bool has_qz_x = p.grad_log_qz_x != nullptr;
  // As in the grad_z kernel: no pair loop when only per-row gradients are given.
  const int64_t pair_rows = has_joint || has_marginal ? p.batch : 0;
  const A g_qz_x = has_qz_x && col_ok ? p.grad_log_qz_x[j] : A(0);

  for (int64_t d0 = 0; d0 < p.dim; d0 += geo.chunk) {
    A mu[kMaxDimsPerLane];
    A inv_var[kMaxDimsPerLane];
    A c[kMaxDimsPerLane];
    A acc_mu[kMaxDimsPerLane];
    A acc_logvar[kMaxDimsPerLane];
#pragma unroll
    for (int k = 0; k < kMaxDimsPerLane; ++k) {
      const int64_t d = d0 + split.dim(k);
      const bool ok = k < geo.dims_per_lane && d < p.dim;
      const A lv = ok ? to_acc(p.logvar[j_load * p.dim + d]) : A(0);
      mu[k] = ok ? to_acc(p.mu[j_load * p.dim + d]) : A(0);
      inv_var[k] = ok ? exp_acc(-lv) : A(0);
      c[k] = ok ? A(-0.5 * kLog2E) * (A(kLog2Pi) + lv) : A(0);
      acc_mu[k] = 0;
      acc_logvar[k] = 0;
    }

    for (int64_t i0 = 0; i0 < pair_rows; i0 += geo.tile_rows) {
      const int rows = tile_extent(p.batch, i0, geo.tile_rows);
      __syncthreads();
      for (int idx = threadIdx.x; idx < rows * geo.chunk; idx += blockDim.x) {
        const int r = idx / geo.chunk;
        const int64_t d = d0 + (idx - r * geo.chunk);
        const int64_t offset = (i0 + r) * p.dim + d;
        const bool ok = d < p.dim;
        s_z[idx] = ok ? to_acc(p.z[offset]) : A(0);
        if (has_marginal) s_log2_marg[idx] = ok ? p.lse_marginal[offset] * A(kLog2E) : A(0);
      }
      for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        if (has_joint) {
          s_log2_qz[r] = p.log_qz[i0 + r] * A(kLog2E);
          s_g_joint[r] = p.grad_log_qz[i0 + r];
        }
        if (has_marginal) s_g_marg[r] = p.grad_log_prod_qz[i0 + r];
      }
      __syncthreads();
      for (int ii = 0; ii < rows; ++ii) {
        const int64_t i = i0 + ii;
        const int64_t next_i = i + 1 == p.batch ? 0 : i + 1;
        const A w = pair_weight(i, next_i, j, p.w_self, p.w_next, p.w_other);
        const int base = ii * geo.chunk;
        A t[kMaxDimsPerLane];
        A q[kMaxDimsPerLane];
        A ell[kMaxDimsPerLane];
        A part = 0;
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) {
          const bool ok = k < geo.dims_per_lane;
          const A diff = ok ? s_z[base + split.dim(k)] - mu[k] : A(0);
          t[k] = diff * inv_var[k];
          q[k] = diff * t[k];
          ell[k] = fma(q[k], A(-0.5 * kLog2E), c[k]);
          part += ell[k];
        }
        A gp = 0;
        if (has_joint) {
          A score;
          if constexpr (kFused) {
            score = lane_sum(part, geo.lanes_log2);
          } else {
            score = joint_score_direct(p.z + i * p.dim, p.mu + j_load * p.dim,
                                       p.logvar + j_load * p.dim, p.dim, split.lane,
                                       geo.lanes_log2);
          }
          gp = s_g_joint[ii] * exp2_acc(score + w - s_log2_qz[ii]);
        }
        const A g_marg = has_marginal ? s_g_marg[ii] : A(0);
#pragma unroll
        for (int k = 0; k < kMaxDimsPerLane; ++k) {
          if (k < geo.dims_per_lane) {
            const int cc = base + split.dim(k);
            const A coef =
                has_marginal ? fma(g_marg, exp2_acc(ell[k] + w - s_log2_marg[cc]), gp) : gp;
            acc_mu[k] = fma(coef, t[k], acc_mu[k]);
            acc_logvar[k] = fma(coef, q[k] - A(1), acc_logvar[k]);
          }
        }
      }
    }

    if (col_ok) {
#pragma unroll
      for (int k = 0; k < kMaxDimsPerLane; ++k) {
        const int64_t d = d0 + split.dim(k);
        if (k < geo.dims_per_lane && d < p.dim) {
          // The self term joins the pair sums before the one rounding; z_jd is not staged here.
          A sum_mu = acc_mu[k];
          A sum_logvar = acc_logvar[k];
          if (has_qz_x) {
            const A diff = to_acc(p.z[j * p.dim + d]) - mu[k];
            const A t = diff * inv_var[k];
            sum_mu = fma(g_qz_x, t, sum_mu);
            sum_logvar = fma(g_qz_x, fma(diff, t, A(-1)), sum_logvar);
          }
          p.grad_mu[j * p.dim + d] = from_acc<T>(sum_mu);
          p.grad_logvar[j * p.dim + d] = from_acc<T>(A(0.5) * sum_logvar);
        }
      }
    }
  }
}

// Lane groups of the smallest power of two that gives each lane at most kMaxDimsPerLane dims,
// capped at a warp; beyond 32 * kMaxDimsPerLane = 256 dims the kernels walk chunks of 256.
template <typename T>
Geometry make_geometry(int64_t batch, int64_t dim) {
  Geometry geo;
  geo.lanes_log2 = 0;
  while ((1 << geo.lanes_log2) < kWarpSize &&
         (int64_t{kMaxDimsPerLane} << geo.lanes_log2) < dim) {
    ++geo.lanes_log2;
  }
  const int64_t lanes = int64_t{1} << geo.lanes_log2;
  geo.dims_per_lane = static_cast<int>(
      std::min<int64_t>(std::max<int64_t>((dim + lanes - 1) / lanes, 1), kMaxDimsPerLane));
  geo.chunk = geo.dims_per_lane << geo.lanes_log2;
  const int tile_elements =
      std::is_same<T, double>::value ? kTileElementsDouble : kTileElementsFloat;
  geo.tile_rows = static_cast<int>(
      std::min<int64_t>({std::max(tile_elements / geo.chunk, 1), kMaxTileRows, batch}));
  return geo;
}

// Threads per block: kMaxThreads, halved (down to kMinThreads) while the grid (row blocks of all
// the models) would leave SMs idle, so that mid-sized batches still spread over the device. The
// block size changes no result: each row's terms are visited in the same order.
cudaError_t block_threads(int64_t models, int64_t batch, int lanes_log2, int* threads) {
  int device = 0;
  int sm_count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  int t = kMaxThreads;
  while (t > kMinThreads) {
    const int64_t rows_per_block = t >> lanes_log2;
    const int64_t blocks = models * ((batch + rows_per_block - 1) / rows_per_block);
    if (blocks >= 2 * static_cast<int64_t>(sm_count)) break;
    t >>= 1;
  }
  *threads = t;
  return cudaSuccess;
}

constexpr int64_t kMaxGridY = 65535;

// Grid (row blocks, models): one launch per slice of at most kMaxGridY models.
template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, const Params& params, int64_t models, int threads,
                   size_t smem_bytes, cudaStream_t stream) {
  const int64_t rows_per_block = threads >> params.geo.lanes_log2;
  const int64_t blocks = (params.batch + rows_per_block - 1) / rows_per_block;
  for (int64_t k0 = 0; k0 < models; k0 += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(blocks),
                    static_cast<unsigned>(std::min(models - k0, kMaxGridY)));
    kernel<<<grid, threads, smem_bytes, stream>>>(model_params(params, k0));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_typed(const KLDecompositionForward& args, cudaStream_t stream) {
  using A = acc_t<T>;
  ForwardParams<T> params{static_cast<const T*>(args.z),
                          static_cast<const T*>(args.mu),
                          static_cast<const T*>(args.logvar),
                          static_cast<A*>(args.log_qz),
                          static_cast<A*>(args.log_prod_qz),
                          static_cast<A*>(args.log_qz_x),
                          static_cast<A*>(args.log_pz),
                          static_cast<A*>(args.lse_marginal),
                          static_cast<A>(args.log_weight_self * kLog2E),
                          static_cast<A>(args.log_weight_next * kLog2E),
                          static_cast<A>(args.log_weight_other * kLog2E),
                          args.batch,
                          args.dim,
                          make_geometry<T>(args.batch, args.dim)};
  int threads = 0;
  const cudaError_t err = block_threads(args.models, args.batch, params.geo.lanes_log2, &threads);
  if (err != cudaSuccess) return err;
  const size_t smem = 3 * static_cast<size_t>(params.geo.tile_rows) * params.geo.chunk * sizeof(A);
  if (args.dim <= params.geo.chunk) {
    return launch(kl_decomposition_forward_kernel<T, true>, params, args.models, threads, smem,
                  stream);
  }
  return launch(kl_decomposition_forward_kernel<T, false>, params, args.models, threads, smem,
                stream);
}

template <typename T>
cudaError_t backward_typed(const KLDecompositionBackward& args, cudaStream_t stream) {
  using A = acc_t<T>;
  BackwardParams<T> params{static_cast<const A*>(args.grad_log_qz),
                           static_cast<const A*>(args.grad_log_prod_qz),
                           static_cast<const A*>(args.grad_log_qz_x),
                           static_cast<const A*>(args.grad_log_pz),
                           static_cast<const T*>(args.z),
                           static_cast<const T*>(args.mu),
                           static_cast<const T*>(args.logvar),
                           static_cast<const A*>(args.log_qz),
                           static_cast<const A*>(args.lse_marginal),
                           static_cast<A>(args.log_weight_self * kLog2E),
                           static_cast<A>(args.log_weight_next * kLog2E),
                           static_cast<A>(args.log_weight_other * kLog2E),
                           static_cast<T*>(args.grad_z),
                           static_cast<T*>(args.grad_mu),
                           static_cast<T*>(args.grad_logvar),
                           args.batch,
                           args.dim,
                           make_geometry<T>(args.batch, args.dim)};
  int threads = 0;
  cudaError_t err = block_threads(args.models, args.batch, params.geo.lanes_log2, &threads);
  if (err != cudaSuccess) return err;
  const size_t tile = static_cast<size_t>(params.geo.tile_rows) * params.geo.chunk;
  const size_t smem_z = 3 * tile * sizeof(A);
  // z and log2 lse_marginal per (i, d); log2 log_qz, grad_log_qz and grad_log_prod_qz per i.
  const size_t smem_posterior = (2 * tile + 3 * params.geo.tile_rows) * sizeof(A);
  const bool fused = args.dim <= params.geo.chunk;
  const int64_t models = args.models;
  err = fused ? launch(kl_decomposition_grad_z_kernel<T, true>, params, models, threads, smem_z,
                       stream)
              : launch(kl_decomposition_grad_z_kernel<T, false>, params, models, threads, smem_z,
                       stream);
  if (err != cudaSuccess) return err;
  return fused ? launch(kl_decomposition_grad_posterior_kernel<T, true>, params, models, threads,
                        smem_posterior, stream)
               : launch(kl_decomposition_grad_posterior_kernel<T, false>, params, models, threads,
                        smem_posterior, stream);
}

size_t element_size(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat64:
      return 8;
    case ScalarKind::kFloat32:
      return 4;
    case ScalarKind::kFloat16:
    case ScalarKind::kBFloat16:
      return 2;
  }
  return 0;
}

}  // namespace

cudaError_t kl_decomposition_forward(const KLDecompositionForward& args, cudaStream_t stream) {
  if (args.models == 0 || args.batch == 0) return cudaSuccess;
  return dispatch_scalar_kind(args.kind, [&](auto* tag) {
    return forward_typed<std::remove_pointer_t<decltype(tag)>>(args, stream);
  });
}

cudaError_t kl_decomposition_backward(const KLDecompositionBackward& args, cudaStream_t stream) {
  if (args.models == 0 || args.batch == 0 || args.dim == 0) return cudaSuccess;
  if (args.grad_log_qz == nullptr && args.grad_log_prod_qz == nullptr &&
      args.grad_log_qz_x == nullptr && args.grad_log_pz == nullptr) {
    // No incoming gradient: all three gradients are zero (all-zero bits in every dtype).
    const size_t bytes =
        static_cast<size_t>(args.models * args.batch * args.dim) * element_size(args.kind);
    cudaError_t err = cudaMemsetAsync(args.grad_z, 0, bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(args.grad_mu, 0, bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(args.grad_logvar, 0, bytes, stream);
    return err;
  }
  return dispatch_scalar_kind(args.kind, [&](auto* tag) {
    return backward_typed<std::remove_pointer_t<decltype(tag)>>(args, stream);
  });
}

}  // namespace cuda
}  // namespace pyvae
