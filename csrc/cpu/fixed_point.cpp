// CPU kernels of the forward solver ops deq_fast::residual_norms / fixed_point_advance
// (deq_fast/ops/fixed_point.py): one sweep per sample each. The schemas are declared by the Python
// op table (deq_fast/ops/table.py); this file only registers their CPU kernels.
//
//   residual_norms      = residual_norms_reference       sq = [||y - x||^2, ||y||^2]
//   fixed_point_advance = fixed_point_advance_reference  best = y where improved; x = y where active
//
// with the damped map y = tau fx + (1 - tau) x formed per element in the state dtype exactly as the
// reference's torch expression rounds it (fx * tau, x * (1 - tau), their sum; y = fx when tau = 1).
// Norms: products in double over 16 lanes, one rounding to the accumulation dtype (float32 for
// float32 states, float64 for float64); deterministic (no dependence on threads).
//
// Bytes per call (size = element size):
//   residual_norms:      read x, fx                                  -> 2 B D size
//   fixed_point_advance: read fx (and x when damped), write x where active, best where improved
//                                                                    -> up to 4 B D size
// float32/float64 states; other dtypes are refused (the torch path runs the reference for them).
#include "deq_fast/cpu_stream.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

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

// ||y - x||^2 and ||y||^2 of one row.
template <typename scalar_t>
__attribute__((always_inline)) inline void norms_impl(const scalar_t* x, const scalar_t* fx,
                                                      int64_t D, bool plain, scalar_t tau,
                                                      scalar_t keep, double* gg, double* yy) {
  constexpr int64_t kHalf = kLanes / 2;
  double sg[kHalf] = {}, sy[kHalf] = {};
  int64_t i = 0;
  if (plain) {
    for (; i + kHalf <= D; i += kHalf)
      for (int64_t j = 0; j < kHalf; ++j) {
        const scalar_t y = fx[i + j];
        const double g = static_cast<double>(static_cast<scalar_t>(y - x[i + j]));
        sg[j] += g * g;
        sy[j] += static_cast<double>(y) * static_cast<double>(y);
      }
  } else {
    for (; i + kHalf <= D; i += kHalf)
      for (int64_t j = 0; j < kHalf; ++j) {
        const scalar_t y = damped(fx[i + j], x[i + j], tau, keep);
        const double g = static_cast<double>(static_cast<scalar_t>(y - x[i + j]));
        sg[j] += g * g;
        sy[j] += static_cast<double>(y) * static_cast<double>(y);
      }
  }
  double tg = 0.0, ty = 0.0;
  for (; i < D; ++i) {
    const scalar_t y = plain ? fx[i] : damped(fx[i], x[i], tau, keep);
    const double g = static_cast<double>(static_cast<scalar_t>(y - x[i]));
    tg += g * g;
    ty += static_cast<double>(y) * static_cast<double>(y);
  }
  for (int64_t j = 0; j < kHalf; ++j) {
    tg += sg[j];
    ty += sy[j];
  }
  *gg = tg;
  *yy = ty;
}

// best = y (when take), x = y (when on), for one row; y formed once per element.
template <typename scalar_t>
__attribute__((always_inline)) inline void advance_impl(scalar_t* x, const scalar_t* fx,
                                                        scalar_t* best, int64_t D, bool plain,
                                                        scalar_t tau, scalar_t keep, bool take,
                                                        bool on) {
  if (plain) {
    if (take) std::copy(fx, fx + D, best);
    if (on) std::copy(fx, fx + D, x);
    return;
  }
  if (take && on) {
    for (int64_t i = 0; i < D; ++i) {
      const scalar_t y = damped(fx[i], x[i], tau, keep);
      best[i] = y;
      x[i] = y;
    }
  } else if (take) {
    for (int64_t i = 0; i < D; ++i) best[i] = damped(fx[i], x[i], tau, keep);
  } else if (on) {
    for (int64_t i = 0; i < D; ++i) x[i] = damped(fx[i], x[i], tau, keep);
  }
}

#define DEQ_FAST_FIXED_POINT_STREAMING(T)                                                         \
  DEQ_FAST_CLONES void norms_row(const T* x, const T* fx, int64_t D, bool plain, T tau, T keep,  \
                                 double* gg, double* yy) {                                        \
    norms_impl(x, fx, D, plain, tau, keep, gg, yy);                                               \
  }                                                                                               \
  DEQ_FAST_CLONES void advance_row(T* x, const T* fx, T* best, int64_t D, bool plain, T tau,     \
                                   T keep, bool take, bool on) {                                  \
    advance_impl(x, fx, best, D, plain, tau, keep, take, on);                                     \
  }
DEQ_FAST_FIXED_POINT_STREAMING(float)
DEQ_FAST_FIXED_POINT_STREAMING(double)
#undef DEQ_FAST_FIXED_POINT_STREAMING

void residual_norms(const Tensor& x, const Tensor& fx_in, const Tensor& sq, double tau) {
  const Tensor fx = fx_in.contiguous();   // f may return any strides
  check_pair(x, fx, "residual_norms");
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sq.scalar_type() == acc && sq.dim() == 2 && sq.size(0) == B && sq.size(1) == 2,
              "residual_norms: sq must be a [B, 2] tensor of the accumulation dtype");
  const int64_t s0 = sq.stride(0), s1 = sq.stride(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_norms_cpu", [&] {
    using acc_t = scalar_t;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    acc_t* sp = sq.mutable_data_ptr<acc_t>();
    const bool plain = tau == 1.0;
    const scalar_t t = static_cast<scalar_t>(tau), k = static_cast<scalar_t>(1.0 - tau);
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double gg = 0.0, yy = 0.0;
        norms_row(xp + b * D, fp + b * D, D, plain, t, k, &gg, &yy);
        sp[b * s0] = static_cast<acc_t>(gg);
        sp[b * s0 + s1] = static_cast<acc_t>(yy);
      }
    });
  });
}

void fixed_point_advance(const Tensor& x, const Tensor& fx_in, const Tensor& best,
                         const Tensor& improved, const Tensor& active, double tau) {
  const Tensor fx = fx_in.contiguous();
  check_pair(x, fx, "fixed_point_advance");
  TORCH_CHECK(best.sizes() == x.sizes() && best.scalar_type() == x.scalar_type() &&
                  best.is_contiguous(),
              "fixed_point_advance: best must be a contiguous tensor shaped and typed like x");
  const int64_t B = x.size(0), D = x.size(1);
  for (const Tensor* t : {&improved, &active}) {
    TORCH_CHECK(t->scalar_type() == at::kBool && t->is_contiguous() && t->numel() == B,
                "fixed_point_advance: improved and active must be contiguous [B] bool tensors");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fixed_point_advance_cpu", [&] {
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    scalar_t* bp = best.mutable_data_ptr<scalar_t>();
    const bool* imp = improved.const_data_ptr<bool>();
    const bool* act = active.const_data_ptr<bool>();
    const bool plain = tau == 1.0;
    const scalar_t t = static_cast<scalar_t>(tau), k = static_cast<scalar_t>(1.0 - tau);
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        advance_row(xp + b * D, fp + b * D, bp + b * D, D, plain, t, k, imp[b], act[b]);
    });
  });
}

}  // namespace
}  // namespace fixed_point_cpu
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  m.impl("residual_norms", &deq_fast::fixed_point_cpu::residual_norms);
  m.impl("fixed_point_advance", &deq_fast::fixed_point_cpu::fixed_point_advance);
}
