// Schema of the streaming minibatch KL-decomposition op (β-TCVAE), its argument checks, and (in
// CUDA builds) the adapter from tensors to the plain-CUDA launchers in
// ops/cuda/kl_decomposition.cu. The CPU kernels register themselves in
// ops/cpu/kl_decomposition.cpp; autograd, fake kernels and the user-facing wrapper are in
// pyvae/ops/kl_decomposition.py. The maths is documented in ops/kl_decomposition.h.
#include "ops/kl_decomposition.h"

#include <torch/library.h>

#include "ops/common.h"

#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_adapter.h"
#include "ops/cuda/kl_decomposition.h"
#endif

namespace pyvae {

void check_kl_decomposition_args(const at::Tensor& z, const at::Tensor& mu,
                                 const at::Tensor& logvar) {
  constexpr const char* op = "kl_decomposition";
  TORCH_CHECK(z.defined() && (z.dim() == 2 || z.dim() == 3), op,
              ": z must be 2-D (batch, dim) or 3-D (models, batch, dim), got ",
              z.defined() ? z.sizes() : at::IntArrayRef());
  check_kernel_dtype(op, "z", z);
  // Fewer than two samples leave no other posterior to estimate the aggregate one from.
  TORCH_CHECK(z.size(-2) >= 2, op, ": need a batch of at least 2, got ", z.size(-2),
              " (z of shape ", z.sizes(), ")");
  TORCH_CHECK(z.size(-1) >= 1, op, ": need at least one latent dimension, got z of shape ",
              z.sizes());
  check_like(op, "z", z, z, "like z");
  check_like(op, "mu", mu, z, "like z");
  check_like(op, "logvar", logvar, z, "like z");
}

void check_kl_decomposition_backward_args(const std::optional<at::Tensor>& grad_log_qz,
                                          const std::optional<at::Tensor>& grad_log_prod_qz,
                                          const std::optional<at::Tensor>& grad_log_qz_x,
                                          const std::optional<at::Tensor>& grad_log_pz,
                                          const at::Tensor& z, const at::Tensor& mu,
                                          const at::Tensor& logvar, const at::Tensor& log_qz,
                                          const at::Tensor& lse_marginal) {
  check_kl_decomposition_args(z, mu, logvar);
  constexpr const char* op = "kl_decomposition";
  // The saved outputs, ([K,] B) and ([K,] B, D), and the incoming gradients, ([K,] B) each, in
  // the accumulation dtype.
  const at::ScalarType acc = accumulation_dtype(z.scalar_type());
  const at::IntArrayRef rows = z.sizes().slice(0, z.dim() - 1);
  check_tensor(op, "log_qz", log_qz, rows, acc, z.device(), "like the forward's log_qz");
  check_tensor(op, "lse_marginal", lse_marginal, z.sizes(), acc, z.device(),
               "like the forward's lse_marginal");
  const std::pair<const char*, const std::optional<at::Tensor>*> grads[] = {
      {"grad_log_qz", &grad_log_qz},
      {"grad_log_prod_qz", &grad_log_prod_qz},
      {"grad_log_qz_x", &grad_log_qz_x},
      {"grad_log_pz", &grad_log_pz}};
  for (const auto& [name, grad] : grads) {
    if (grad->has_value()) check_tensor(op, name, **grad, rows, acc, z.device(), "like log_qz");
  }
}

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  m.def(
      "kl_decomposition_forward(Tensor z, Tensor mu, Tensor logvar, float log_weight_self, "
      "float log_weight_next, float log_weight_other) -> (Tensor log_qz, Tensor log_prod_qz, "
      "Tensor log_qz_x, Tensor log_pz, Tensor lse_marginal)");
  m.def(
      "kl_decomposition_backward(Tensor? grad_log_qz, Tensor? grad_log_prod_qz, "
      "Tensor? grad_log_qz_x, Tensor? grad_log_pz, Tensor z, Tensor mu, Tensor logvar, "
      "Tensor log_qz, Tensor lse_marginal, float log_weight_self, "
      "float log_weight_next, float log_weight_other) -> "
      "(Tensor grad_z, Tensor grad_mu, Tensor grad_logvar)");
}

#ifdef PYVAE_WITH_CUDA
namespace {

KLDecompositionOutputs kl_decomposition_forward_cuda(const at::Tensor& z, const at::Tensor& mu,
                                                     const at::Tensor& logvar,
                                                     double log_weight_self,
                                                     double log_weight_next,
                                                     double log_weight_other) {
  check_kl_decomposition_args(z, mu, logvar);
  const c10::cuda::CUDAGuard guard(z.device());
  KLDecompositionOutputs outputs = empty_kl_decomposition_outputs(z);
  auto& [log_qz, log_prod_qz, log_qz_x, log_pz, lse_marginal] = outputs;
  cuda::KLDecompositionForward args{z.data_ptr(), mu.data_ptr(), logvar.data_ptr(),
                                    log_weight_self, log_weight_next, log_weight_other,
                                    log_qz.data_ptr(), log_prod_qz.data_ptr(),
                                    log_qz_x.data_ptr(), log_pz.data_ptr(),
                                    lse_marginal.data_ptr(), kl_decomposition_models(z),
                                    z.size(-2), z.size(-1), cuda_scalar_kind(z.scalar_type())};
  const cudaError_t status =
      cuda::kl_decomposition_forward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "kl_decomposition_forward (cuda): ",
              cudaGetErrorString(status));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_decomposition_backward_cuda(
    const std::optional<at::Tensor>& grad_log_qz,
    const std::optional<at::Tensor>& grad_log_prod_qz,
    const std::optional<at::Tensor>& grad_log_qz_x, const std::optional<at::Tensor>& grad_log_pz,
    const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& log_qz,
    const at::Tensor& lse_marginal, double log_weight_self, double log_weight_next,
    double log_weight_other) {
  check_kl_decomposition_backward_args(grad_log_qz, grad_log_prod_qz, grad_log_qz_x, grad_log_pz,
                                       z, mu, logvar, log_qz, lse_marginal);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_mu = at::empty_like(z);
  at::Tensor grad_logvar = at::empty_like(z);
  cuda::KLDecompositionBackward args{
      data_or_null(grad_log_qz), data_or_null(grad_log_prod_qz), data_or_null(grad_log_qz_x),
      data_or_null(grad_log_pz), z.data_ptr(), mu.data_ptr(), logvar.data_ptr(),
      log_qz.data_ptr(), lse_marginal.data_ptr(), log_weight_self, log_weight_next,
      log_weight_other, grad_z.data_ptr(), grad_mu.data_ptr(), grad_logvar.data_ptr(),
      kl_decomposition_models(z), z.size(-2), z.size(-1), cuda_scalar_kind(z.scalar_type())};
  const cudaError_t status =
      cuda::kl_decomposition_backward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "kl_decomposition_backward (cuda): ",
              cudaGetErrorString(status));
  return {grad_z, grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("kl_decomposition_forward", &kl_decomposition_forward_cuda);
  m.impl("kl_decomposition_backward", &kl_decomposition_backward_cuda);
}
#endif  // PYVAE_WITH_CUDA

}  // namespace pyvae
