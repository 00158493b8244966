// deq_fast::anderson_lstsq: CUDA kernel, one thread per sample (m <= 16, ~m^3/3 flops each; the
// op is latency-bound and tiny next to the history passes). The math is
// include/deq_fast/anderson_lstsq.h; schema: ops.cpp.
// Headers: ATen core + c10/cuda only (no ATen/cuda/CUDAContext.h, which drags in cuBLAS/cuSPARSE).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "deq_fast/anderson_lstsq.h"
#include "deq_fast/op_checks.h"

namespace deq_fast {

namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void anderson_lstsq_kernel(const scalar_t* __restrict__ gram_ptr, int64_t batch, int m,
                                      int n, int newest, double lam, bool scaled,
                                      scalar_t* __restrict__ alpha_ptr) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double work[anderson_lstsq_work_size(kLstsqMaxM)];
  scalar_t* alpha_b = alpha_ptr + b * m;
  anderson_lstsq_solve(gram_ptr + b * m * m, m, n, newest, lam, scaled, work, alpha_b);
  for (int i = n; i < m; ++i) alpha_b[i] = scalar_t(0);
}

at::Tensor anderson_lstsq_cuda(const at::Tensor& gram, int64_t n, int64_t newest, double lam,
                               bool scaled) {
  check_anderson_lstsq_args(gram, n, newest, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(gram.device());
  const int64_t batch = gram.size(0);
  const int m = static_cast<int>(gram.size(1));
  at::Tensor alpha = at::empty({batch, m}, gram.options());
  if (batch == 0) return alpha;
  const unsigned int blocks = static_cast<unsigned int>((batch + kThreads - 1) / kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "anderson_lstsq_cuda", [&] {
    anderson_lstsq_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        gram.const_data_ptr<scalar_t>(), batch, m, static_cast<int>(n), static_cast<int>(newest),
        lam, scaled, alpha.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return alpha;
}

}  // namespace

TORCH_LIBRARY_IMPL(deq_fast, CUDA, m) { m.impl("anderson_lstsq", &anderson_lstsq_cuda); }

}  // namespace deq_fast
