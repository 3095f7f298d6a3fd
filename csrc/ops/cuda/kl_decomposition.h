// Launchers of the streaming minibatch total-correlation kernels; the maths and notation are in
// ops/kl_decomposition.h. Plain CUDA, no torch headers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

// z, mu, logvar: contiguous (K, B, D) in the input dtype: K models' batches (K = 1 for a (B, D)
// input), each computed on its own. log_qz, lse_marginal and the incoming
// gradients are float32 (float64 for float64 inputs); grad_z/mu/logvar are in the input dtype.
struct KLDecompositionForward {
  const void* z;
  const void* mu;
  const void* logvar;
  double log_weight_self;
  double log_weight_next;
  double log_weight_other;
  void* log_qz;        // (K, B)
  void* lse_marginal;  // (K, B, D)
  int64_t models;
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

struct KLDecompositionBackward {
  const void* grad_log_qz;        // (K, B), nullptr: zero
  const void* grad_lse_marginal;  // (K, B, D), nullptr: zero
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
  int64_t models;
  int64_t batch;
  int64_t dim;
  ScalarKind kind;
};

cudaError_t kl_decomposition_forward(const KLDecompositionForward& args, cudaStream_t stream);
cudaError_t kl_decomposition_backward(const KLDecompositionBackward& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvae
