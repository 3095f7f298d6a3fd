// Shared by the CPU and CUDA implementations of pyvae::reparameterize_kl_{forward,backward}.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "ops/common.h"

namespace pyvae {

// Checks what every backend relies on: 2-D contiguous tensors of one kernel dtype and device,
// optional tensors of the same shape, a one-element int64 seed when eps is absent.
void check_reparameterize_kl_args(const at::Tensor& mu, const at::Tensor& logvar,
                                  const std::optional<at::Tensor>& eps,
                                  const std::optional<at::Tensor>& seed,
                                  const std::optional<at::Tensor>& prior_mu,
                                  const std::optional<at::Tensor>& prior_logvar);

// The forward's checks plus the optional incoming gradients: grad_z (rows, cols) like mu, grad_kl
// (rows,) contiguous in accumulation_dtype of mu on mu's device.
void check_reparameterize_kl_backward_args(const std::optional<at::Tensor>& grad_z,
                                           const std::optional<at::Tensor>& grad_kl,
                                           const at::Tensor& mu, const at::Tensor& logvar,
                                           const std::optional<at::Tensor>& eps,
                                           const std::optional<at::Tensor>& seed,
                                           const std::optional<at::Tensor>& prior_mu,
                                           const std::optional<at::Tensor>& prior_logvar);

}  // namespace pyvae
