// Backward linear solve of implicit differentiation: op schemas, CPU kernels and the C++
// iteration loop (exposed to Python through pybind11, see register_backward_bindings).
//
// Solves, per sample, g = grad + J^T g where J^T v is a vector-Jacobian product through the
// autograd graph of one tracked f(z*) (torch::autograd::grad, re-entrant: this runs inside an
// autograd.Function backward). The per-iteration state updates are registered ops in the
// deq_fast namespace (CPU kernels here, CUDA kernels in backward_cuda.cu) so that the loop runs on
// whichever device the state lives on; their per-sample math is in backward.h.
//
// Per iteration the loop dispatches one VJP and one or two ops; the host reads a device flag
// only every `check_every` iterations (and once per GMRES restart cycle).
#include "backward.h"
#include "cpu_stream.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

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

// ---- CPU kernels -----------------------------------------------------------------------------

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
      double work[kMaxHistory * kMaxHistory];
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
        anderson_alpha(static_cast<int>(n), gb, static_cast<int>(m), lam, static_cast<int>(slot),
                       work, alpha);
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

// ---- the iteration loop ----------------------------------------------------------------------

using TrackFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, const Tensor&, double);
using AddFn = void(const Tensor&, const Tensor&, const Tensor&);
using AndersonFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, int64_t, int64_t, double);
using BroydenFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, int64_t, int64_t);
using StartFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const Tensor&);
using ArnoldiFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double);
using UpdateFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct Loop {
  const Tensor& fz;
  const Tensor& z;
  Tensor active, best_x, best_rel, r;
  int64_t nvjp = 0, nsync = 0;

  // J^T v through the kept graph (re-entrant autograd; the caller released the GIL).
  Tensor vjp(const Tensor& v) {
    ++nvjp;
    const Tensor vv = v.scalar_type() == fz.scalar_type() ? v : v.to(fz.scalar_type());
    Tensor out = torch::autograd::grad({fz}, {z}, {vv}, /*retain_graph=*/true,
                                       /*create_graph=*/false, /*allow_unused=*/true)[0];
    if (!out.defined()) return at::zeros_like(v);  // fz does not depend on z
    if (out.scalar_type() != v.scalar_type()) out = out.to(v.scalar_type());
    return out.contiguous();
  }

  // The only host syncs of the loop.
  bool any_active() {
    ++nsync;
    return active.any().item<bool>();
  }
};

std::tuple<Tensor, Tensor, int64_t, int64_t> backward_solve(
    const Tensor& fz, const Tensor& z, const Tensor& grad, const Tensor& inv_gnorm,
    const Tensor& active0, const Tensor& x0, bool zero_init, const std::string& method,
    int64_t max_iter, double tol, int64_t m, double lam, int64_t restart, int64_t check_every) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "grad must be a contiguous [B, D] tensor");
  TORCH_CHECK(max_iter >= 1 && check_every >= 1, "max_iter and check_every must be >= 1");
  TORCH_CHECK(1 <= m && m <= kMaxHistory, "m must be in [1, ", kMaxHistory, "]");
  TORCH_CHECK(1 <= restart && restart <= kMaxHistory, "restart must be in [1, ", kMaxHistory, "]");
  static auto track = op<TrackFn>("deq_fast::bwd_track");
  static auto add = op<AddFn>("deq_fast::bwd_masked_add");
  static auto mix = op<AndersonFn>("deq_fast::bwd_anderson_mix");
  static auto broy = op<BroydenFn>("deq_fast::bwd_broyden_step");
  static auto gstart = op<StartFn>("deq_fast::bwd_gmres_start");
  static auto arnoldi = op<ArnoldiFn>("deq_fast::bwd_gmres_arnoldi");
  static auto gupdate = op<UpdateFn>("deq_fast::bwd_gmres_update");

  Loop L{fz, z};
  L.active = active0.clone();
  L.best_x = x0.clone();
  L.best_rel = at::full({grad.size(0)}, std::numeric_limits<double>::infinity(),
                        inv_gnorm.options());
  L.r = at::zeros_like(grad);
  Tensor x = x0.clone();
  bool free_eval = zero_init;  // T(0) = grad: the first evaluation needs no VJP
  Tensor start_rel;            // residual of the zero start (zero_init only)
  auto measure = [&]() {
    const bool zero_start = free_eval;
    Tensor jtx = free_eval ? at::zeros_like(x) : L.vjp(x);
    free_eval = false;
    track.call(x, jtx, grad, inv_gnorm, L.r, L.best_x, L.best_rel, L.active, tol);
    // The zero start is measured (its residual starts the iteration) but not returned as the
    // best iterate of a sample still iterating: on a diverging solve it would turn into a zero
    // gradient. Only a sample with no finite measured iterate after it (a budget of one GMRES
    // VJP, or every iterate non-finite) falls back to it, with its residual (see the end).
    if (zero_start) {
      start_rel = L.best_rel.clone();
      L.best_rel.masked_fill_(L.active, std::numeric_limits<double>::infinity());
    }
  };

  if (method == "fixed_point" || method == "anderson" || method == "broyden") {
    Tensor F, G, gram, r_prev, dx, U, V;
    const int64_t hist = method == "broyden" ? std::min(restart, max_iter) : m;
    if (method == "anderson") {
      // histories: every kernel reads only slots it has written (no zero fill of m B D elements)
      F = at::empty({m, grad.size(0), grad.size(1)}, grad.options());
      G = at::empty_like(F);
      gram = at::zeros({grad.size(0), m, m}, inv_gnorm.options());
    } else if (method == "broyden") {
      U = at::empty({hist, grad.size(0), grad.size(1)}, grad.options());
      V = at::empty_like(U);
      r_prev = at::zeros_like(grad);
      dx = at::zeros_like(grad);
    }
    for (int64_t k = 0;; ++k) {
      if (L.nvjp >= max_iter && !free_eval) break;
      measure();
      if (method == "fixed_point") {
        add.call(x, L.r, L.active);
      } else if (method == "anderson") {
        mix.call(x, L.r, F, G, gram, L.active, k % m, std::min(k + 1, m), lam);
      } else {
        const int64_t slot = k == 0 ? -1 : (k - 1) % hist;
        // memory full: restart (H = -I) by ignoring the columns from `slot` on
        broy.call(x, L.r, r_prev, dx, U, V, L.active, slot < 0 ? 0 : slot, slot);
      }
      // a warm start (init or SHINE factors) may be converged at once: look after its measurement
      const bool look = (k + 1) % check_every == 0 || (k == 0 && !zero_init);
      if (look && !L.any_active()) break;
    }
  } else if (method == "gmres") {
    const int64_t B = grad.size(0), D = grad.size(1);
    Tensor Q = at::empty({restart + 1, B, D}, grad.options());
    auto dopt = inv_gnorm.options();
    Tensor R = at::zeros({B, restart, restart + 1}, dopt);
    Tensor cs = at::zeros({B, restart}, dopt), sn = at::zeros({B, restart}, dopt);
    Tensor s = at::zeros({B, restart + 1}, dopt);
    Tensor kdim = at::zeros({B}, dopt.dtype(at::kLong));
    Tensor cyc = at::zeros({B}, dopt.dtype(at::kBool));
    while (true) {
      measure();  // true residual at x: starts (or restarts) a cycle
      // stop when converged, or when the budget leaves no Arnoldi step before the final measure
      if (L.nvjp >= max_iter - 1 || !L.any_active()) break;
      gstart.call(L.r, L.active, Q, s, kdim, cyc);
      for (int64_t j = 0; j < restart && L.nvjp < max_iter - 1; ++j) {
        // the last VJP of the budget is kept for measuring the final iterate
        Tensor jtq = L.vjp(Q[j]);
        arnoldi.call(jtq, Q, R, cs, sn, s, kdim, cyc, inv_gnorm, j, tol);
        if ((j + 1) % check_every == 0 && j + 1 < restart) {
          ++L.nsync;
          if (!cyc.any().item<bool>()) break;
        }
      }
      gupdate.call(x, Q, R, s, kdim);
    }
  } else {
    TORCH_CHECK(false, "unknown method '", method, "'");
  }
  if (start_rel.defined())  // no finite iterate after the zero start: best_x is still zero
    L.best_rel = at::where(at::isinf(L.best_rel), start_rel, L.best_rel);
  return {L.best_x, L.best_rel, L.nvjp, L.nsync};
}

}  // namespace
}  // namespace backward
}  // namespace deq_fast

TORCH_LIBRARY_FRAGMENT(deq_fast, m) {
  m.def("bwd_track(Tensor x, Tensor jtx, Tensor grad, Tensor inv_gnorm, Tensor(a!) r, "
        "Tensor(b!) best_x, Tensor(c!) best_rel, Tensor(d!) active, float tol) -> ()");
  m.def("bwd_masked_add(Tensor(a!) x, Tensor y, Tensor active) -> ()");
  m.def("bwd_anderson_mix(Tensor(a!) x, Tensor r, Tensor(b!) F, Tensor(c!) G, Tensor(d!) gram, "
        "Tensor active, int slot, int n, float lam) -> ()");
  m.def("bwd_broyden_step(Tensor(a!) x, Tensor r, Tensor(b!) r_prev, Tensor(c!) dx, Tensor(d!) U, "
        "Tensor(e!) V, Tensor active, int n, int slot) -> ()");
  m.def("bwd_gmres_start(Tensor r, Tensor active, Tensor(a!) Q, Tensor(b!) s, Tensor(c!) kdim, "
        "Tensor(d!) cycle_active) -> ()");
  m.def("bwd_gmres_arnoldi(Tensor jtq, Tensor(a!) Q, Tensor(b!) R, Tensor(c!) cs, Tensor(d!) sn, "
        "Tensor(e!) s, Tensor(f!) kdim, Tensor(g!) cycle_active, Tensor inv_gnorm, int j, "
        "float tol) -> ()");
  m.def("bwd_gmres_update(Tensor(a!) x, Tensor Q, Tensor R, Tensor s, Tensor kdim) -> ()");
}

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

int register_backward_bindings(PyObject* module) {
  namespace py = pybind11;
  try {
    auto m = py::reinterpret_borrow<py::module_>(module);
    m.def("backward_solve", &deq_fast::backward::backward_solve,
          py::call_guard<py::gil_scoped_release>(), py::arg("fz"), py::arg("z"), py::arg("grad"),
          py::arg("inv_gnorm"), py::arg("active"), py::arg("x0"), py::arg("zero_init"),
          py::arg("method"), py::arg("max_iter"), py::arg("tol"), py::arg("m"), py::arg("lam"),
          py::arg("restart"), py::arg("check_every"),
          "Backward linear solve g = grad + J^T g per sample (loop in C++, VJPs through autograd,\n"
          "GIL released). Returns (best_x [B, D], best_rel [B] float64, nvjp, nsync).");
  } catch (py::error_already_set& e) {
    e.restore();
    return -1;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return -1;
  }
  return 0;
}
