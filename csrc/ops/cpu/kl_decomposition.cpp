// CPU kernels of the streaming minibatch KL decomposition (β-TCVAE); the maths and notation
// (ell_ijd, lw_ij, p_ij, r_ijd, c_ijd, t) are those of ops/kl_decomposition.h.
//
// Nothing of size B x B (let alone B x B x D) is ever stored. The posteriors are kept transposed
// (D, B), so that every hot loop runs over the posteriors j, which are many, rather than over the
// dimensions d, which may be as few as 4: for one sample i and one dimension d, a contiguous loop
// over j gives ell_ijd, adds it into the joint sum_d ell_ijd, and a second gives the marginal's
// logsumexp. The backward makes one pass over the pairs (one exponential per pair-dimension):
// parallel over blocks of samples i, each block adds its part of grad_mu and grad_logvar (sums
// over i) into its own (D, B) buffers, summed afterwards in a fixed order — so the result does
// not depend on the number of threads. Half-precision inputs are widened to float32 once
// (O(B·D)); float32 loops are branch-free and vectorised by GCC (vec_math.h); float64 uses libm
// (the gradcheck path). Every pair term and logsumexp runs in base 2 (log2-scaled ell, exp2 and
// log2), which saves the scaling of each exponential's argument; the outputs are scaled back to
// nats once per row. A (K, B, D) input is K independent batches (K models): the forward runs
// in parallel over the K·B rows, the backward over the K·blocks blocks, each model with the blocks
// (and so the bits) of its own (B, D) call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cpu/vec_math.h"
#include "ops/kl_decomposition.h"

namespace pyvae {
namespace cpu {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
constexpr double kLog2E = 1.4426950408889634073599246810019;
constexpr double kLn2 = 0.69314718055994530941723212145818;
constexpr int kLanes = 16;  // independent partial results of a reduction (vectorisable as is)

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

PYVAE_INLINE float exp2_acc(float x) { return exp2_f32(x); }
PYVAE_INLINE double exp2_acc(double x) { return std::exp2(x); }

// The logsumexp shift: the maximum, or 0 while every term is -inf (so that exp(-inf - shift) is
// 0 rather than NaN).
template <typename T>
PYVAE_INLINE T safe_shift(T max) {
  return max == kNegInf<T> ? T(0) : max;
}

// ---- reductions over j -------------------------------------------------------------------------

template <typename T>
PYVAE_INLINE T max_of(const T* __restrict__ x, int64_t n) {
  T lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = kNegInf<T>;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] = x[j + k] > lane[k] ? x[j + k] : lane[k];
  for (; j < n; ++j) lane[0] = x[j] > lane[0] ? x[j] : lane[0];
  T max = lane[0];
  for (int k = 1; k < kLanes; ++k) max = lane[k] > max ? lane[k] : max;
  return max;
}

template <typename T>
PYVAE_INLINE T sum_of(const T* __restrict__ x, int64_t n) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] += x[j + k];
  for (; j < n; ++j) lane[0] += x[j];
  T sum = T(0);
  for (int k = 0; k < kLanes; ++k) sum += lane[k];
  return sum;
}

// shift + log2 sum exp2(x - shift): the base-2 logsumexp of n values, given a shift no smaller
// than their maximum (or safe_shift of it).
template <typename T>
PYVAE_INLINE T shifted_logsumexp2(const T* __restrict__ x, int64_t n, T shift) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] += exp2_acc(x[j + k] - shift);
  for (; j < n; ++j) lane[0] += exp2_acc(x[j] - shift);
  T sum = T(0);
  for (int k = 0; k < kLanes; ++k) sum += lane[k];
  return shift + std::log2(sum);
}

// Base-2 logsumexp of n values (two passes: maximum, then the shifted sum).
template <typename T>
PYVAE_INLINE T logsumexp2(const T* __restrict__ x, int64_t n) {
  return shifted_logsumexp2(x, n, safe_shift(max_of(x, n)));
}

// ---- the batch ---------------------------------------------------------------------------------

// The posteriors transposed to (D, B) in the compute type T (float32, or float64 for float64
// inputs), with the per-(d, j) constants of log2(e) ell precomputed once: inv_var = exp(-logvar),
// half_inv_var2 = 0.5 log2(e) inv_var, log_norm2 = -0.5 log2(e) (log 2 pi + logvar). z stays
// (B, D). The pair log-weights lw2_* are in base 2 too.
template <typename T>
struct Pairs {
  const T* z;              // (B, D)
  const T* mu;             // (D, B)
  const T* inv_var;        // (D, B)
  const T* half_inv_var2;  // (D, B)
  const T* log_norm2;      // (D, B)
  int64_t batch, dim;
  T lw2_self, lw2_next, lw2_other;

  int64_t next(int64_t i) const { return i + 1 == batch ? 0 : i + 1; }

  // log2(e) ell_ijd of one pair.
  PYVAE_INLINE T ell2(int64_t i, int64_t d, int64_t j) const {
    const T diff = z[i * dim + d] - mu[d * batch + j];
    return log_norm2[d * batch + j] - diff * diff * half_inv_var2[d * batch + j];
  }

};

// x[j] = base[j] + lw2_ij for every j: lw2_other, then the two special pairs (when they coincide,
// B == 1, the pair is "self"). Set, not corrected, since lw2_other may be -inf (the stratified
// estimator with dataset_size == batch_size).
template <typename T>
PYVAE_INLINE void set_log_weights(const Pairs<T>& in, int64_t i, const T* __restrict__ base,
                                  T* __restrict__ x) {
  const int64_t B = in.batch;
  for (int64_t j = 0; j < B; ++j) x[j] = base[j] + in.lw2_other;
  x[in.next(i)] = base[in.next(i)] + in.lw2_next;
  x[i] = base[i] + in.lw2_self;
}

// ---- forward: one sample i per call ------------------------------------------------------------

// The forward's outputs of one model (K = 1) or of all K models: rows (k, i) of log_qz,
// log_prod_qz, log_qz_x, log_pz (K·B) and of lse_marginal (K·B, D), in nats.
template <typename T>
struct Outputs {
  T* log_qz;
  T* log_prod_qz;
  T* log_qz_x;
  T* log_pz;
  T* lse_marginal;
};

// Row `row` of the outputs, sample i of `in`. Scratch: joint, x (B each). One fused loop over j
// per d (ell2, the joint's running sum, the log-weight), then the logsumexp's two passes; the
// per-row terms (the sample's own posterior, the prior, the sum of the marginals) come along.
template <typename T>
PYVAE_INLINE void forward_row(const Pairs<T>& in, int64_t i, T* __restrict__ joint,
                              T* __restrict__ x, const Outputs<T>& out, int64_t row) {
  const int64_t B = in.batch, D = in.dim, next = in.next(i);
  const T lw2_other = in.lw2_other;
  T* __restrict__ lse_row = out.lse_marginal + row * D;
  T own2 = T(0), sum_lse = T(0), sum_z2 = T(0);
  for (int64_t j = 0; j < B; ++j) joint[j] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T z_id = in.z[i * D + d];
    const T* __restrict__ mu_d = in.mu + d * B;
    const T* __restrict__ hv_d = in.half_inv_var2 + d * B;
    const T* __restrict__ ln_d = in.log_norm2 + d * B;
    // ell2, the joint's running sum and x = ell2 + lw2_other in one pass, which also keeps the
    // running maximum of x in kLanes independent lanes (vectorisable as is).
    T lane[kLanes];
    for (int k = 0; k < kLanes; ++k) lane[k] = kNegInf<T>;
    int64_t j = 0;
    for (; j + kLanes <= B; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const T diff = z_id - mu_d[j + k];
        const T ell2 = ln_d[j + k] - diff * diff * hv_d[j + k];
        joint[j + k] += ell2;
        const T value = ell2 + lw2_other;
        x[j + k] = value;
        lane[k] = value > lane[k] ? value : lane[k];
      }
    for (; j < B; ++j) {
      const T diff = z_id - mu_d[j];
      const T ell2 = ln_d[j] - diff * diff * hv_d[j];
      joint[j] += ell2;
      x[j] = ell2 + lw2_other;
      lane[0] = x[j] > lane[0] ? x[j] : lane[0];
    }
    // The two special pairs, set (not corrected: lw2_other may be -inf) from their ell2.
    const T own_ell2 = in.ell2(i, d, i);
    x[next] = in.ell2(i, d, next) + in.lw2_next;
    x[i] = own_ell2 + in.lw2_self;
    T max = x[next] > x[i] ? x[next] : x[i];
    for (int k = 0; k < kLanes; ++k) max = lane[k] > max ? lane[k] : max;
    lse_row[d] = T(kLn2) * shifted_logsumexp2(x, B, safe_shift(max));
    own2 += own_ell2;
    sum_lse += lse_row[d];
    sum_z2 += z_id * z_id;
  }
  set_log_weights(in, i, joint, x);
  out.log_qz[row] = T(kLn2) * logsumexp2(x, B);
  out.log_prod_qz[row] = sum_lse;
  out.log_qz_x[row] = T(kLn2) * own2;
  out.log_pz[row] = T(-0.5) * (T(kLog2Pi) * T(D) + sum_z2);
}

// ---- backward: one sample i per call -----------------------------------------------------------

// The backward's inputs: upstream gradients (nullptr: zero) and the forward's saved outputs.
template <typename T>
struct Upstream {
  const T* grad_log_qz;       // (B,)
  const T* grad_log_prod_qz;  // (B,)
  const T* grad_log_qz_x;     // (B,)
  const T* grad_log_pz;       // (B,)
  const T* log_qz;            // (B,)
  const T* lse_marginal;      // (B, D)

  // Model k's slices of every (K, B) and (K, B, D) tensor.
  Upstream model(int64_t k, int64_t batch, int64_t dim) const {
    const auto rows = [&](const T* p) { return p == nullptr ? nullptr : p + k * batch; };
    return {rows(grad_log_qz), rows(grad_log_prod_qz), rows(grad_log_qz_x), rows(grad_log_pz),
            rows(log_qz), lse_marginal + k * batch * dim};
  }
};

template <typename T>
PYVAE_INLINE T value_or_zero(const T* p, int64_t i) {
  return p == nullptr ? T(0) : p[i];
}

// Sample i's terms of every gradient (its pairs, its own posterior and the prior): grad_z[i, :]
// (complete), and its contributions to grad_mu and grad_logvar added into the (D, B) buffers
// acc_mu, acc_logvar.
// Scratch: p, x, ct (B each).
template <typename T>
PYVAE_INLINE void backward_row(const Pairs<T>& in, const Upstream<T>& up, int64_t i,
                               T* __restrict__ p, T* __restrict__ x,
                               T* __restrict__ ct, T* __restrict__ grad_z_i,
                               T* __restrict__ acc_mu, T* __restrict__ acc_logvar) {
  const int64_t B = in.batch, D = in.dim;
  // p[j] = grad_log_qz[i] p_ij, from the joint sum_d ell2_ijd.
  for (int64_t j = 0; j < B; ++j) p[j] = T(0);
  if (up.grad_log_qz != nullptr) {
    for (int64_t d = 0; d < D; ++d) {
      const T z_id = in.z[i * D + d];
      const T* __restrict__ mu_d = in.mu + d * B;
      const T* __restrict__ hv_d = in.half_inv_var2 + d * B;
      const T* __restrict__ ln_d = in.log_norm2 + d * B;
      for (int64_t j = 0; j < B; ++j) {
        const T diff = z_id - mu_d[j];
        p[j] += ln_d[j] - diff * diff * hv_d[j];
      }
    }
    set_log_weights(in, i, p, x);
    const T g = up.grad_log_qz[i], shift = T(kLog2E) * up.log_qz[i];
    for (int64_t j = 0; j < B; ++j) p[j] = g * exp2_acc(x[j] - shift);
  }
  // The marginals' coefficient (the same for every d), the own posterior's (the pair j == i) and
  // the prior's.
  const T g = value_or_zero(up.grad_log_prod_qz, i);
  const T g_own = value_or_zero(up.grad_log_qz_x, i);
  const T g_prior = value_or_zero(up.grad_log_pz, i);
  for (int64_t d = 0; d < D; ++d) {
    const T z_id = in.z[i * D + d];
    const T* __restrict__ mu_d = in.mu + d * B;
    const T* __restrict__ iv_d = in.inv_var + d * B;
    T* __restrict__ acc_mu_d = acc_mu + d * B;
    T* __restrict__ acc_lv_d = acc_logvar + d * B;
    if (g != T(0)) {
      // x[j] = c_ijd = p + g r_ijd, with r_ijd = exp2(lw2_ij + ell2_ijd - log2(e) lse_marginal[i, d]).
      const T* __restrict__ hv_d = in.half_inv_var2 + d * B;
      const T* __restrict__ ln_d = in.log_norm2 + d * B;
      const T shift = T(kLog2E) * up.lse_marginal[i * D + d];
      const T offset = in.lw2_other - shift;  // -inf - shift is -inf, as it should be
      for (int64_t j = 0; j < B; ++j) {
        const T diff = z_id - mu_d[j];
        const T ell2 = ln_d[j] - diff * diff * hv_d[j];
        x[j] = p[j] + g * exp2_acc(ell2 + offset);
      }
      const int64_t next = in.next(i);
      x[next] = p[next] + g * exp2_acc(in.ell2(i, d, next) + in.lw2_next - shift);
      x[i] = p[i] + g * exp2_acc(in.ell2(i, d, i) + in.lw2_self - shift);
    } else {
      for (int64_t j = 0; j < B; ++j) x[j] = p[j];
    }
    x[i] += g_own;  // log_qz_x[i] is the pair (i, i)'s sum_d ell_iid: c_iid gains its gradient
    for (int64_t j = 0; j < B; ++j) {
      const T diff = z_id - mu_d[j];
      const T t = diff * iv_d[j];
      const T c_t = x[j] * t;
      ct[j] = c_t;
      acc_mu_d[j] += c_t;
      acc_lv_d[j] += x[j] * (T(0.5) * diff * t - T(0.5));
    }
    grad_z_i[d] = -sum_of(ct, B) - g_prior * z_id;
  }
}

// float32 rows are compiled per instruction set (one indirect call per row); float64 rows use
// the templates.
PYVAE_VECTORIZE void forward_row_f32(const Pairs<float>& in, int64_t i, float* joint, float* x,
                                     const Outputs<float>& out, int64_t row) {
  forward_row(in, i, joint, x, out, row);
}
PYVAE_VECTORIZE void backward_row_f32(const Pairs<float>& in, const Upstream<float>& up,
                                      int64_t i, float* p, float* x, float* ct, float* grad_z_i,
                                      float* acc_mu, float* acc_logvar) {
  backward_row(in, up, i, p, x, ct, grad_z_i, acc_mu, acc_logvar);
}
PYVAE_VECTORIZE void add_rows_f32(float* __restrict__ into, const float* __restrict__ from,
                                  int64_t n) {
  for (int64_t k = 0; k < n; ++k) into[k] += from[k];
}

template <typename T>
void forward_one(const Pairs<T>& in, int64_t i, T* joint, T* x, const Outputs<T>& out,
                 int64_t row) {
  if constexpr (std::is_same_v<T, float>) forward_row_f32(in, i, joint, x, out, row);
  else forward_row(in, i, joint, x, out, row);
}
template <typename T>
void backward_one(const Pairs<T>& in, const Upstream<T>& up, int64_t i, T* p, T* x, T* ct,
                  T* grad_z_i, T* acc_mu, T* acc_logvar) {
  if constexpr (std::is_same_v<T, float>)
    backward_row_f32(in, up, i, p, x, ct, grad_z_i, acc_mu, acc_logvar);
  else
    backward_row(in, up, i, p, x, ct, grad_z_i, acc_mu, acc_logvar);
}
template <typename T>
void add_rows(T* into, const T* from, int64_t n) {
  if constexpr (std::is_same_v<T, float>) add_rows_f32(into, from, n);
  else for (int64_t k = 0; k < n; ++k) into[k] += from[k];
}

// ---- tensors and threads -----------------------------------------------------------------------

// Owns the compute-type copies behind the Pairs views of the K models (K = 1 for a 2-D input):
// z (K, B, D), and the posteriors' four (K, D, B) arrays mu, inv_var, half_inv_var2, log_norm2
// in one (4, K, D, B) tensor, filled by one loop (not eight small ATen ops: at B = 256 those cost
// as much as a tenth of the kernel).
template <typename T>
struct Batch {
  at::Tensor z, posteriors;
  int64_t models, batch, dim;
  T lw2_self, lw2_next, lw2_other;

  Batch(const at::Tensor& z_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
        double self, double next, double other)
      : models(kl_decomposition_models(z_in)), batch(z_in.size(-2)), dim(z_in.size(-1)),
        lw2_self(T(kLog2E * self)), lw2_next(T(kLog2E * next)), lw2_other(T(kLog2E * other)) {
    const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
    z = z_in.to(acc).contiguous();
    const at::Tensor mu = mu_in.to(acc).contiguous(), logvar = logvar_in.to(acc).contiguous();
    posteriors = at::empty({4, models, dim, batch}, z.options());
    const T* mu_in_data = mu.data_ptr<T>();
    const T* logvar_in_data = logvar.data_ptr<T>();
    T* out = posteriors.data_ptr<T>();
    const int64_t B = batch, D = dim, plane = models * D * B;
    // Parallel over the K·B posteriors (k, j); each reads its D values and writes column j of
    // model k's four (D, B) arrays.
    const int64_t rows_per_task =
        std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(D, 1));
    at::parallel_for(0, models * B, rows_per_task, [&](int64_t begin, int64_t end) {
      for (int64_t kj = begin; kj < end; ++kj) {
        const int64_t k = kj / B, j = kj % B;
        for (int64_t d = 0; d < D; ++d) {
          const T lv = logvar_in_data[kj * D + d];
          const T inv_var = std::exp(-lv);
          const int64_t at = (k * D + d) * B + j;
          out[at] = mu_in_data[kj * D + d];
          out[plane + at] = inv_var;
          out[2 * plane + at] = inv_var * T(0.5 * kLog2E);
          out[3 * plane + at] = (lv + T(kLog2Pi)) * T(-0.5 * kLog2E);
        }
      }
    });
  }

  // Model k's batch.
  Pairs<T> pairs(int64_t k) const {
    const int64_t offset = k * batch * dim, plane = models * batch * dim;
    const T* post = posteriors.data_ptr<T>() + offset;
    return Pairs<T>{z.data_ptr<T>() + offset, post, post + plane, post + 2 * plane,
                    post + 3 * plane, batch, dim, lw2_self, lw2_next, lw2_other};
  }
};

// Tasks of at least ~64k pair-dimension terms, at least one row each.
int64_t grain(int64_t batch, int64_t dim) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(batch * dim, 1));
}

// Parallel over the K·B rows (k, i) of every model.
template <typename T>
void forward_impl(const Batch<T>& in, const Outputs<T>& out) {
  const int64_t B = in.batch, D = in.dim;
  at::parallel_for(0, in.models * B, grain(B, D), [&](int64_t begin, int64_t end) {
    std::vector<T> joint(B), x(B);
    for (int64_t row = begin; row < end; ++row) {
      forward_one(in.pairs(row / B), row % B, joint.data(), x.data(), out, row);
    }
  });
}

KLDecompositionOutputs kl_decomposition_forward_cpu(const at::Tensor& z, const at::Tensor& mu,
                                                    const at::Tensor& logvar,
                                                    double log_weight_self, double log_weight_next,
                                                    double log_weight_other) {
  check_kl_decomposition_args(z, mu, logvar);
  KLDecompositionOutputs outputs = empty_kl_decomposition_outputs(z);
  auto& [log_qz, log_prod_qz, log_qz_x, log_pz, lse_marginal] = outputs;
  if (z.numel() > 0) {
    const auto run = [&](auto zero) {
      using T = decltype(zero);
      const Batch<T> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
      forward_impl(in, Outputs<T>{log_qz.data_ptr<T>(), log_prod_qz.data_ptr<T>(),
                                  log_qz_x.data_ptr<T>(), log_pz.data_ptr<T>(),
                                  lse_marginal.data_ptr<T>()});
    };
    if (log_qz.scalar_type() == at::kDouble) run(double(0));
    else run(float(0));
  }
  return outputs;
}

// The blocks of samples of the backward: a function of (B, D) only, never of the thread count,
// so that the fixed-order sum of their buffers gives the same bits on every machine. At most
// 16 blocks and 256 MB of buffers per model; at least ~64k pair-dimension terms per block (so that small
// batches still use more than one thread).
int64_t backward_blocks(int64_t batch, int64_t dim, int64_t elem_bytes) {
  const int64_t work = batch * batch * dim;
  const int64_t by_work = std::max<int64_t>(1, work >> 16);
  const int64_t by_memory =
      std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(2 * dim * batch * elem_bytes, 1));
  return std::min({by_work, by_memory, int64_t(16), batch});
}

// Parallel over the K·blocks blocks (k, b); grad_z, grad_mu, grad_logvar are (K, B, D) in T.
template <typename T>
void backward_impl(const Batch<T>& in, const Upstream<T>& upstream, at::Tensor& grad_z,
                   at::Tensor& grad_mu, at::Tensor& grad_logvar) {
  const int64_t K = in.models, B = in.batch, D = in.dim;
  const int64_t blocks = backward_blocks(B, D, sizeof(T));
  const int64_t block_size = 2 * D * B;
  // acc[k, b] = (grad_mu^T, grad_logvar^T) of model k's block b of samples, each (D, B).
  at::Tensor acc = at::zeros({K, blocks, 2, D, B}, grad_z.options());
  T* g_z = grad_z.data_ptr<T>();
  T* acc_data = acc.data_ptr<T>();
  at::parallel_for(0, K * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<T> p(B), x(B), ct(B);
    for (int64_t kb = first; kb < last; ++kb) {
      const int64_t k = kb / blocks, b = kb % blocks;
      const Pairs<T> pairs = in.pairs(k);
      const Upstream<T> up = upstream.model(k, B, D);
      T* acc_mu = acc_data + kb * block_size;
      for (int64_t i = b * B / blocks; i < (b + 1) * B / blocks; ++i)
        backward_one(pairs, up, i, p.data(), x.data(), ct.data(), g_z + (k * B + i) * D, acc_mu,
                     acc_mu + D * B);
    }
  });
  // Each model's block 0 += its blocks 1, 2, ... in order, parallel over the K·(2, D, B) entries.
  at::parallel_for(0, K * block_size, int64_t(1) << 14, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t k = begin / block_size, e = begin % block_size;
      const int64_t n = std::min(end - begin, block_size - e);
      T* model = acc_data + k * blocks * block_size;
      for (int64_t b = 1; b < blocks; ++b) add_rows(model + e, model + b * block_size + e, n);
      begin += n;
    }
  });
  const at::Tensor first = acc.select(1, 0);  // (K, 2, D, B)
  grad_mu.view({K, B, D}).copy_(first.select(1, 0).transpose(-1, -2));
  grad_logvar.view({K, B, D}).copy_(first.select(1, 1).transpose(-1, -2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_decomposition_backward_cpu(
    const std::optional<at::Tensor>& grad_log_qz,
    const std::optional<at::Tensor>& grad_log_prod_qz,
    const std::optional<at::Tensor>& grad_log_qz_x, const std::optional<at::Tensor>& grad_log_pz,
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& log_qz,
    const at::Tensor& lse_marginal, double log_weight_self, double log_weight_next,
    double log_weight_other) {
  check_kl_decomposition_backward_args(grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz,
                                       z, mu, logvar, log_qz, lse_marginal);
  const at::ScalarType acc = accumulation_dtype(z.scalar_type());
  const bool any_grad = grad_log_qz.has_value() || grad_log_prod_qz.has_value() ||
                        grad_log_qz_x.has_value() || grad_log_pz.has_value();
  if (!any_grad || z.numel() == 0) {
    return {at::zeros_like(z), at::zeros_like(z), at::zeros_like(z)};
  }
  // Accumulated in the compute type, then rounded once to the input dtype.
  at::Tensor grad_z = at::empty(z.sizes(), z.options().dtype(acc));
  at::Tensor grad_mu = at::empty_like(grad_z);
  at::Tensor grad_logvar = at::empty_like(grad_z);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto data = [](const std::optional<at::Tensor>& t) -> const T* {
      return t.has_value() ? t->data_ptr<T>() : nullptr;
    };
    const Batch<T> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
    const Upstream<T> upstream{data(grad_log_qz),   data(grad_log_prod_qz),
                               data(grad_log_qz_x), data(grad_log_pz),
                               log_qz.data_ptr<T>(), lse_marginal.data_ptr<T>()};
    backward_impl(in, upstream, grad_z, grad_mu, grad_logvar);
  };
  if (acc == at::kDouble) run(double(0));
  else run(float(0));
  const at::ScalarType out = z.scalar_type();
  return {grad_z.to(out), grad_mu.to(out), grad_logvar.to(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("kl_decomposition_forward", &kl_decomposition_forward_cpu);
  m.impl("kl_decomposition_backward", &kl_decomposition_backward_cpu);
}

}  // namespace cpu
}  // namespace pyvae
