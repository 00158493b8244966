// CPU kernels of the backward-solve ops deq_fast::bwd_* (schemas: ops.cpp; CUDA kernels:
// cuda/backward_ops.cu; the loop that calls them: backward/loop.cpp). Per sample, the small math
// is the HOST_DEVICE header deq_fast/backward_math.h shared with CUDA; the passes over D use the
// streaming helpers of deq_fast/cpu_stream.h. Small solves are in double whatever the state dtype.
#include "deq_fast/backward_math.h"
#include "deq_fast/cpu_stream.h"
#include "deq_fast/op_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace deq_fast {
namespace backward {

// ---- argument checks shared with the CUDA kernels (declared in deq_fast/op_checks.h) ----------
namespace {

using at::Tensor;

void check_primary(const Tensor& x, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, name, " must be a ", device_type, " tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D [B, D], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

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

void check_small(const Tensor& t, const char* name, at::ScalarType dtype, const Tensor& like) {
  const int64_t B = like.size(0);
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() >= 1 && t.size(0) == B &&
                  t.device() == like.device(),
              name, " must be a contiguous ", dtype, " tensor on ", like.device(),
              " with leading dimension ", B);
}

// GMRES small state: R [B, restart, restart + 1] and s [B, restart + 1] for Q [restart + 1, B, D].
void check_gmres_small(const Tensor& R, const Tensor& s, const Tensor& kdim, int64_t k,
                       const Tensor& like) {
  TORCH_CHECK(1 <= k && k <= kMaxHistory, "Q must hold restart + 1 vectors with restart in [1, ",
              kMaxHistory, "], got ", k + 1);
  check_small(R, "R", at::kDouble, like);
  TORCH_CHECK(R.dim() == 3 && R.size(1) == k && R.size(2) == k + 1, "R must be [B, restart, restart + 1]");
  check_small(s, "s", at::kDouble, like);
  TORCH_CHECK(s.dim() == 2 && s.size(1) == k + 1, "s must be [B, restart + 1]");
  check_small(kdim, "kdim", at::kLong, like);
}

}  // namespace

void check_track_args(const Tensor& x, const Tensor& jtx, const Tensor& grad,
                      const Tensor& inv_gnorm, const Tensor& r, const Tensor& best_x,
                      const Tensor& best_rel, const Tensor& active, c10::DeviceType device_type) {
  check_primary(x, "x", device_type);
  check_state(jtx, "jtx", x);
  check_state(grad, "grad", x);
  check_state(r, "r", x);
  check_state(best_x, "best_x", x);
  check_small(inv_gnorm, "inv_gnorm", at::kDouble, x);
  check_small(best_rel, "best_rel", at::kDouble, x);
  check_small(active, "active", at::kBool, x);
}

void check_masked_add_args(const Tensor& x, const Tensor& y, const Tensor& active,
                           c10::DeviceType device_type) {
  check_primary(x, "x", device_type);
  check_state(y, "y", x);
  check_small(active, "active", at::kBool, x);
}

void check_anderson_mix_args(const Tensor& x, const Tensor& r, const Tensor& F, const Tensor& G,
                             const Tensor& gram, const Tensor& active, int64_t slot, int64_t n,
                             c10::DeviceType device_type) {
  check_primary(x, "x", device_type);
  check_state(r, "r", x);
  check_history(F, "F", x);
  check_history(G, "G", x);
  const int64_t m = F.size(0);
  TORCH_CHECK(G.size(0) == m && 1 <= n && n <= m && 0 <= slot && slot < n, "bad slot/n: ", slot, "/", n);
  TORCH_CHECK(m <= kMaxHistory, "Anderson history longer than ", kMaxHistory);
  check_small(gram, "gram", at::kDouble, x);
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == m && gram.size(2) == m, "gram must be [B, m, m]");
  check_small(active, "active", at::kBool, x);
}

void check_broyden_step_args(const Tensor& x, const Tensor& r, const Tensor& r_prev,
                             const Tensor& dx, const Tensor& U, const Tensor& V,
                             const Tensor& active, int64_t n, int64_t slot,
                             c10::DeviceType device_type) {
  check_primary(x, "x", device_type);
  check_state(r, "r", x);
  check_state(r_prev, "r_prev", x);
  check_state(dx, "dx", x);
  check_history(U, "U", x);
  check_history(V, "V", x);
  const int64_t L = U.size(0);
  TORCH_CHECK(L <= kMaxHistory, "Broyden history longer than ", kMaxHistory);
  TORCH_CHECK(V.size(0) == L && 0 <= n && n <= L && -1 <= slot && slot < L &&
                  (slot < 0 || slot <= n),
              "bad n/slot: ", n, "/", slot);
  check_small(active, "active", at::kBool, x);
}

void check_gmres_start_args(const Tensor& r, const Tensor& active, const Tensor& Q, const Tensor& s,
                            const Tensor& kdim, const Tensor& cycle_active,
                            c10::DeviceType device_type) {
  check_primary(r, "r", device_type);
  check_history(Q, "Q", r);
  check_small(active, "active", at::kBool, r);
  check_small(s, "s", at::kDouble, r);
  TORCH_CHECK(s.dim() == 2 && s.size(1) == Q.size(0), "s must be [B, restart + 1]");
  check_small(kdim, "kdim", at::kLong, r);
  check_small(cycle_active, "cycle_active", at::kBool, r);
}

void check_gmres_arnoldi_args(const Tensor& jtq, const Tensor& Q, const Tensor& R, const Tensor& cs,
                              const Tensor& sn, const Tensor& s, const Tensor& kdim,
                              const Tensor& cycle_active, const Tensor& inv_gnorm, int64_t j,
                              c10::DeviceType device_type) {
  check_primary(jtq, "jtq", device_type);
  check_history(Q, "Q", jtq);
  const int64_t k = Q.size(0) - 1;
  check_gmres_small(R, s, kdim, k, jtq);
  TORCH_CHECK(0 <= j && j < k, "j must be in [0, restart), got ", j);
  check_small(cs, "cs", at::kDouble, jtq);
  check_small(sn, "sn", at::kDouble, jtq);
  TORCH_CHECK(cs.dim() == 2 && cs.size(1) == k && sn.dim() == 2 && sn.size(1) == k,
              "cs and sn must be [B, restart]");
  check_small(cycle_active, "cycle_active", at::kBool, jtq);
  check_small(inv_gnorm, "inv_gnorm", at::kDouble, jtq);
}

void check_gmres_update_args(const Tensor& x, const Tensor& Q, const Tensor& R, const Tensor& s,
                             const Tensor& kdim, c10::DeviceType device_type) {
  check_primary(x, "x", device_type);
  check_history(Q, "Q", x);
  check_gmres_small(R, s, kdim, Q.size(0) - 1, x);
}

namespace {

using namespace deq_fast::cpu_stream;
static_assert(kMaxColumns >= kMaxHistory, "history combinations must take every history");

// Samples per parallel chunk: split the batch across threads only when a chunk holds enough work
// (~64K elements) to pay for the fork/join of the thread pool.
int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

// CGS2's first projection on one tile: acc = w - sum_c h_c q_c (neg_h = -h), in double.
template <typename scalar_t>
void cgs2_first_tile(double* acc, const scalar_t* w, const double* neg_h, const scalar_t* Q,
                     int64_t hs, int64_t nc, int64_t len) {
  for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<double>(w[i]);
  combine_tile(acc, neg_h, Q, hs, nc, -1, len);
}

// <acc, q> over one tile (acc in double, q in the state dtype).
template <typename scalar_t>
double dot_tile(const double* acc, const scalar_t* q, int64_t len) {
  double s = 0.0;
  for (int64_t i = 0; i < len; ++i) s += acc[i] * static_cast<double>(q[i]);
  return s;
}

void bwd_track_cpu(const Tensor& x, const Tensor& jtx, const Tensor& grad, const Tensor& inv_gnorm,
                   const Tensor& r, const Tensor& best_x, const Tensor& best_rel,
                   const Tensor& active, double tol) {
  check_track_args(x, jtx, grad, inv_gnorm, r, best_x, best_rel, active, c10::DeviceType::CPU);
  const int64_t B = x.size(0), D = x.size(1);
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
  check_masked_add_args(x, y, active, c10::DeviceType::CPU);
  const int64_t B = x.size(0), D = x.size(1);
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
  check_anderson_mix_args(x, r, F, G, gram, active, slot, n, c10::DeviceType::CPU);
  const int64_t B = x.size(0), D = x.size(1), m = F.size(0);
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
  check_broyden_step_args(x, r, r_prev, dx, U, V, active, n, slot, c10::DeviceType::CPU);
  const int64_t B = x.size(0), D = x.size(1);
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
  check_gmres_start_args(r, active, Q, s, kdim, cycle_active, c10::DeviceType::CPU);
  const int64_t B = r.size(0), D = r.size(1), k1 = Q.size(0);
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
  check_gmres_arnoldi_args(jtq, Q, R, cs, sn, s, kdim, cycle_active, inv_gnorm, j,
                           c10::DeviceType::CPU);
  const int64_t B = jtq.size(0), D = jtq.size(1), k1 = Q.size(0), k = k1 - 1;
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
        // w = A q_j = q_j - J^T q_j (state dtype, stored in q_{j+1}), then classical
        // Gram-Schmidt applied twice against q_0 .. q_j (backward_math.h, "the Arnoldi step")
        const scalar_t* qj = Qp + j * hs + o;
        double n0 = 0.0;
        for (int64_t i = 0; i < D; ++i) {
          w[i] = qj[i] - jp[o + i];
          n0 += static_cast<double>(w[i]) * static_cast<double>(w[i]);
        }
        n0 = std::sqrt(n0);
        double* h = Rp + (b * k + j) * k1;  // column j, rows 0 .. j + 1
        const int64_t nc = j + 1;
        double neg_h[kMaxHistory], h2[kMaxHistory], neg_h2[kMaxHistory];
        for (int64_t c = 0; c < nc; ++c) neg_h[c] = -dot(w, Qp + c * hs + o, D);
        std::fill(h2, h2 + nc, 0.0);
        double acc[kTile];
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {  // h2 = Q^T w1, w1 = w - Q h
          const int64_t len = std::min(kTile, D - t0);
          cgs2_first_tile(acc, w + t0, neg_h, Qp + o + t0, hs, nc, len);
          for (int64_t c = 0; c < nc; ++c) h2[c] += dot_tile(acc, Qp + c * hs + o + t0, len);
        }
        for (int64_t c = 0; c < nc; ++c) neg_h2[c] = -h2[c];
        double ss = 0.0;
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {  // w2 = w1 - Q h2, stored over w
          const int64_t len = std::min(kTile, D - t0);
          cgs2_first_tile(acc, w + t0, neg_h, Qp + o + t0, hs, nc, len);
          combine_tile(acc, neg_h2, Qp + o + t0, hs, nc, -1, len);
          for (int64_t i = 0; i < len; ++i) {
            w[t0 + i] = static_cast<scalar_t>(acc[i]);
            ss += static_cast<double>(w[t0 + i]) * static_cast<double>(w[t0 + i]);
          }
        }
        for (int64_t c = 0; c < nc; ++c) h[c] = -neg_h[c] + h2[c];
        const double hn = std::sqrt(ss);
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
  check_gmres_update_args(x, Q, R, s, kdim, c10::DeviceType::CPU);
  const int64_t B = x.size(0), D = x.size(1), k1 = Q.size(0), k = k1 - 1;
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

