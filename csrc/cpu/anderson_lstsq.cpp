// deq_fast::anderson_lstsq: argument checks and the CPU kernel (schema: ops.cpp). The math is
// include/deq_fast/anderson_lstsq.h.
// Only ATen / torch/library.h headers: torch/extension.h would cost ~25 s of compile per file.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "deq_fast/anderson_lstsq.h"
#include "deq_fast/op_checks.h"

namespace deq_fast {

void check_anderson_lstsq_args(const at::Tensor& gram, int64_t n, int64_t newest,
                               c10::DeviceType device_type) {
  TORCH_CHECK(gram.device().type() == device_type, "anderson_lstsq: gram must be on ",
              c10::DeviceTypeName(device_type), ", got ", gram.device());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "anderson_lstsq: gram must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2),
              "anderson_lstsq: gram must have shape [B, m, m], got ", gram.sizes());
  TORCH_CHECK(gram.is_contiguous(), "anderson_lstsq: gram must be contiguous");
  const int64_t m = gram.size(1);
  TORCH_CHECK(m <= kLstsqMaxM, "anderson_lstsq: gram's history size m must be <= ", kLstsqMaxM,
              ", got m=", m);
  TORCH_CHECK(n >= 1 && n <= m, "anderson_lstsq: n must satisfy 1 <= n <= m = ", m, ", got n=", n);
  TORCH_CHECK(newest >= 0 && newest < n, "anderson_lstsq: newest must satisfy 0 <= newest < n = ",
              n, ", got newest=", newest);
}

namespace {

at::Tensor anderson_lstsq_cpu(const at::Tensor& gram, int64_t n, int64_t newest, double lam,
                              bool scaled) {
  check_anderson_lstsq_args(gram, n, newest, c10::DeviceType::CPU);
  const int64_t batch = gram.size(0);
  const int m = static_cast<int>(gram.size(1));
  at::Tensor alpha = at::empty({batch, m}, gram.options());
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "anderson_lstsq_cpu", [&] {
    const scalar_t* gram_ptr = gram.const_data_ptr<scalar_t>();
    scalar_t* alpha_ptr = alpha.mutable_data_ptr<scalar_t>();
    // ~n^3/3 flops per sample: parallelise over samples only for large batches.
    at::parallel_for(0, batch, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double work[anderson_lstsq_work_size(kLstsqMaxM)];
        scalar_t* alpha_b = alpha_ptr + b * m;
        anderson_lstsq_solve(gram_ptr + b * m * m, m, static_cast<int>(n),
                             static_cast<int>(newest), lam, scaled, work, alpha_b);
        for (int i = static_cast<int>(n); i < m; ++i) alpha_b[i] = scalar_t(0);
      }
    });
  });
  return alpha;
}

}  // namespace

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) { m.impl("anderson_lstsq", &anderson_lstsq_cpu); }

}  // namespace deq_fast
