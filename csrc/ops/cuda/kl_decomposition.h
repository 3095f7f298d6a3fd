// Launchers of the streaming minibatch total-correlation kernels; the maths and notation are in
// ops/kl_decomposition.h. Plain CUDA, no torch headers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

// z, mu, logvar: contiguous (K, B, D) in the input dtype: K models' batches (K = 1 for a (B, D)
// input), each computed on its own. The forward outputs, the saved log_qz / lse_marginal and the
// incoming gradients are float32 (float64 for float64 inputs), in nats; grad_z/mu/logvar are in
// the input dtype.
struct KLDecompositionForward {
  const void* z;
  const void* mu;
  const void* logvar;
  double log_weight_self;
  double log_weight_next;
  double log_weight_other;
  void* log_qz;        // (K, B): logsumexp_j (lw_ij + sum_d ell_ijd)
  void* log_prod_qz;   // (K, B): sum_d lse_marginal[i, d]
  void* log_qz_x;      // (K, B): sum_d ell_iid, log q(z_i | x_i)
  void* log_pz;        // (K, B): sum_d -0.5 (log 2 pi + z_id^2), log N(z_i; 0, I)
  void* lse_marginal;  // (K, B, D): logsumexp_j (lw_ij + ell_ijd), for the backward
  int64_t models;
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

struct KLDecompositionBackward {
  // Incoming gradients of the forward's (K, B) outputs, nullptr: zero. All four nullptr: the
  // three gradients are zeroed without a launch.
  const void* grad_log_qz;
  const void* grad_log_prod_qz;
  const void* grad_log_qz_x;
  const void* grad_log_pz;
  const void* z;
  const void* mu;
  const void* logvar;
  // Saved forward outputs: log_qz (K, B) is read only with grad_log_qz, lse_marginal (K, B, D)
  // only with grad_log_prod_qz.
  const void* log_qz;
  const void* lse_marginal;
  double log_weight_self;
  double log_weight_next;
  double log_weight_other;
  void* grad_z;
  void* grad_mu;
  void* grad_logvar;
  int64_t models;
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

cudaError_t kl_decomposition_forward(const KLDecompositionForward& args, cudaStream_t stream);
cudaError_t kl_decomposition_backward(const KLDecompositionBackward& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvae
