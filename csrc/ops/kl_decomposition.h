// Shared by the CPU and CUDA implementations of pyvae::kl_decomposition_{forward,backward}: the
// maths and notation every backend uses, and the argument checks.
//
// For a batch of B samples with posteriors N(mu_j, exp(logvar_j)) (j < B, D dimensions) and
// samples z_i, with ell_ijd = -0.5 * (log(2 pi) + logvar_jd + (z_id - mu_jd)^2 * exp(-logvar_jd))
// and the pair log-weight lw_ij = log_weight_self (j == i), log_weight_next (j == (i+1) mod B)
// or log_weight_other (otherwise), the forward computes without ever storing a B x B x D tensor:
//   log_qz[i]          = logsumexp_j (lw_ij + sum_d ell_ijd)               (B,)
//   lse_marginal[i, d] = logsumexp_j (lw_ij + ell_ijd)                     (B, D)
//   log_prod_qz[i]     = sum_d lse_marginal[i, d]                          (B,)
//   log_qz_x[i]        = sum_d ell_iid          (the sample's own posterior) (B,)
//   log_pz[i]          = -0.5 sum_d (log(2 pi) + z_id^2)  (standard normal) (B,)
// so that every term of the decomposition is a difference of two outputs. lse_marginal is kept
// for the backward only. The backward, given the ([K,] B) gradients of the four others (each
// optional), recomputes the pair terms from the saved logsumexps, with
// p_ij = exp(lw_ij + sum_d ell_ijd - log_qz[i]), r_ijd = exp(lw_ij + ell_ijd - lse_marginal[i, d]),
// c_ijd = grad_log_qz[i] p_ij + grad_log_prod_qz[i] r_ijd + [j == i] grad_log_qz_x[i],
// t = (z_id - mu_jd) * exp(-logvar_jd):
//   grad_z[i, d]      = -sum_j c_ijd t - grad_log_pz[i] z_id
//   grad_mu[j, d]     =  sum_i c_ijd t
//   grad_logvar[j, d] =  sum_i c_ijd (0.5 (z_id - mu_jd) t - 0.5)
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "ops/common.h"

namespace pyvae {

// z, mu, logvar: (B, D), or (K, B, D) for K models' batches (each computed on its own), contiguous
// tensors of one kernel dtype and device, B >= 2, D >= 1.
void check_kl_decomposition_args(const at::Tensor& z, const at::Tensor& mu,
                                 const at::Tensor& logvar);

// The forward's checks plus those of the saved outputs (log_qz ([K,] B), lse_marginal ([K,] B, D)) and
// the optional incoming gradients (([K,] B) each), all contiguous in accumulation_dtype of z.
void check_kl_decomposition_backward_args(const std::optional<at::Tensor>& grad_log_qz,
                                          const std::optional<at::Tensor>& grad_log_prod_qz,
                                          const std::optional<at::Tensor>& grad_log_qz_x,
                                          const std::optional<at::Tensor>& grad_log_pz,
                                          const at::Tensor& z, const at::Tensor& mu,
                                          const at::Tensor& logvar, const at::Tensor& log_qz,
                                          const at::Tensor& lse_marginal);

// The forward's outputs (log_qz, log_prod_qz, log_qz_x, log_pz, lse_marginal) for a checked z,
// uninitialised: four ([K,] B) and one ([K,] B, D), in accumulation_dtype of z.
using KLDecompositionOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline KLDecompositionOutputs empty_kl_decomposition_outputs(const at::Tensor& z) {
  const at::TensorOptions acc = z.options().dtype(accumulation_dtype(z.scalar_type()));
  const at::IntArrayRef rows = z.sizes().slice(0, z.dim() - 1);
  return {at::empty(rows, acc), at::empty(rows, acc), at::empty(rows, acc), at::empty(rows, acc),
          at::empty(z.sizes(), acc)};
}

// K, the number of models of a checked z: 1 for a 2-D z.
inline int64_t kl_decomposition_models(const at::Tensor& z) {
  return z.dim() == 3 ? z.size(0) : 1;
}

}  // namespace pyvae
