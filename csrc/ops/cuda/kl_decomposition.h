// Launchers of the streaming minibatch total-correlation kernels. Plain CUDA, no torch headers.
//
// For a batch of B samples with posteriors N(mu_j, exp(logvar_j)) (j < B, D dimensions) and
// samples z_i, with ell_ijd = -0.5 * (log(2 pi) + logvar_jd + (z_id - mu_jd)^2 * exp(-logvar_jd))
// and the pair log-weight lw_ij = log_weight_self (j == i), log_weight_next (j == (i+1) mod B)
// or log_weight_other (otherwise), the forward computes without ever storing a B x B x D tensor:
//   log_qz[i]          = logsumexp_j (lw_ij + sum_d ell_ijd)               (B,)
//   lse_marginal[i, d] = logsumexp_j (lw_ij + ell_ijd)                     (B, D)
// The backward, given grad_log_qz (B,) and grad_lse_marginal (B, D), recomputes the pair terms
// from the saved logsumexps, with p_ij = exp(lw_ij + sum_d ell_ijd - log_qz[i]),
// r_ijd = exp(lw_ij + ell_ijd - lse_marginal[i, d]), c_ijd = grad_log_qz[i] p_ij +
// grad_lse_marginal[i, d] r_ijd, t = (z_id - mu_jd) * exp(-logvar_jd):
//   grad_z[i, d]      = -sum_j c_ijd t
//   grad_mu[j, d]     =  sum_i c_ijd t
//   grad_logvar[j, d] =  sum_i c_ijd (0.5 (z_id - mu_jd) t - 0.5)
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

// z, mu, logvar: contiguous (B, D) in the input dtype. log_qz, lse_marginal and the incoming
// gradients are float32 (float64 for float64 inputs); grad_z/mu/logvar are in the input dtype.
struct KLDecompositionForward {
  const void* z;
  const void* mu;
  const void* logvar;
  double log_weight_self;
  double log_weight_next;
  double log_weight_other;
  void* log_qz;        // (B,)
  void* lse_marginal;  // (B, D)
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

struct KLDecompositionBackward {
  const void* grad_log_qz;        // (B,), nullptr: zero
  const void* grad_lse_marginal;  // (B, D), nullptr: zero
  const void* z;
  const void* mu;
  const void* logvar;
  const void* log_qz;             // saved forward outputs
  const void* lse_marginal;
  double log_weight_self;
  double log_weight_next;
  double log_weight_other;
  void* grad_z;
  void* grad_mu;
  void* grad_logvar;
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

cudaError_t kl_decomposition_forward(const KLDecompositionForward& args, cudaStream_t stream);
cudaError_t kl_decomposition_backward(const KLDecompositionBackward& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvae
