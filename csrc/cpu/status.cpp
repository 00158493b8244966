// CPU kernel of the forward solver op deq_fast::track_status (deq_fast/ops/status.py): the
// per-iteration residual bookkeeping in one call instead of the reference's dozen dispatched ops.
// The schema is declared by the Python op table (deq_fast/ops/table.py); this file only registers
// the CPU kernel. O(B) work; bytes moved are negligible next to the O(B D) passes.
//
// Arithmetic in the accumulation dtype (sq's: float32 or float64), rounded as the reference's
// ops round: vals = [sqrt(s0), sqrt(s0) / (sqrt(s1) + rel_eps)] with rel_eps, tol and step cast to
// that dtype (as torch casts a Python scalar operand); the whole-batch sum adds samples in order.
// Comparisons with NaN are false, so NaN never enters `lowest` and a NaN residual stops the sample.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace deq_fast {
namespace status_cpu {
namespace {

using at::Tensor;

void check_pairs(const Tensor& t, const char* name, at::ScalarType acc, int64_t B) {
  TORCH_CHECK(t.scalar_type() == acc && t.dim() == 2 && t.size(0) == B && t.size(1) == 2 &&
                  t.device().is_cpu(),
              "track_status: ", name, " must be a CPU [B, 2] tensor of sq's dtype");
}

void check_flags(const Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.scalar_type() == at::kBool && t.dim() == 1 && t.size(0) == B, "track_status: ",
              name, " must be a [B] bool tensor");
}

void track_status(const Tensor& sq, const Tensor& lowest, const Tensor& best_step,
                  const Tensor& trace, const Tensor& active, const Tensor& improved, int64_t t,
                  double step, double tol, int64_t stop_idx, bool whole_batch, bool stop_together,
                  bool always_update, double rel_eps) {
  TORCH_CHECK(sq.scalar_type() == at::kFloat || sq.scalar_type() == at::kDouble,
              "track_status: sq must be float32 or float64, got ", sq.scalar_type());
  TORCH_CHECK(sq.dim() == 2 && sq.size(1) == 2, "track_status: sq must be [B, 2]");
  const int64_t B = sq.size(0);
  const auto acc = sq.scalar_type();
  check_pairs(sq, "sq", acc, B);
  check_pairs(lowest, "lowest", acc, B);
  check_pairs(best_step, "best_step", acc, B);
  TORCH_CHECK(trace.scalar_type() == acc && trace.dim() == 3 && trace.size(1) == B &&
                  trace.size(2) == 2,
              "track_status: trace must be a [T, B, 2] tensor of sq's dtype");
  TORCH_CHECK(0 <= t && t < trace.size(0), "track_status: t must be in [0, T), got ", t);
  TORCH_CHECK(stop_idx == 0 || stop_idx == 1, "track_status: stop_idx must be 0 or 1");
  check_flags(active, "active", B);
  check_flags(improved, "improved", B);
  AT_DISPATCH_FLOATING_TYPES(acc, "track_status_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* s = sq.const_data_ptr<acc_t>();
    acc_t* lo = lowest.mutable_data_ptr<acc_t>();
    acc_t* bs = best_step.mutable_data_ptr<acc_t>();
    acc_t* tr = trace.mutable_data_ptr<acc_t>() + t * trace.stride(0);
    bool* act = active.mutable_data_ptr<bool>();
    bool* imp_out = improved.mutable_data_ptr<bool>();
    const int64_t s0 = sq.stride(0), s1 = sq.stride(1);
    const int64_t l0 = lowest.stride(0), l1 = lowest.stride(1);
    const int64_t b0 = best_step.stride(0), b1 = best_step.stride(1);
    const int64_t t0 = trace.stride(1), t1 = trace.stride(2);
    const int64_t a0 = active.stride(0), i0 = improved.stride(0);
    const acc_t eps = static_cast<acc_t>(rel_eps), tol_a = static_cast<acc_t>(tol);
    const acc_t step_a = static_cast<acc_t>(step);
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    auto values = [&](acc_t q0, acc_t q1, acc_t* v) {
      v[0] = std::sqrt(q0);
      v[1] = v[0] / (std::sqrt(q1) + eps);
    };
    acc_t whole[2] = {acc_t(0), acc_t(0)};
    if (whole_batch) {
      acc_t q0 = acc_t(0), q1 = acc_t(0);
      for (int64_t b = 0; b < B; ++b) {
        q0 += s[b * s0];
        q1 += s[b * s0 + s1];
      }
      values(q0, q1, whole);
    }
    bool any_keep = false;
    for (int64_t b = 0; b < B; ++b) {
      acc_t v[2];
      if (whole_batch) {
        v[0] = whole[0];
        v[1] = whole[1];
      } else {
        values(s[b * s0], s[b * s0 + s1], v);
      }
      const bool on = act[b * a0];
      bool imp[2];
      for (int k = 0; k < 2; ++k) {
        acc_t& low = lo[b * l0 + k * l1];
        imp[k] = on && (always_update ? v[k] < inf : v[k] < low);
        if (imp[k]) {
          low = v[k];
          bs[b * b0 + k * b1] = step_a;
        }
        tr[b * t0 + k * t1] = on ? v[k] : low;
      }
      imp_out[b * i0] = imp[stop_idx];
      const bool keep = v[stop_idx] >= tol_a;   // false when converged or NaN
      if (stop_together) {
        any_keep = any_keep || (keep && on);
      } else {
        act[b * a0] = on && keep;
      }
    }
    if (stop_together && !any_keep) {
      for (int64_t b = 0; b < B; ++b) act[b * a0] = false;
    }
  });
}

}  // namespace
}  // namespace status_cpu
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  m.impl("track_status", &deq_fast::status_cpu::track_status);
}
