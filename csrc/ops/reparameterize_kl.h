// Shared by the CPU and CUDA implementations of pyvae::reparameterize_kl_{forward,backward}.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace pyvae {

// Checks what every backend relies on: 2-D contiguous tensors of one floating dtype and device,
// optional tensors of the same shape, a one-element int64 seed when eps is absent.
void check_reparameterize_kl_args(const at::Tensor& mu, const at::Tensor& logvar,
                                  const std::optional<at::Tensor>& eps,
                                  const std::optional<at::Tensor>& seed,
                                  const std::optional<at::Tensor>& prior_mu,
                                  const std::optional<at::Tensor>& prior_logvar);

// float64 for float64 inputs, float32 otherwise: the dtype KL is accumulated and returned in.
at::ScalarType kl_dtype(at::ScalarType input);

}  // namespace pyvae
