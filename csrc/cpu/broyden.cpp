// CPU kernels of the forward solver ops deq_fast::broyden_dots / broyden_update: Broyden's two
// passes (deq_fast/ops/broyden.py, where the update formula is derived) as one sweep each over the
// state and the kept history columns. The schemas are declared by the Python op table
// (deq_fast/ops/table.py), because the ops exist without this extension too; this file only
// registers their CPU kernels.
//
//   broyden_dots    = broyden_dots_reference    (pass 1: g, dg, a = U dx, b = V g, c = V dg, dots)
//   broyden_update  = broyden_update_reference  (pass 2: best, u, v, the step)
//
// Layout and meaning as in deq_fast/ops/broyden.py: x, fx, g_old, g, dx, best [B, D]; U, V
// [B, L, D] (H = -I + sum_l U_l V_l^T over the n_valid written slots); abc [B, 3, L] and scal
// [B, 4] in the accumulation dtype (float32 for float32 states, float64 for float64). dg = g -
// g_old is formed per element in double, never stored. The torch path reads its histories in
// buckets of 4 slots (unwritten slots are zero); these kernels read exactly n_valid and write zeros
// to abc beyond it, so both give the same numbers up to rounding. Bytes per iteration: pass 1
// (2 n_valid + 5) B D size, pass 2 (2 n_valid + 8) B D size (+ B D size for the best copy).
//
// float32/float64 states (other dtypes are rejected with an error: the torch path then calls the
// reference, see deq_fast/ops/table.py); the pure-torch functions stay the reference they are
// tested against.
#include "deq_fast/cpu_stream.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace deq_fast {
namespace broyden_cpu {
namespace {

using at::Tensor;
using namespace deq_fast::cpu_stream;

int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

void check_broyden(const Tensor& x, const Tensor& U, const Tensor& V, const Tensor& abc,
                   const Tensor& scal, int64_t n_valid) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous CPU [B, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 for the C++ CPU kernel, got ", x.scalar_type(),
              " (the torch path runs the reference for other dtypes)");
  const int64_t B = x.size(0), D = x.size(1);
  for (const Tensor* t : {&U, &V}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(2) == D && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "U and V must be contiguous [B, L, D] tensors of x's dtype");
  }
  const int64_t L = U.size(1);
  TORCH_CHECK(V.size(1) == L, "U and V must have the same ring length L");
  TORCH_CHECK(0 <= n_valid && n_valid <= L, "n_valid must be in [0, L], got ", n_valid);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(abc.scalar_type() == acc && abc.is_contiguous() && abc.dim() == 3 &&
                  abc.size(0) == B && abc.size(1) == 3 && abc.size(2) == L,
              "abc must be a contiguous [B, 3, L] tensor of the accumulation dtype");
  TORCH_CHECK(scal.scalar_type() == acc && scal.is_contiguous() && scal.dim() == 2 &&
                  scal.size(0) == B && scal.size(1) == 4,
              "scal must be a contiguous [B, 4] tensor of the accumulation dtype");
}

void check_like(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              name, " must be a contiguous tensor shaped and typed like x");
}

void check_flags(const Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.scalar_type() == at::kBool && t.is_contiguous() && t.numel() == B, name,
              " must be a contiguous [B] bool tensor");
}

// Pass 1: g = fx - x; dg = g - g_old; abc[:, 0, l] = <U_l, dx>, abc[:, 1, l] = <V_l, g>,
// abc[:, 2, l] = <V_l, dg> (zero for l >= n_valid; U_l and V_l read once each);
// scal = [<dx, g>, <dx, dg>, ||g||^2, ||fx||^2].
void broyden_dots(const Tensor& x, const Tensor& fx, const Tensor& g_old, const Tensor& g,
                  const Tensor& dx, const Tensor& U, const Tensor& V, const Tensor& abc,
                  const Tensor& scal, int64_t n_valid) {
  check_broyden(x, U, V, abc, scal, n_valid);
  check_like(fx, "fx", x);
  check_like(g_old, "g_old", x);
  check_like(g, "g", x);
  check_like(dx, "dx", x);
  TORCH_CHECK(!g.is_same(g_old), "g and g_old must be different buffers");
  const int64_t B = x.size(0), D = x.size(1), L = U.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "broyden_dots_cpu", [&] {
    using acc_t = scalar_t;  // float -> float, double -> double (abc/scal dtype)
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* fp = fx.data_ptr<scalar_t>();
    const scalar_t* gop = g_old.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = dx.data_ptr<scalar_t>();
    const scalar_t* Up = U.data_ptr<scalar_t>();
    const scalar_t* Vp = V.data_ptr<scalar_t>();
    acc_t* abp = abc.data_ptr<acc_t>();
    acc_t* sp = scal.data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        // g and the four sums in one pass; kW independent lanes per sum (vectorisable)
        constexpr int64_t kW = 8;
        double sdg[kW] = {}, sddg[kW] = {}, sgg[kW] = {}, sff[kW] = {};
        int64_t i = 0;
        for (; i + kW <= D; i += kW) {
          for (int64_t j = 0; j < kW; ++j) {
            const scalar_t gi = fp[o + i + j] - xp[o + i + j];
            gp[o + i + j] = gi;
            const double gd = static_cast<double>(gi), di = static_cast<double>(dp[o + i + j]);
            const double dgi = gd - static_cast<double>(gop[o + i + j]);
            const double fi = static_cast<double>(fp[o + i + j]);
            sdg[j] += di * gd;
            sddg[j] += di * dgi;
            sgg[j] += gd * gd;
            sff[j] += fi * fi;
          }
        }
        double dg = 0.0, ddg = 0.0, gg = 0.0, ff = 0.0;
        for (; i < D; ++i) {
          const scalar_t gi = fp[o + i] - xp[o + i];
          gp[o + i] = gi;
          const double gd = static_cast<double>(gi), di = static_cast<double>(dp[o + i]);
          const double dgi = gd - static_cast<double>(gop[o + i]);
          const double fi = static_cast<double>(fp[o + i]);
          dg += di * gd;
          ddg += di * dgi;
          gg += gd * gd;
          ff += fi * fi;
        }
        for (int64_t j = 0; j < kW; ++j) {
          dg += sdg[j];
          ddg += sddg[j];
          gg += sgg[j];
          ff += sff[j];
        }
        acc_t* a = abp + b * 3 * L;
        acc_t* bv = a + L;
        acc_t* c = bv + L;
        for (int64_t l = 0; l < L; ++l) {
          double al = 0.0, bl = 0.0, cl = 0.0;
          if (l < n_valid) {
            al = dot(Up + (b * L + l) * D, dp + o, D);
            dot2(Vp + (b * L + l) * D, gp + o, gop + o, D, &bl, &cl);  // <V, g>, <V, g - g_old>
          }
          a[l] = static_cast<acc_t>(al);
          bv[l] = static_cast<acc_t>(bl);
          c[l] = static_cast<acc_t>(cl);
        }
        acc_t* s = sp + b * 4;
        s[0] = static_cast<acc_t>(dg);
        s[1] = static_cast<acc_t>(ddg);
        s[2] = static_cast<acc_t>(gg);
        s[3] = static_cast<acc_t>(ff);
      }
    });
  });
}

// Pass 2 (per sample): best = x where improved; with <v, g> = <a, b> - <dx, g> and
// den = <v, dg> = <a, c> - <dx, dg>:  -H g = g - sum b_l U_l and w = dx + dg - sum c_l U_l (one
// sweep over U), v = sum a_l V_l - dx,  u = w / den (entries that are not finite set to 0),
// upd = -H g - <v, g> u (+ b_s U_s(old) when slot s was written); an active sample writes
// U_s = u, V_s = v, x_new = x + upd, dx = x_new - x (the step as rounded); a stopped one keeps
// its factors and its x, dx = 0.
void broyden_update(const Tensor& x, const Tensor& g, const Tensor& g_old, const Tensor& dx,
                    const Tensor& U, const Tensor& V, const Tensor& abc, const Tensor& scal,
                    const Tensor& best, const Tensor& improved, const Tensor& active, int64_t slot,
                    int64_t n_valid) {
  check_broyden(x, U, V, abc, scal, n_valid);
  check_like(g, "g", x);
  check_like(g_old, "g_old", x);
  check_like(dx, "dx", x);
  check_like(best, "best", x);
  const int64_t B = x.size(0), D = x.size(1), L = U.size(1);
  check_flags(improved, "improved", B);
  check_flags(active, "active", B);
  TORCH_CHECK(0 <= slot && slot < L, "slot must be in [0, L), got ", slot);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "broyden_update_cpu", [&] {
    using acc_t = scalar_t;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* gop = g_old.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    scalar_t* Up = U.data_ptr<scalar_t>();
    scalar_t* Vp = V.data_ptr<scalar_t>();
    const acc_t* abp = abc.data_ptr<acc_t>();
    const acc_t* sp = scal.data_ptr<acc_t>();
    scalar_t* bp = best.data_ptr<scalar_t>();
    const bool* imp = improved.data_ptr<bool>();
    const bool* act = active.data_ptr<bool>();
    const bool evict = slot < n_valid;
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      std::vector<double> a(L), neg_b(L), neg_c(L);
      double nhg[kTile], w[kTile], v[kTile];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        const acc_t* ab = abp + b * 3 * L;
        double a_b = 0.0, a_c = 0.0;
        for (int64_t l = 0; l < n_valid; ++l) {
          a[l] = static_cast<double>(ab[l]);
          neg_b[l] = -static_cast<double>(ab[L + l]);
          neg_c[l] = -static_cast<double>(ab[2 * L + l]);
          a_b -= a[l] * neg_b[l];
          a_c -= a[l] * neg_c[l];
        }
        const double vg = a_b - static_cast<double>(sp[b * 4]);
        const double den = a_c - static_cast<double>(sp[b * 4 + 1]);
        const double b_s = evict ? -neg_b[slot] : 0.0;
        const bool on = act[b], take = imp[b];
        scalar_t* us = Up + (b * L + slot) * D;
        scalar_t* vs = Vp + (b * L + slot) * D;
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0), ot = o + t0;
          for (int64_t i = 0; i < len; ++i) {
            const double gi = static_cast<double>(gp[ot + i]), di = static_cast<double>(dp[ot + i]);
            nhg[i] = gi;
            w[i] = di + (gi - static_cast<double>(gop[ot + i]));
            v[i] = -di;
          }
          // nhg = g - sum b_l U_l, w = dx + dg - sum c_l U_l (one sweep over U),
          // v = -dx + sum a_l V_l (columns in blocks the helpers take)
          for (int64_t l0 = 0; l0 < n_valid; l0 += kMaxColumns) {
            const int64_t nb = std::min(kMaxColumns, n_valid - l0);
            combine2_tile(nhg, w, neg_b.data() + l0, neg_c.data() + l0,
                          Up + (b * L + l0) * D + t0, D, nb, -1, len);
            combine_tile(v, a.data() + l0, Vp + (b * L + l0) * D + t0, D, nb, -1, len);
          }
          for (int64_t i = 0; i < len; ++i) {
            scalar_t u = static_cast<scalar_t>(w[i] / den);
            if (!std::isfinite(static_cast<double>(u))) u = scalar_t(0);
            double upd = nhg[i] - vg * static_cast<double>(u);
            if (evict) upd += b_s * static_cast<double>(us[t0 + i]);
            if (take) bp[ot + i] = xp[ot + i];
            if (on) {
              us[t0 + i] = u;
              vs[t0 + i] = static_cast<scalar_t>(v[i]);
              // dx = the step as taken (x_new - x after rounding), the original's x_est - prev_x
              const scalar_t xo = xp[ot + i];
              const scalar_t xn = xo + static_cast<scalar_t>(upd);
              dp[ot + i] = xn - xo;
              xp[ot + i] = xn;
            } else {
              dp[ot + i] = scalar_t(0);
            }
          }
        }
      }
    });
  });
}

}  // namespace
}  // namespace broyden_cpu
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  m.impl("broyden_dots", &deq_fast::broyden_cpu::broyden_dots);
  m.impl("broyden_update", &deq_fast::broyden_cpu::broyden_update);
}
