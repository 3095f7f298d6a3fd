// Schema of the fused reparameterize+KL op, its argument checks, and (in CUDA builds) the adapter
// from tensors to the plain-CUDA launchers in ops/cuda/reparameterize_kl.cu. The CPU kernels
// register themselves in ops/cpu/reparameterize_kl.cpp; autograd, fake kernels and the
// user-facing wrapper are in pyvae/ops/reparameterize_kl.py.
#include "ops/reparameterize_kl.h"

#include <torch/library.h>

#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_adapter.h"
#include "ops/cuda/reparameterize_kl.h"
#endif

namespace pyvae {

at::ScalarType kl_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_reparameterize_kl_args(const at::Tensor& mu, const at::Tensor& logvar,
                                  const std::optional<at::Tensor>& eps,
                                  const std::optional<at::Tensor>& seed,
                                  const std::optional<at::Tensor>& prior_mu,
                                  const std::optional<at::Tensor>& prior_logvar) {
  TORCH_CHECK(mu.dim() == 2, "reparameterize_kl: mu must be 2-D (rows, cols), got ", mu.sizes());
  TORCH_CHECK(at::isFloatingType(mu.scalar_type()),
              "reparameterize_kl: mu must be floating point, got ", mu.scalar_type());
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "reparameterize_kl: prior_mu and prior_logvar must be given together");
  TORCH_CHECK(eps.has_value() || seed.has_value(), "reparameterize_kl: need eps or a seed");
  auto check_like_mu = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == mu.sizes(), "reparameterize_kl: ", name, " has shape ", t.sizes(),
                " but mu has ", mu.sizes());
    TORCH_CHECK(t.scalar_type() == mu.scalar_type(), "reparameterize_kl: ", name, " is ",
                t.scalar_type(), " but mu is ", mu.scalar_type());
    TORCH_CHECK(t.device() == mu.device(), "reparameterize_kl: ", name, " is on ", t.device(),
                " but mu is on ", mu.device());
    TORCH_CHECK(t.is_contiguous(), "reparameterize_kl: ", name, " must be contiguous");
  };
  check_like_mu(mu, "mu");
  check_like_mu(logvar, "logvar");
  if (eps.has_value()) check_like_mu(*eps, "eps");
  if (prior_mu.has_value()) {
    check_like_mu(*prior_mu, "prior_mu");
    check_like_mu(*prior_logvar, "prior_logvar");
  }
  if (!eps.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "reparameterize_kl: seed must be one int64, got ", seed->scalar_type(),
                seed->sizes());
    TORCH_CHECK(seed->device() == mu.device(), "reparameterize_kl: seed is on ", seed->device(),
                " but mu is on ", mu.device());
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
  at::Tensor kl = at::empty({mu.size(0)}, mu.options().dtype(kl_dtype(mu.scalar_type())));
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
  check_reparameterize_kl_args(mu, logvar, eps, seed, prior_mu, prior_logvar);
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
