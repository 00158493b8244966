// CPU kernels of the backward-solve ops deq_fast::bwd_* (schemas: ops.cpp; CUDA kernels:
// cuda/backward_ops.cu; the loop that calls them: backward/loop.cpp). Per sample, the small math
// is the HOST_DEVICE header deq_fast/backward_math.h shared with CUDA; the passes over D use the
// streaming helpers of deq_fast/cpu_stream.h. Small solves are in double whatever the state dtype.
#include "deq_fast/backward_math.h"
#include "deq_fast/cpu_stream.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace deq_fast {
namespace backward {
namespace {

using namespace deq_fast::cpu_stream;
static_assert(kMaxColumns >= kMaxHistory, "history combinations must take every history");

using at::Tensor;

void check_state(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [B, D], got ", t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
}

void check_history(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == like.size(0) && t.size(2) == like.size(1), name,
              " must have shape [m, B, D] with [B, D] = ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.is_contiguous() && t.device() == like.device(),
              name, " must be a contiguous ", like.scalar_type(), " tensor on ", like.device());
  TORCH_CHECK(t.size(0) <= kMaxHistory + 1, name, " history longer than ", kMaxHistory + 1);
}

void check_small(const Tensor& t, const char* name, at::ScalarType dtype, int64_t B) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.size(0) == B, name,
              " must be a contiguous ", dtype, " tensor with leading dimension ", B);
}

// Samples per parallel chunk: split the batch across threads only when a chunk holds enough work
// (~64K elements) to pay for the fork/join of the thread pool.
int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

void bwd_track_cpu(const Tensor& x, const Tensor& jtx, const Tensor& grad, const Tensor& inv_gnorm,
                   const Tensor& r, const Tensor& best_x, const Tensor& best_rel,
                   const Tensor& active, double tol) {
  for (auto* t : {&jtx, &grad, &r, &best_x}) check_state(*t, "state", x);
  const int64_t B = x.size(0), D = x.size(1);
  check_small(inv_gnorm, "inv_gnorm", at::kDouble, B);
  check_small(best_rel, "best_rel", at::kDouble, B);
  check_small(active, "active", at::kBool, B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_track", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* jp = jtx.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* bp = best_x.data_ptr<scalar_t>();
    const double* ign = inv_gnorm.data_ptr<double>();
    double* brel = best_rel.data_ptr<double>();
    bool* act = active.data_ptr<bool>();
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (!act[b]) continue;
        const int64_t o = b * D;
        double ss = 0.0;
        for (int64_t i = 0; i < D; ++i) {
          const scalar_t v = gp[o + i] + jp[o + i] - xp[o + i];
          rp[o + i] = v;
          ss += static_cast<double>(v) * static_cast<double>(v);
        }
        const double rel = std::sqrt(ss) * ign[b];
        const TrackDecision d = track_decision(rel, brel[b], tol);
        if (d.improve) {
          brel[b] = rel;
          std::copy(xp + o, xp + o + D, bp + o);
        }
        if (d.converged) act[b] = false;
      }
    });
  });
}

void bwd_masked_add_cpu(const Tensor& x, const Tensor& y, const Tensor& active) {
  check_state(y, "y", x);
  const int64_t B = x.size(0), D = x.size(1);
  check_small(active, "active", at::kBool, B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_masked_add", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const bool* act = active.data_ptr<bool>();
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (!act[b]) continue;
        for (int64_t i = b * D; i < (b + 1) * D; ++i) xp[i] += yp[i];
      }
    });
  });
}

void bwd_anderson_mix_cpu(const Tensor& x, const Tensor& r, const Tensor& F, const Tensor& G,
                          const Tensor& gram, const Tensor& active, int64_t slot, int64_t n,
                          double lam) {
  check_state(r, "r", x);
  check_history(F, "F", x);
  check_history(G, "G", x);
  const int64_t B = x.size(0), D = x.size(1), m = F.size(0);
  TORCH_CHECK(G.size(0) == m && 1 <= n && n <= m && 0 <= slot && slot < n, "bad slot/n: ", slot, "/", n);
  TORCH_CHECK(m <= kMaxHistory, "Anderson history longer than ", kMaxHistory);
  check_small(gram, "gram", at::kDouble, B);
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == m && gram.size(2) == m, "gram must be [B, m, m]");
  check_small(active, "active", at::kBool, B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_anderson_mix", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* Fp = F.data_ptr<scalar_t>();
    scalar_t* Gp = G.data_ptr<scalar_t>();
    double* gr = gram.data_ptr<double>();
    const bool* act = active.data_ptr<bool>();
    const int64_t hs = B * D;  // history slot stride
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      double work[kAndersonWork];
      double alpha[kMaxHistory];
      for (int64_t b = b0; b < b1; ++b) {
        if (!act[b]) continue;
        const int64_t o = b * D;
        scalar_t* fs = Fp + slot * hs + o;
        scalar_t* gs = Gp + slot * hs + o;
        for (int64_t i = 0; i < D; ++i) {
          fs[i] = xp[o + i] + rp[o + i];
          gs[i] = rp[o + i];
        }
        double* gb = gr + b * m * m;
        for (int64_t i = 0; i < n; ++i) {
          const double v = dot(Gp + i * hs + o, gs, D);
          gb[slot * m + i] = v;
          gb[i * m + slot] = v;
        }
        anderson_lstsq_solve(gb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(slot),
                             lam, /*scaled=*/true, work, alpha);
        double acc[kTile];
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0);
          std::fill(acc, acc + len, 0.0);
          combine_tile(acc, alpha, Fp + o + t0, hs, n, -1, len);
          for (int64_t i = 0; i < len; ++i) xp[o + t0 + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  });
}

void bwd_broyden_step_cpu(const Tensor& x, const Tensor& r, const Tensor& r_prev, const Tensor& dx,
                          const Tensor& U, const Tensor& V, const Tensor& active, int64_t n,
                          int64_t slot) {
  for (auto* t : {&r, &r_prev, &dx}) check_state(*t, "state", x);
  check_history(U, "U", x);
  check_history(V, "V", x);
  const int64_t B = x.size(0), D = x.size(1), L = U.size(0);
  TORCH_CHECK(L <= kMaxHistory, "Broyden history longer than ", kMaxHistory);
  TORCH_CHECK(V.size(0) == L && 0 <= n && n <= L && -1 <= slot && slot < L &&
                  (slot < 0 || slot <= n),
              "bad n/slot: ", n, "/", slot);
  check_small(active, "active", at::kBool, B);
  // Three passes over the kept columns (4n column reads; the CUDA kernel's direct form reads 6n):
  //   dots    a_l = <u_l, dx>, b_l = <v_l, r>, e_l = <v_l, dr>   (dr = r - r_prev; U, V once)
  //   V pass  v = -dx + sum a_l v_l  (= H^T dx), den = <v, dr>, vr = <v, r>
  //   U pass  Hr = -r + sum b_l u_l, Hdr = -dr + sum e_l u_l,
  //           u = (dx - Hdr) / den, dx' = -H' r = -Hr - vr u
  // (H excludes column `slot`, which the update overwrites; a failed denominator zeroes u and v.)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_broyden_step", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* pp = r_prev.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    scalar_t* Up = U.data_ptr<scalar_t>();
    scalar_t* Vp = V.data_ptr<scalar_t>();
    const bool* act = active.data_ptr<bool>();
    const int64_t hs = B * D;
    const bool update = slot >= 0;
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      double a[kMaxHistory], bc[kMaxHistory], e[kMaxHistory], hr[kTile], hd[kTile];
      for (int64_t b = b0; b < b1; ++b) {
        if (!act[b]) continue;
        const int64_t o = b * D;
        for (int64_t l = 0; l < n; ++l) {
          a[l] = bc[l] = e[l] = 0.0;
          if (l == slot) continue;
          if (update) {
            a[l] = dot(Up + l * hs + o, dp + o, D);
            dot2(Vp + l * hs + o, rp + o, pp + o, D, &bc[l], &e[l]);
          } else {
            bc[l] = dot(Vp + l * hs + o, rp + o, D);
          }
        }
        double den = 0.0, vr = 0.0;
        if (update) {
          scalar_t* vs = Vp + slot * hs + o;
          for (int64_t t0 = 0; t0 < D; t0 += kTile) {
            const int64_t len = std::min(kTile, D - t0), ot = o + t0;
            for (int64_t i = 0; i < len; ++i) hr[i] = -static_cast<double>(dp[ot + i]);
            combine_tile(hr, a, Vp + ot, hs, n, slot, len);
            for (int64_t i = 0; i < len; ++i) {
              const double ri = static_cast<double>(rp[ot + i]);
              den += hr[i] * (ri - static_cast<double>(pp[ot + i]));
              vr += hr[i] * ri;
              vs[t0 + i] = static_cast<scalar_t>(hr[i]);
            }
          }
        }
        const bool ok = update && broyden_denominator_ok(den);
        if (update && !ok) std::fill(Vp + slot * hs + o, Vp + slot * hs + o + D, scalar_t(0));
        scalar_t* us = update ? Up + slot * hs + o : nullptr;
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0), ot = o + t0;
          for (int64_t i = 0; i < len; ++i) {
            const double ri = static_cast<double>(rp[ot + i]);
            hr[i] = -ri;
            hd[i] = static_cast<double>(pp[ot + i]) - ri;
          }
          if (update) {
            combine2_tile(hr, hd, bc, e, Up + ot, hs, n, slot, len);
          } else {
            combine_tile(hr, bc, Up + ot, hs, n, slot, len);
          }
          for (int64_t i = 0; i < len; ++i) {
            double step = -hr[i];                                  // -H r
            if (update) {
              const double u = ok ? (static_cast<double>(dp[ot + i]) - hd[i]) / den : 0.0;
              us[t0 + i] = static_cast<scalar_t>(u);
              // a failed update adds nothing (vr may be non-finite with den)
              if (ok) step -= vr * static_cast<double>(us[t0 + i]);
            }
            dp[ot + i] = static_cast<scalar_t>(step);
            xp[ot + i] += dp[ot + i];
            pp[ot + i] = rp[ot + i];
          }
        }
      }
    });
  });
}

void bwd_gmres_start_cpu(const Tensor& r, const Tensor& active, const Tensor& Q, const Tensor& s,
                         const Tensor& kdim, const Tensor& cycle_active) {
  check_history(Q, "Q", r);
  const int64_t B = r.size(0), D = r.size(1), k1 = Q.size(0);
  TORCH_CHECK(r.is_contiguous(), "r must be contiguous");
  check_small(active, "active", at::kBool, B);
  check_small(s, "s", at::kDouble, B);
  TORCH_CHECK(s.dim() == 2 && s.size(1) == k1, "s must be [B, restart + 1]");
  check_small(kdim, "kdim", at::kLong, B);
  check_small(cycle_active, "cycle_active", at::kBool, B);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bwd_gmres_start", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* q0 = Q.data_ptr<scalar_t>();
    double* sp = s.data_ptr<double>();
    int64_t* kp = kdim.data_ptr<int64_t>();
    const bool* act = active.data_ptr<bool>();
    bool* cyc = cycle_active.data_ptr<bool>();
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        const double beta = act[b] ? std::sqrt(dot(rp + o, rp + o, D)) : 0.0;
        const bool go = act[b] && beta > 0.0 && is_finite(beta);
        for (int64_t i = 0; i < D; ++i) q0[o + i] = go ? static_cast<scalar_t>(rp[o + i] / beta) : scalar_t(0);
        for (int64_t i = 0; i < k1; ++i) sp[b * k1 + i] = 0.0;
        sp[b * k1] = go ? beta : 0.0;
        kp[b] = 0;
        cyc[b] = go;
      }
    });
  });
}

void bwd_gmres_arnoldi_cpu(const Tensor& jtq, const Tensor& Q, const Tensor& R, const Tensor& cs,
                           const Tensor& sn, const Tensor& s, const Tensor& kdim,
                           const Tensor& cycle_active, const Tensor& inv_gnorm, int64_t j,
                           double tol) {
  check_history(Q, "Q", jtq);
  TORCH_CHECK(jtq.is_contiguous(), "jtq must be contiguous");
  const int64_t B = jtq.size(0), D = jtq.size(1), k1 = Q.size(0), k = k1 - 1;
  TORCH_CHECK(0 <= j && j < k, "j must be in [0, restart), got ", j);
  check_small(R, "R", at::kDouble, B);
  TORCH_CHECK(R.dim() == 3 && R.size(1) == k && R.size(2) == k1, "R must be [B, restart, restart + 1]");
  check_small(cs, "cs", at::kDouble, B);
  check_small(sn, "sn", at::kDouble, B);
  check_small(s, "s", at::kDouble, B);
  check_small(kdim, "kdim", at::kLong, B);
  check_small(cycle_active, "cycle_active", at::kBool, B);
  check_small(inv_gnorm, "inv_gnorm", at::kDouble, B);
  AT_DISPATCH_FLOATING_TYPES(jtq.scalar_type(), "bwd_gmres_arnoldi", [&] {
    const scalar_t* jp = jtq.data_ptr<scalar_t>();
    scalar_t* Qp = Q.data_ptr<scalar_t>();
    double* Rp = R.data_ptr<double>();
    double* csp = cs.data_ptr<double>();
    double* snp = sn.data_ptr<double>();
    double* sp = s.data_ptr<double>();
    int64_t* kp = kdim.data_ptr<int64_t>();
    bool* cyc = cycle_active.data_ptr<bool>();
    const double* ign = inv_gnorm.data_ptr<double>();
    const int64_t hs = B * D;
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        scalar_t* w = Qp + (j + 1) * hs + o;
        if (!cyc[b]) {
          std::fill(w, w + D, scalar_t(0));
          continue;
        }
        // w = A q_j = q_j - J^T q_j, then modified Gram-Schmidt against q_0 .. q_j
        const scalar_t* qj = Qp + j * hs + o;
        double n0 = 0.0;
        for (int64_t i = 0; i < D; ++i) {
          w[i] = qj[i] - jp[o + i];
          n0 += static_cast<double>(w[i]) * static_cast<double>(w[i]);
        }
        n0 = std::sqrt(n0);
        double* h = Rp + (b * k + j) * k1;  // column j, rows 0 .. j + 1
        for (int64_t c = 0; c <= j; ++c) {
          const scalar_t* qc = Qp + c * hs + o;
          const double hc = dot(w, qc, D);
          h[c] = hc;
          for (int64_t i = 0; i < D; ++i) w[i] = static_cast<scalar_t>(w[i] - hc * qc[i]);
        }
        const double hn = std::sqrt(dot(w, w, D));
        const bool breakdown = !(hn > kBreakdown * n0);
        h[j + 1] = breakdown ? 0.0 : hn;
        for (int64_t i = 0; i < D; ++i) w[i] = breakdown ? scalar_t(0) : static_cast<scalar_t>(w[i] / hn);
        const double est = givens_column(static_cast<int>(j), h, csp + b * k, snp + b * k, sp + b * k1);
        kp[b] = j + 1;
        if (breakdown || est * ign[b] <= tol) cyc[b] = false;
      }
    });
  });
}

void bwd_gmres_update_cpu(const Tensor& x, const Tensor& Q, const Tensor& R, const Tensor& s,
                          const Tensor& kdim) {
  check_history(Q, "Q", x);
  const int64_t B = x.size(0), D = x.size(1), k1 = Q.size(0), k = k1 - 1;
  check_small(R, "R", at::kDouble, B);
  TORCH_CHECK(R.dim() == 3 && R.size(1) == k && R.size(2) == k1, "R must be [B, restart, restart + 1]");
  check_small(s, "s", at::kDouble, B);
  check_small(kdim, "kdim", at::kLong, B);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_gmres_update", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Qp = Q.data_ptr<scalar_t>();
    const double* Rp = R.data_ptr<double>();
    const double* sp = s.data_ptr<double>();
    const int64_t* kp = kdim.data_ptr<int64_t>();
    const int64_t hs = B * D;
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      double y[kMaxHistory];
      for (int64_t b = b0; b < b1; ++b) {
        const int kb = static_cast<int>(kp[b]);
        if (kb <= 0) continue;
        back_substitute(kb, Rp + b * k * k1, static_cast<int>(k1), sp + b * k1, y);
        const int64_t o = b * D;
        double acc[kTile];
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0);
          for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<double>(xp[o + t0 + i]);
          combine_tile(acc, y, Qp + o + t0, hs, kb, -1, len);
          for (int64_t i = 0; i < len; ++i) xp[o + t0 + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  });
}

}  // namespace
}  // namespace backward
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  using namespace deq_fast::backward;
  m.impl("bwd_track", &bwd_track_cpu);
  m.impl("bwd_masked_add", &bwd_masked_add_cpu);
  m.impl("bwd_anderson_mix", &bwd_anderson_mix_cpu);
  m.impl("bwd_broyden_step", &bwd_broyden_step_cpu);
  m.impl("bwd_gmres_start", &bwd_gmres_start_cpu);
  m.impl("bwd_gmres_arnoldi", &bwd_gmres_arnoldi_cpu);
  m.impl("bwd_gmres_update", &bwd_gmres_update_cpu);
}

