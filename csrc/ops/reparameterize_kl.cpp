// Schema of the fused reparameterize+KL op, its argument checks, and (in CUDA builds) the adapter
// from tensors to the plain-CUDA launchers in ops/cuda/reparameterize_kl.cu. The CPU kernels
// register themselves in ops/cpu/reparameterize_kl.cpp; autograd, fake kernels and the
// user-facing wrapper are in pyvae/ops/reparameterize_kl.py.
#include "ops/reparameterize_kl.h"

#include <torch/library.h>

#include "ops/common.h"

#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_adapter.h"
#include "ops/cuda/reparameterize_kl.h"
#endif

namespace pyvae {

void check_reparameterize_kl_args(const at::Tensor& mu, const at::Tensor& logvar,
                                  const std::optional<at::Tensor>& eps,
                                  const std::optional<at::Tensor>& seed,
                                  const std::optional<at::Tensor>& prior_mu,
                                  const std::optional<at::Tensor>& prior_logvar) {
  constexpr const char* op = "reparameterize_kl";
  TORCH_CHECK(mu.defined() && mu.dim() == 2, op, ": mu must be 2-D (rows, cols), got ",
              mu.defined() ? mu.sizes() : at::IntArrayRef());
  check_kernel_dtype(op, "mu", mu);
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              op, ": prior_mu and prior_logvar must be given together");
  TORCH_CHECK(eps.has_value() || seed.has_value(), op, ": need eps or a seed");
  check_like(op, "mu", mu, mu, "like mu");
  check_like(op, "logvar", logvar, mu, "like mu");
  if (eps.has_value()) check_like(op, "eps", *eps, mu, "like mu");
  if (prior_mu.has_value()) {
    check_like(op, "prior_mu", *prior_mu, mu, "like mu");
    check_like(op, "prior_logvar", *prior_logvar, mu, "like mu");
  }
  if (!eps.has_value()) {
    // Read as one int64 on mu's device (by the CUDA kernels without a host sync).
    check_tensor(op, "seed", *seed, {1}, at::kLong, mu.device(), "one int64 on mu's device");
  }
}

void check_reparameterize_kl_backward_args(const std::optional<at::Tensor>& grad_z,
                                           const std::optional<at::Tensor>& grad_kl,
                                           const at::Tensor& mu, const at::Tensor& logvar,
                                           const std::optional<at::Tensor>& eps,
                                           const std::optional<at::Tensor>& seed,
                                           const std::optional<at::Tensor>& prior_mu,
                                           const std::optional<at::Tensor>& prior_logvar) {
  check_reparameterize_kl_args(mu, logvar, eps, seed, prior_mu, prior_logvar);
  constexpr const char* op = "reparameterize_kl";
  // The incoming gradients of z (rows, cols) in mu's dtype and of kl (rows,) in kl's dtype.
  if (grad_z.has_value()) check_like(op, "grad_z", *grad_z, mu, "like z");
  if (grad_kl.has_value()) {
    check_tensor(op, "grad_kl", *grad_kl, {mu.size(0)}, accumulation_dtype(mu.scalar_type()),
                 mu.device(), "like kl");
  }
}

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  m.def(
      "reparameterize_kl_forward(Tensor mu, Tensor logvar, Tensor? eps, Tensor? seed, "
      "Tensor? prior_mu, Tensor? prior_logvar) -> (Tensor z, Tensor kl)");
  m.def(
      "reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, "
      "Tensor? eps, Tensor? seed, Tensor? prior_mu, Tensor? prior_logvar) -> "
      "(Tensor grad_mu, Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar)");
}

#ifdef PYVAE_WITH_CUDA
namespace {

const int64_t* seed_or_null(const std::optional<at::Tensor>& seed,
                            const std::optional<at::Tensor>& eps) {
  return eps.has_value() ? nullptr : seed->data_ptr<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward_cuda(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar) {
  check_reparameterize_kl_args(mu, logvar, eps, seed, prior_mu, prior_logvar);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor z = at::empty_like(mu);
  at::Tensor kl =
      at::empty({mu.size(0)}, mu.options().dtype(accumulation_dtype(mu.scalar_type())));
  cuda::ReparameterizeKLForward args{mu.data_ptr(), logvar.data_ptr(), data_or_null(eps),
                                     seed_or_null(seed, eps), data_or_null(prior_mu),
                                     data_or_null(prior_logvar), z.data_ptr(), kl.data_ptr(),
                                     mu.size(0), mu.size(1), cuda_scalar_kind(mu.scalar_type())};
  const cudaError_t status =
      cuda::reparameterize_kl_forward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "reparameterize_kl_forward (cuda): ",
              cudaGetErrorString(status));
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_backward_cuda(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar) {
  check_reparameterize_kl_backward_args(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu,
                                        prior_logvar);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor grad_mu = at::empty_like(mu);
  at::Tensor grad_logvar = at::empty_like(mu);
  const bool has_prior = prior_mu.has_value();
  at::Tensor grad_prior_mu = has_prior ? at::empty_like(mu) : at::empty({0}, mu.options());
  at::Tensor grad_prior_logvar = has_prior ? at::empty_like(mu) : at::empty({0}, mu.options());
  cuda::ReparameterizeKLBackward args{
      data_or_null(grad_z), data_or_null(grad_kl), mu.data_ptr(), logvar.data_ptr(),
      data_or_null(eps), seed_or_null(seed, eps), data_or_null(prior_mu),
      data_or_null(prior_logvar), grad_mu.data_ptr(), grad_logvar.data_ptr(),
      has_prior ? grad_prior_mu.data_ptr() : nullptr,
      has_prior ? grad_prior_logvar.data_ptr() : nullptr, mu.size(0), mu.size(1),
      cuda_scalar_kind(mu.scalar_type())};
  const cudaError_t status =
      cuda::reparameterize_kl_backward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "reparameterize_kl_backward (cuda): ",
              cudaGetErrorString(status));
  return {grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward_cuda);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cuda);
}
#endif  // PYVAE_WITH_CUDA

}  // namespace pyvae
