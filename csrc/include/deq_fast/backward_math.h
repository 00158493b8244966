// Backward linear solve of implicit differentiation: the math shared by CPU and CUDA.
//
// Problem, per sample b of a batch (state flattened to [B, D]):
//     g = grad + J^T g          (J = d f / d z at the fixed point)
// i.e. the linear system (I - J^T) g = grad, or the fixed point of T(g) = grad + J^T g with
// residual r(g) = T(g) - g = grad + J^T g - g. Convergence is per sample on
//     rel(g) = ||r(g)|| / ||grad||.
//
// This header is the one copy of the formulas that the CPU kernels (cpu/backward_ops.cpp) and the
// CUDA kernels (cuda/backward_ops.cu) share: everything per sample and O(m^2) or O(m^3) (small solves,
// Givens rotations, convergence decisions) and the per-element updates. Reductions over D are
// done by the callers (a sequential loop on CPU; on CUDA per-block partial sums over chunks of D
// added in a fixed order by a per-sample kernel) in double precision.
// Small solves are always in double, whatever the state dtype.
//
// Memory layout of the kernels (all contiguous):
//   state  x, r, grad, ...  [B, D]
//   histories F, G, U, V, Q [m, B, D]   (history slot first, so one slot is a contiguous [B, D]
//                                         tensor that can be fed to the VJP without a copy)
//   small per-sample state  [B, ...] float64; flags [B] bool; counters [B] int64.
#pragma once

#include <cmath>
#include <cstdint>

#include "deq_fast/anderson_lstsq.h"  // the Anderson update's small solve
#include "deq_fast/host_device.h"

namespace deq_fast {
namespace backward {

// Largest history handled by the per-sample small solves (Anderson m, GMRES restart, Broyden
// memory). Fixed so that the CUDA kernels can keep the small state in registers/shared memory.
constexpr int kMaxHistory = 64;

// A Krylov vector whose norm falls below this fraction of the starting residual norm signals a
// (lucky) breakdown: the solution lies in the current Krylov space.
constexpr double kBreakdown = 1e-14;

// ---- convergence bookkeeping (all methods) -------------------------------------------------
// Decision after measuring rel = ||r|| / ||grad|| at iterate x of an active sample:
//   improve:   x becomes the best iterate (strictly lower finite residual)
//   converged: the sample freezes (rel <= tol); a frozen sample keeps its value.
struct TrackDecision {
  bool improve;
  bool converged;
};

DEQ_FAST_HOST_DEVICE inline TrackDecision track_decision(double rel, double best_rel, double tol) {
  TrackDecision d;
  const bool finite = is_finite(rel);
  d.improve = finite && !(rel >= best_rel);  // best_rel starts at +inf (or NaN: never seen)
  d.converged = finite && rel <= tol;
  return d;
}

// ---- Anderson mixing on the linear map ------------------------------------------------------
// alpha = argmin || sum_i alpha_i G_i ||^2 + reg ||alpha||^2  s.t.  sum_i alpha_i = 1 over the last
// n residuals is anderson_lstsq_solve (anderson_lstsq.h) with the scaled ridge
// reg = lam * trace(Gram) / n: an absolute ridge swamps the Gram matrix once residuals are small
// and Anderson degrades to damped plain iteration (docs/contracts.md#torchdeq-solvers).
constexpr int kAndersonWork = anderson_lstsq_work_size(kMaxHistory);

// ---- GMRES: the Arnoldi step (CGS2) -----------------------------------------------------------
// w = A q_j = q_j - J^T q_j (state dtype) is orthogonalised against q_0 .. q_j by classical
// Gram-Schmidt applied twice ("CGS2"), every product and sum in double:
//     h = Q^T w;  w1 = w - Q h;  h2 = Q^T w1;  w2 = w1 - Q h2;  column j of H = h + h2,
// w2 rounded to the state dtype and stored as q_{j+1}, then h[j+1] = ||q_{j+1}|| and
// q_{j+1} /= h[j+1] (zero on a breakdown, kBreakdown). Each set of inner products is one pass over
// the basis (all j + 1 dots together), so the CUDA kernels read the basis three times per step
// where modified Gram-Schmidt reads it twice per column; CGS2 is also the more orthogonal of the
// two. The passes over D live in the callers (cpu/backward_ops.cpp, cuda/backward_ops.cu); the
// Python reference is deq_fast.ops.backward.cgs2_project.
//
// ---- GMRES: Givens rotations on the Hessenberg column -----------------------------------------
// Column j of the Hessenberg matrix, h[0..j+1] (h[j+1] = ||w|| after orthogonalisation), is
// rotated by the previous rotations (cs[i], sn[i]), i < j; then the rotation that zeroes h[j+1]
// is formed and applied to h and to the right-hand side s (s[j+1] = -sn s[j], s[j] = cs s[j]).
// Returns |s[j+1]|: the 2-norm of the residual of the least-squares solution after j+1 steps.
DEQ_FAST_HOST_DEVICE inline double givens_column(int j, double* h, double* cs, double* sn, double* s) {
  for (int i = 0; i < j; ++i) {
    const double t = cs[i] * h[i] + sn[i] * h[i + 1];
    h[i + 1] = -sn[i] * h[i] + cs[i] * h[i + 1];
    h[i] = t;
  }
  const double a = h[j], b = h[j + 1];
  double c = 1.0, sg = 0.0;
  if (b != 0.0) {
    const double rho = hypot(a, b);
    c = a / rho;
    sg = b / rho;
    h[j] = rho;
  }
  h[j + 1] = 0.0;
  cs[j] = c;
  sn[j] = sg;
  s[j + 1] = -sg * s[j];
  s[j] = c * s[j];
  return fabs(s[j + 1]);
}

// Back substitution R y = s for the k x k upper-triangular R stored column-major with column
// stride ld (R[i + ld * j] = row i, column j), the layout the Givens columns are written in.
// A zero (or non-finite) pivot truncates the solution at that column (y = 0 there), so a
// breakdown can never produce NaN.
DEQ_FAST_HOST_DEVICE inline void back_substitute(int k, const double* R, int ld, const double* s, double* y) {
  for (int i = k - 1; i >= 0; --i) {
    double t = s[i];
    for (int c = i + 1; c < k; ++c) t -= R[i + ld * c] * y[c];
    const double piv = R[i + ld * i];
    y[i] = (piv != 0.0 && is_finite(t / piv)) ? t / piv : 0.0;
  }
}

// ---- Broyden on the residual map ------------------------------------------------------------
// Inverse form (as the forward solver): H = -I + sum_l u_l v_l^T approximates (J^T - I)^{-1},
// the inverse Jacobian of r(g). With dx = x_k - x_{k-1} and dr = r_k - r_{k-1} the "good"
// Broyden update is
//     v^T = dx^T H = -dx^T + sum_l <dx, u_l> v_l^T
//     u   = (dx - H dr) / <v, dr>,   H dr = -dr + sum_l u_l <v_l, dr>
// and the next step is dx = -H r = r - sum_l u_l <v_l, r>. An update whose denominator is zero or
// non-finite is skipped (the new column is zero, i.e. inert).
DEQ_FAST_HOST_DEVICE inline bool broyden_denominator_ok(double den) { return is_finite(den) && den != 0.0; }

}  // namespace backward
}  // namespace deq_fast
