// Shared by the plain-CUDA launcher headers (no torch headers, no device code).
#pragma once

namespace pyvae {
namespace cuda {

// The element type of a launcher's tensors.
enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace cuda
}  // namespace pyvae
