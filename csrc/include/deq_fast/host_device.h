// The one host-device macro and the scalar helpers every HOST_DEVICE header shares
// (pytorch/vision style: the math is written once and compiled for the CPU and for CUDA).
// Depends on nothing but <cmath>, so a standalone nvcc translation unit can include it.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DEQ_FAST_HOST_DEVICE __host__ __device__
#else
#define DEQ_FAST_HOST_DEVICE
#endif

namespace deq_fast {

// isfinite in double for both compilers: the device overload of isfinite is not std::isfinite.
// (Not `x - x == 0`: it is the same test but reads as a typo, and -ffast-math would fold it.)
DEQ_FAST_HOST_DEVICE inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

}  // namespace deq_fast
