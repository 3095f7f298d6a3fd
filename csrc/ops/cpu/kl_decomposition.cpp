// CPU kernels of the streaming minibatch KL decomposition (β-TCVAE); the maths and notation
// (ell_ijd, lw_ij, p_ij, r_ijd) are those of ops/cuda/kl_decomposition.h.
//
// Nothing of size B x B (let alone B x B x D) is ever stored: the forward is parallel over the
// samples i and streams the posteriors j in tiles of kTile with an online logsumexp per (i, d);
// the backward recomputes the pair terms from the saved logsumexps in two passes, one parallel
// over i (grad_z, a reduction over j) and one parallel over j (grad_mu and grad_logvar, a
// reduction over i), so that every output element has a single writer and no atomics are needed.
// Half-precision inputs are widened to float32 once (O(B·D)); float32 work runs in branch-free
// loops over d that GCC vectorises (vec_math.h); float64 uses libm (the gradcheck path).
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
#include "ops/reparameterize_kl.h"  // kl_dtype

namespace pyvae {
namespace cpu {
namespace {

constexpr int64_t kTile = 16;  // posteriors j per step of the marginals' online logsumexp
constexpr double kLog2Pi = 1.8378770664093454835606594728112;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

PYVAE_INLINE float exp_acc(float x) { return exp_f32(x); }
PYVAE_INLINE double exp_acc(double x) { return std::exp(x); }

// The logsumexp shift: the running maximum, or 0 while every term so far is -inf (so that
// exp(-inf - shift) is 0 rather than NaN).
template <typename T>
PYVAE_INLINE T safe_shift(T max) {
  return max == kNegInf<T> ? T(0) : max;
}

// ---- loops over d (vectorised for float32) -----------------------------------------------------
// Pointer arguments never alias: __restrict__ spares GCC the runtime overlap checks it otherwise
// gives up on for loops with this many streams.

// ell[d] = log_norm_j[d] - 0.5 (z_i[d] - mu_j[d])^2 inv_var_j[d]; returns sum_d ell[d] with 8
// independent partial sums (vectorisable without reassociation flags).
template <typename T>
PYVAE_INLINE T pair_log_density(const T* __restrict__ z_i, const T* __restrict__ mu_j,
                                const T* __restrict__ inv_var_j, const T* __restrict__ log_norm_j,
                                int64_t n, T* __restrict__ ell) {
  for (int64_t d = 0; d < n; ++d) {
    const T diff = z_i[d] - mu_j[d];
    ell[d] = log_norm_j[d] - T(0.5) * diff * diff * inv_var_j[d];
  }
  T partial[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int k = 0; k < 8; ++k) partial[k] += ell[d + k];
  for (; d < n; ++d) partial[d & 7] += ell[d];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// One online-logsumexp step of the marginals: folds lw[t] + ell[t * n + d] for t < tile into the
// running maximum max[d] and the running sum sum[d] = sum exp(x - safe_shift(max[d])).
template <typename T>
PYVAE_INLINE void marginal_tile(const T* __restrict__ ell, const T* __restrict__ lw, int64_t tile,
                                int64_t n, T* __restrict__ max, T* __restrict__ sum,
                                T* __restrict__ tile_max) {
  for (int64_t d = 0; d < n; ++d) tile_max[d] = max[d];
  for (int64_t t = 0; t < tile; ++t)
    for (int64_t d = 0; d < n; ++d) {
      const T x = ell[t * n + d] + lw[t];
      tile_max[d] = x > tile_max[d] ? x : tile_max[d];
    }
  for (int64_t d = 0; d < n; ++d) {
    sum[d] *= exp_acc(max[d] - safe_shift(tile_max[d]));
    max[d] = tile_max[d];
    tile_max[d] = safe_shift(tile_max[d]);  // from here on: the shift
  }
  for (int64_t t = 0; t < tile; ++t)
    for (int64_t d = 0; d < n; ++d) sum[d] += exp_acc(ell[t * n + d] + lw[t] - tile_max[d]);
}

// logsumexp of n values (two passes: maximum, then the shifted sum).
template <typename T>
PYVAE_INLINE T logsumexp(const T* __restrict__ x, int64_t n) {
  T max = kNegInf<T>;
  for (int64_t k = 0; k < n; ++k) max = x[k] > max ? x[k] : max;
  const T shift = safe_shift(max);
  T partial[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) partial[l] += exp_acc(x[k + l] - shift);
  for (; k < n; ++k) partial[k & 7] += exp_acc(x[k] - shift);
  const T sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  return shift + std::log(sum);
}

// The coefficient of one pair (i, j) in every gradient: c[d] = p + g_lse[d] r_d with
// r_d = exp(lw + ell[d] - lse[d]), and t[d] = (z_i[d] - mu_j[d]) inv_var_j[d]. grad_z[d] -= c t.
template <typename T>
PYVAE_INLINE void grad_z_pair(const T* __restrict__ z_i, const T* __restrict__ mu_j,
                              const T* __restrict__ inv_var_j, const T* __restrict__ ell,
                              const T* __restrict__ lse_i, const T* __restrict__ g_lse_i, T lw,
                              T p, int64_t n, T* __restrict__ grad_z) {
  if (g_lse_i == nullptr) {
    for (int64_t d = 0; d < n; ++d) grad_z[d] -= p * (z_i[d] - mu_j[d]) * inv_var_j[d];
    return;
  }
  for (int64_t d = 0; d < n; ++d) {
    const T c = p + g_lse_i[d] * exp_acc(lw + ell[d] - lse_i[d]);
    grad_z[d] -= c * (z_i[d] - mu_j[d]) * inv_var_j[d];
  }
}

// The same coefficient for the posterior's gradients: grad_mu[d] += c t and
// grad_logvar[d] += c (0.5 (z_i[d] - mu_j[d]) t - 0.5).
template <typename T>
PYVAE_INLINE void grad_posterior_pair(const T* __restrict__ z_i, const T* __restrict__ mu_j,
                                      const T* __restrict__ inv_var_j, const T* __restrict__ ell,
                                      const T* __restrict__ lse_i,
                                      const T* __restrict__ g_lse_i, T lw, T p, int64_t n,
                                      T* __restrict__ grad_mu, T* __restrict__ grad_logvar) {
  if (g_lse_i == nullptr) {
    for (int64_t d = 0; d < n; ++d) {
      const T diff = z_i[d] - mu_j[d];
      const T t = diff * inv_var_j[d];
      grad_mu[d] += p * t;
      grad_logvar[d] += p * (T(0.5) * diff * t - T(0.5));
    }
    return;
  }
  for (int64_t d = 0; d < n; ++d) {
    const T c = p + g_lse_i[d] * exp_acc(lw + ell[d] - lse_i[d]);
    const T diff = z_i[d] - mu_j[d];
    const T t = diff * inv_var_j[d];
    grad_mu[d] += c * t;
    grad_logvar[d] += c * (T(0.5) * diff * t - T(0.5));
  }
}

// ---- one row of pairs per call -----------------------------------------------------------------

// The batch in the compute type T (float32, or float64 for float64 inputs), with the per-(j, d)
// constants of ell precomputed once: inv_var = exp(-logvar), log_norm = -0.5 (log 2 pi + logvar).
template <typename T>
struct Pairs {
  const T* z;
  const T* mu;
  const T* inv_var;
  const T* log_norm;
  int64_t batch, dim;
  T lw_self, lw_next, lw_other;

  PYVAE_INLINE T log_weight(int64_t i, int64_t j) const {
    if (j == i) return lw_self;
    return j == (i + 1 == batch ? 0 : i + 1) ? lw_next : lw_other;
  }

  // lw_ij + sum_d ell_ijd of one pair; ell_ijd is left in ell[0, dim).
  PYVAE_INLINE T log_joint(int64_t i, int64_t j, T* ell) const {
    return log_weight(i, j) + pair_log_density(z + i * dim, mu + j * dim, inv_var + j * dim,
                                               log_norm + j * dim, dim, ell);
  }
};

// The backward's inputs: upstream gradients (nullptr: zero) and the forward's saved outputs.
template <typename T>
struct Upstream {
  const T* grad_log_qz;        // (B,)
  const T* grad_lse_marginal;  // (B, D)
  const T* log_qz;             // (B,)
  const T* lse_marginal;       // (B, D)

  // p_ij times the upstream gradient of log_qz[i], from the pair's lw_ij + sum_d ell_ijd.
  PYVAE_INLINE T joint_coefficient(int64_t i, T log_joint) const {
    return grad_log_qz == nullptr ? T(0) : grad_log_qz[i] * exp_acc(log_joint - log_qz[i]);
  }
};

// log_qz[i] and lse_marginal[i, :] of one sample i. Scratch: joint (B), ell (kTile * D),
// max, sum, tile_max (D).
template <typename T>
PYVAE_INLINE void forward_row(const Pairs<T>& in, int64_t i, T* __restrict__ joint,
                              T* __restrict__ ell, T* __restrict__ max, T* __restrict__ sum,
                              T* __restrict__ tile_max, T* __restrict__ log_qz_i,
                              T* __restrict__ lse_row) {
  const int64_t B = in.batch, D = in.dim;
  for (int64_t d = 0; d < D; ++d) {
    max[d] = kNegInf<T>;
    sum[d] = T(0);
  }
  T lw[kTile];
  for (int64_t j0 = 0; j0 < B; j0 += kTile) {
    const int64_t tile = std::min(kTile, B - j0);
    for (int64_t t = 0; t < tile; ++t) {
      lw[t] = in.log_weight(i, j0 + t);
      joint[j0 + t] = in.log_joint(i, j0 + t, ell + t * D);
    }
    marginal_tile(ell, lw, tile, D, max, sum, tile_max);
  }
  *log_qz_i = logsumexp(joint, B);
  for (int64_t d = 0; d < D; ++d) lse_row[d] = max[d] + std::log(sum[d]);
}

// grad_z[i, :] = -sum_j c_ij t_ij of one sample i. Scratch: ell (D).
template <typename T>
PYVAE_INLINE void grad_z_row(const Pairs<T>& in, const Upstream<T>& up, int64_t i,
                             T* __restrict__ ell, T* __restrict__ grad_z_i) {
  const int64_t B = in.batch, D = in.dim;
  const T* g_lse_i = up.grad_lse_marginal == nullptr ? nullptr : up.grad_lse_marginal + i * D;
  for (int64_t d = 0; d < D; ++d) grad_z_i[d] = T(0);
  for (int64_t j = 0; j < B; ++j) {
    const T p = up.joint_coefficient(i, in.log_joint(i, j, ell));
    grad_z_pair(in.z + i * D, in.mu + j * D, in.inv_var + j * D, ell, up.lse_marginal + i * D,
                g_lse_i, in.log_weight(i, j), p, D, grad_z_i);
  }
}

// grad_mu[j, :] and grad_logvar[j, :] = sums over i of one posterior j. Scratch: ell (D).
template <typename T>
PYVAE_INLINE void grad_posterior_row(const Pairs<T>& in, const Upstream<T>& up, int64_t j,
                                     T* __restrict__ ell, T* __restrict__ grad_mu_j,
                                     T* __restrict__ grad_logvar_j) {
  const int64_t B = in.batch, D = in.dim;
  for (int64_t d = 0; d < D; ++d) {
    grad_mu_j[d] = T(0);
    grad_logvar_j[d] = T(0);
  }
  for (int64_t i = 0; i < B; ++i) {
    const T p = up.joint_coefficient(i, in.log_joint(i, j, ell));
    const T* g_lse_i = up.grad_lse_marginal == nullptr ? nullptr : up.grad_lse_marginal + i * D;
    grad_posterior_pair(in.z + i * D, in.mu + j * D, in.inv_var + j * D, ell,
                        up.lse_marginal + i * D, g_lse_i, in.log_weight(i, j), p, D, grad_mu_j,
                        grad_logvar_j);
  }
}

// float32 rows are compiled per instruction set (one indirect call per row, not per pair); the
// float64 ones use the templates.
PYVAE_VECTORIZE void forward_row_f32(const Pairs<float>& in, int64_t i, float* joint, float* ell,
                                     float* max, float* sum, float* tile_max, float* log_qz_i,
                                     float* lse_row) {
  forward_row(in, i, joint, ell, max, sum, tile_max, log_qz_i, lse_row);
}
PYVAE_VECTORIZE void grad_z_row_f32(const Pairs<float>& in, const Upstream<float>& up, int64_t i,
                                    float* ell, float* grad_z_i) {
  grad_z_row(in, up, i, ell, grad_z_i);
}
PYVAE_VECTORIZE void grad_posterior_row_f32(const Pairs<float>& in, const Upstream<float>& up,
                                            int64_t j, float* ell, float* grad_mu_j,
                                            float* grad_logvar_j) {
  grad_posterior_row(in, up, j, ell, grad_mu_j, grad_logvar_j);
}

struct Rows {
  template <typename T>
  static void forward(const Pairs<T>& in, int64_t i, T* joint, T* ell, T* max, T* sum,
                      T* tile_max, T* log_qz_i, T* lse_row) {
    if constexpr (std::is_same_v<T, float>)
      forward_row_f32(in, i, joint, ell, max, sum, tile_max, log_qz_i, lse_row);
    else
      forward_row(in, i, joint, ell, max, sum, tile_max, log_qz_i, lse_row);
  }
  template <typename T>
  static void grad_z(const Pairs<T>& in, const Upstream<T>& up, int64_t i, T* ell, T* grad_z_i) {
    if constexpr (std::is_same_v<T, float>) grad_z_row_f32(in, up, i, ell, grad_z_i);
    else grad_z_row(in, up, i, ell, grad_z_i);
  }
  template <typename T>
  static void grad_posterior(const Pairs<T>& in, const Upstream<T>& up, int64_t j, T* ell,
                             T* grad_mu_j, T* grad_logvar_j) {
    if constexpr (std::is_same_v<T, float>)
      grad_posterior_row_f32(in, up, j, ell, grad_mu_j, grad_logvar_j);
    else
      grad_posterior_row(in, up, j, ell, grad_mu_j, grad_logvar_j);
  }
};

// ---- tensors and threads -----------------------------------------------------------------------

// Owns the compute-type copies behind a Pairs view (no copy of z and mu when already in T).
template <typename T>
struct Batch {
  at::Tensor z, mu, inv_var, log_norm;
  Pairs<T> pairs;

  Batch(const at::Tensor& z_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
        double self, double next, double other) {
    const at::ScalarType acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
    z = z_in.to(acc);
    mu = mu_in.to(acc);
    const at::Tensor logvar = logvar_in.to(acc);
    inv_var = at::exp(-logvar);
    log_norm = (logvar + kLog2Pi) * -0.5;
    pairs = Pairs<T>{z.data_ptr<T>(), mu.data_ptr<T>(), inv_var.data_ptr<T>(),
                     log_norm.data_ptr<T>(), z.size(0), z.size(1), T(self), T(next), T(other)};
  }
};

// Tasks of at least ~64k pair-dimension terms, at least one row each.
int64_t grain(int64_t batch, int64_t dim) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(batch * dim, 1));
}

template <typename T>
void forward_impl(const Pairs<T>& in, T* log_qz, T* lse_marginal) {
  const int64_t B = in.batch, D = in.dim;
  at::parallel_for(0, B, grain(B, D), [&](int64_t begin, int64_t end) {
    std::vector<T> joint(B), ell(kTile * D), max(D), sum(D), tile_max(D);
    for (int64_t i = begin; i < end; ++i)
      Rows::forward(in, i, joint.data(), ell.data(), max.data(), sum.data(), tile_max.data(),
                    log_qz + i, lse_marginal + i * D);
  });
}

std::tuple<at::Tensor, at::Tensor> kl_decomposition_forward_cpu(
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, double log_weight_self,
    double log_weight_next, double log_weight_other) {
  check_kl_decomposition_args(z, mu, logvar);
  const at::TensorOptions acc = z.options().dtype(kl_dtype(z.scalar_type()));
  at::Tensor log_qz = at::empty({z.size(0)}, acc);
  at::Tensor lse_marginal = at::empty(z.sizes(), acc);
  if (acc.dtype() == at::kDouble) {
    const Batch<double> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
    forward_impl(in.pairs, log_qz.data_ptr<double>(), lse_marginal.data_ptr<double>());
  } else {
    const Batch<float> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
    forward_impl(in.pairs, log_qz.data_ptr<float>(), lse_marginal.data_ptr<float>());
  }
  return {log_qz, lse_marginal};
}

// ---- backward ----------------------------------------------------------------------------------

// Two passes, each row of each output with a single writer: grad_z parallel over i (reducing
// over j), then grad_mu and grad_logvar parallel over j (reducing over i).
template <typename T>
void backward_impl(const Pairs<T>& in, const std::optional<at::Tensor>& grad_log_qz,
                   const std::optional<at::Tensor>& grad_lse_marginal, const at::Tensor& log_qz,
                   const at::Tensor& lse_marginal, at::Tensor& grad_z, at::Tensor& grad_mu,
                   at::Tensor& grad_logvar) {
  const int64_t B = in.batch, D = in.dim;
  const Upstream<T> up{grad_log_qz.has_value() ? grad_log_qz->data_ptr<T>() : nullptr,
                       grad_lse_marginal.has_value() ? grad_lse_marginal->data_ptr<T>() : nullptr,
                       log_qz.data_ptr<T>(), lse_marginal.data_ptr<T>()};
  T* g_z = grad_z.data_ptr<T>();
  T* g_mu = grad_mu.data_ptr<T>();
  T* g_lv = grad_logvar.data_ptr<T>();
  at::parallel_for(0, B, grain(B, D), [&](int64_t begin, int64_t end) {
    std::vector<T> ell(D);
    for (int64_t i = begin; i < end; ++i) Rows::grad_z(in, up, i, ell.data(), g_z + i * D);
  });
  at::parallel_for(0, B, grain(B, D), [&](int64_t begin, int64_t end) {
    std::vector<T> ell(D);
    for (int64_t j = begin; j < end; ++j)
      Rows::grad_posterior(in, up, j, ell.data(), g_mu + j * D, g_lv + j * D);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_decomposition_backward_cpu(
    const std::optional<at::Tensor>& grad_log_qz,
    const std::optional<at::Tensor>& grad_lse_marginal, const at::Tensor& z,
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& log_qz,
    const at::Tensor& lse_marginal, double log_weight_self, double log_weight_next,
    double log_weight_other) {
  check_kl_decomposition_backward_args(grad_log_qz, grad_lse_marginal, z, mu, logvar, log_qz,
                                       lse_marginal);
  const at::ScalarType acc = kl_dtype(z.scalar_type());
  if (!grad_log_qz.has_value() && !grad_lse_marginal.has_value()) {
    return {at::zeros_like(z), at::zeros_like(z), at::zeros_like(z)};
  }
  // Accumulated in the compute type, then rounded once to the input dtype.
  at::Tensor grad_z = at::empty(z.sizes(), z.options().dtype(acc));
  at::Tensor grad_mu = at::empty_like(grad_z);
  at::Tensor grad_logvar = at::empty_like(grad_z);
  if (acc == at::kDouble) {
    const Batch<double> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
    backward_impl(in.pairs, grad_log_qz, grad_lse_marginal, log_qz, lse_marginal, grad_z, grad_mu,
                  grad_logvar);
  } else {
    const Batch<float> in(z, mu, logvar, log_weight_self, log_weight_next, log_weight_other);
    backward_impl(in.pairs, grad_log_qz, grad_lse_marginal, log_qz, lse_marginal, grad_z, grad_mu,
                  grad_logvar);
  }
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
