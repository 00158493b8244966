// Argument checks shared by the CPU and CUDA kernels of one op (defined in the CPU source, which
// every build compiles). Host code only.
#pragma once

#include <ATen/core/Tensor.h>

namespace deq_fast {

// deq_fast::anderson_lstsq (cpu/anderson_lstsq.cpp): errors name the offending argument.
void check_anderson_lstsq_args(const at::Tensor& gram, int64_t n, int64_t newest,
                               c10::DeviceType device_type);

}  // namespace deq_fast
