// CPU kernel of the forward solver op deq_fast::fixed_point_step (deq_fast/ops/fixed_point.py): one
// sweep per sample. The schema is declared by the Python op table (deq_fast/ops/table.py); this
// file only registers its CPU kernel.
//
//   fixed_point_step = fixed_point_step_reference, per sample in one sweep:
//     best = x where improved (the previous iteration's deferred best copy);
//     sq = [||y - x||^2, ||y||^2];  x = y where active
//
// with the damped map y = tau fx + (1 - tau) x formed per element in the state dtype exactly as the
// reference's torch expression rounds it (fx * tau, x * (1 - tau), their sum; y = fx when tau = 1).
// Norms: products in double over 8 lanes, one rounding to the accumulation dtype (float32 for
// float32 states, float64 for float64); deterministic (no dependence on threads).
//
// Bytes per call (size = element size): read x, fx, write x where active, best where improved
//                                                                    -> 3 B D size (+1 row improved)
// float32/float64 states; other dtypes are refused (the torch path runs the reference for them).
#include "deq_fast/cpu_stream.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

// y = tau fx + (1 - tau) x must round as torch's two products and a sum: no fused multiply-add
// (GCC contracts a * b + c into an FMA in the x86-64-v3 clone by default).
#pragma GCC optimize("fp-contract=off")

namespace deq_fast {
namespace fixed_point_cpu {
namespace {

using at::Tensor;
using namespace deq_fast::cpu_stream;

int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

void check_pair(const Tensor& x, const Tensor& fx, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous CPU [B, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 for the C++ CPU kernel, got ", x.scalar_type(),
              " (the torch path runs the reference for other dtypes)");
  TORCH_CHECK(fx.sizes() == x.sizes() && fx.scalar_type() == x.scalar_type() && fx.is_contiguous(),
              op, ": fx must be a contiguous tensor shaped and typed like x");
}

// y = tau fx + (1 - tau) x in the state dtype, rounded as the torch expression is (the scalars
// are cast to the state dtype, each product rounded, then the sum).
template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t damped(scalar_t f, scalar_t x, scalar_t tau,
                                                      scalar_t keep) {
  const scalar_t a = f * tau;
  const scalar_t b = x * keep;
  return a + b;
}

// One row: best = x (Take), the two squared norms, x = y (On). fx may alias x (f returning its
// input): each block of kHalf elements is loaded into registers before any of it is stored, which
// also lets the compiler vectorise without assuming the pointers apart.
template <typename scalar_t, bool Plain, bool Take, bool On>
__attribute__((always_inline)) inline void step_impl(scalar_t* x, const scalar_t* fx,
                                                     scalar_t* best, int64_t D, scalar_t tau,
                                                     scalar_t keep, double* gg, double* yy) {
  constexpr int64_t kHalf = kLanes / 2;
  double sg[kHalf] = {}, sy[kHalf] = {};
  scalar_t xv[kHalf], yv[kHalf];
  auto block = [&](int64_t i, int64_t n, double* acc_g, double* acc_y)
      __attribute__((always_inline)) {
    for (int64_t j = 0; j < n; ++j) xv[j] = x[i + j];
    for (int64_t j = 0; j < n; ++j) yv[j] = Plain ? fx[i + j] : damped(fx[i + j], xv[j], tau, keep);
    for (int64_t j = 0; j < n; ++j) {
      const double g = static_cast<double>(static_cast<scalar_t>(yv[j] - xv[j]));
      acc_g[j] += g * g;
      acc_y[j] += static_cast<double>(yv[j]) * static_cast<double>(yv[j]);
    }
    if (Take)
      for (int64_t j = 0; j < n; ++j) best[i + j] = xv[j];
    if (On)
      for (int64_t j = 0; j < n; ++j) x[i + j] = yv[j];
  };
  int64_t i = 0;
  for (; i + kHalf <= D; i += kHalf) block(i, kHalf, sg, sy);
  double tg[kHalf] = {}, ty[kHalf] = {};
  block(i, D - i, tg, ty);                      // the tail, fewer than kHalf elements
  double total_g = 0.0, total_y = 0.0;
  for (int64_t j = 0; j < kHalf; ++j) {
    total_g += tg[j] + sg[j];
    total_y += ty[j] + sy[j];
  }
  *gg = total_g;
  *yy = total_y;
}

template <typename scalar_t, bool Plain>
__attribute__((always_inline)) inline void step_flags(scalar_t* x, const scalar_t* fx,
                                                      scalar_t* best, int64_t D, scalar_t tau,
                                                      scalar_t keep, bool take, bool on,
                                                      double* gg, double* yy) {
  if (take && on) step_impl<scalar_t, Plain, true, true>(x, fx, best, D, tau, keep, gg, yy);
  else if (take) step_impl<scalar_t, Plain, true, false>(x, fx, best, D, tau, keep, gg, yy);
  else if (on) step_impl<scalar_t, Plain, false, true>(x, fx, best, D, tau, keep, gg, yy);
  else step_impl<scalar_t, Plain, false, false>(x, fx, best, D, tau, keep, gg, yy);
}

#define DEQ_FAST_FIXED_POINT_STREAMING(T)                                                         \
  DEQ_FAST_CLONES void step_row(T* x, const T* fx, T* best, int64_t D, bool plain, T tau, T keep, \
                                bool take, bool on, double* gg, double* yy) {                     \
    if (plain) step_flags<T, true>(x, fx, best, D, tau, keep, take, on, gg, yy);                  \
    else step_flags<T, false>(x, fx, best, D, tau, keep, take, on, gg, yy);                       \
  }
DEQ_FAST_FIXED_POINT_STREAMING(float)
DEQ_FAST_FIXED_POINT_STREAMING(double)
#undef DEQ_FAST_FIXED_POINT_STREAMING

void fixed_point_step(const Tensor& x, const Tensor& fx_in, const Tensor& best, const Tensor& sq,
                      const Tensor& improved, const Tensor& active, double tau) {
  const Tensor fx = fx_in.contiguous();   // f may return any strides
  check_pair(x, fx, "fixed_point_step");
  TORCH_CHECK(best.sizes() == x.sizes() && best.scalar_type() == x.scalar_type() &&
                  best.is_contiguous(),
              "fixed_point_step: best must be a contiguous tensor shaped and typed like x");
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sq.scalar_type() == acc && sq.dim() == 2 && sq.size(0) == B && sq.size(1) == 2,
              "fixed_point_step: sq must be a [B, 2] tensor of the accumulation dtype");
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&improved, "improved"},
                                 {&active, "active"}}) {
    TORCH_CHECK(t->scalar_type() == at::kBool && t->is_contiguous() && t->numel() == B,
                "fixed_point_step: ", name, " must be a contiguous [B] bool tensor, got ",
                t->scalar_type(), " of shape ", t->sizes());
  }
  const int64_t s0 = sq.stride(0), s1 = sq.stride(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fixed_point_step_cpu", [&] {
    using acc_t = scalar_t;
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    scalar_t* bp = best.mutable_data_ptr<scalar_t>();
    acc_t* sp = sq.mutable_data_ptr<acc_t>();
    const bool* imp = improved.const_data_ptr<bool>();
    const bool* act = active.const_data_ptr<bool>();
    const bool plain = tau == 1.0;
    const scalar_t t = static_cast<scalar_t>(tau), k = static_cast<scalar_t>(1.0 - tau);
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double gg = 0.0, yy = 0.0;
        step_row(xp + b * D, fp + b * D, bp + b * D, D, plain, t, k, imp[b], act[b], &gg, &yy);
        sp[b * s0] = static_cast<acc_t>(gg);
        sp[b * s0 + s1] = static_cast<acc_t>(yy);
      }
    });
  });
}

}  // namespace
}  // namespace fixed_point_cpu
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  m.impl("fixed_point_step", &deq_fast::fixed_point_cpu::fixed_point_step);
}
