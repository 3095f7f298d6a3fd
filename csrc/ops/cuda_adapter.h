// Tensor-side helpers of the CUDA adapters in csrc/ops/<op>.cpp (compiled in CUDA builds only).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "ops/cuda/common.h"

namespace pyvae {

inline cuda::ScalarKind cuda_scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::ScalarKind::kFloat32;
    case at::kDouble: return cuda::ScalarKind::kFloat64;
    case at::kHalf: return cuda::ScalarKind::kFloat16;
    case at::kBFloat16: return cuda::ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, "pyvae: unsupported dtype ", type);
  }
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

}  // namespace pyvae
