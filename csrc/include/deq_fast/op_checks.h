// Argument checks shared by the CPU and CUDA kernels of one op (defined in the CPU source, which
// every build compiles). Host code only.
#pragma once

#include <ATen/core/Tensor.h>

namespace deq_fast {

// deq_fast::anderson_lstsq (cpu/anderson_lstsq.cpp): errors name the offending argument.
void check_anderson_lstsq_args(const at::Tensor& gram, int64_t n, int64_t newest,
                               c10::DeviceType device_type);

namespace backward {

// deq_fast::bwd_* (cpu/backward_ops.cpp, cuda/backward_ops.cu): shapes, dtypes, contiguity, one
// device for every operand (of type device_type), history lengths <= kMaxHistory (the CUDA
// kernels' small per-sample arrays). Errors name the offending argument.
void check_track_args(const at::Tensor& x, const at::Tensor& jtx, const at::Tensor& grad,
                      const at::Tensor& inv_gnorm, const at::Tensor& r, const at::Tensor& best_x,
                      const at::Tensor& best_rel, const at::Tensor& active,
                      c10::DeviceType device_type);
void check_masked_add_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& active,
                           c10::DeviceType device_type);
void check_anderson_mix_args(const at::Tensor& x, const at::Tensor& r, const at::Tensor& F,
                             const at::Tensor& G, const at::Tensor& gram, const at::Tensor& active,
                             int64_t slot, int64_t n, c10::DeviceType device_type);
void check_broyden_step_args(const at::Tensor& x, const at::Tensor& r, const at::Tensor& r_prev,
                             const at::Tensor& dx, const at::Tensor& U, const at::Tensor& V,
                             const at::Tensor& active, int64_t n, int64_t slot,
                             c10::DeviceType device_type);
void check_gmres_start_args(const at::Tensor& r, const at::Tensor& active, const at::Tensor& Q,
                            const at::Tensor& s, const at::Tensor& kdim,
                            const at::Tensor& cycle_active, c10::DeviceType device_type);
void check_gmres_arnoldi_args(const at::Tensor& jtq, const at::Tensor& Q, const at::Tensor& R,
                              const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& s,
                              const at::Tensor& kdim, const at::Tensor& cycle_active,
                              const at::Tensor& inv_gnorm, int64_t j, c10::DeviceType device_type);
void check_gmres_update_args(const at::Tensor& x, const at::Tensor& Q, const at::Tensor& R,
                             const at::Tensor& s, const at::Tensor& kdim,
                             c10::DeviceType device_type);

}  // namespace backward
}  // namespace deq_fast
