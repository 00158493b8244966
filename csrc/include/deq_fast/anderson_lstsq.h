// The Anderson least-squares solve: the one C++ copy, used by the forward op
// deq_fast::anderson_lstsq (cpu/anderson_lstsq.cpp, cuda/anderson_lstsq.cu) and by the backward
// solve's Anderson update (cpu/backward_ops.cpp, cuda/backward_ops.cu). The Python oracle is
// anderson_lstsq_reference in deq_fast/ops/lstsq.py; the two agree on every case below.
//
// Per sample, in float64 whatever the storage dtype:
//   A     = gram[:n, :n]                    (symmetric PSD; only the lower triangle is read)
//   ridge = lam * (trace(A) / n if scaled else 1)
//   w     = (A + ridge I)^{-1} 1            (LDL^T without pivoting)
//   alpha = w / sum(w)
// Fallback: alpha = one-hot at `newest` (a plain fixed-point step from the newest entry) if a
// pivot is <= 0 or not finite, or w / sum(w) is not finite, or |sum(w)| < 1e-300.
//
// Degenerate Gram matrices (decided once, for the forward and the backward): an all-zero Gram
// matrix means every residual in the window is zero; the scaled ridge is then zero, the first
// pivot is 0 and the fallback gives the one-hot step. That is exact (any alpha mixes to the same
// point when every residual is zero) and it is what a plain fixed-point step does. The backward
// used to force ridge = 1e-300 there and returned uniform weights instead: same point in exact
// arithmetic, but a different answer from the same formula.
//
// This is the bordered system [[0, 1^T], [1, A + ridge I]] [nu; alpha] = [1; 0] of locuslab/deq and
// TorchDEQ with nu eliminated. The SPD form is preferred: it is half the size, needs no pivoting
// (A + ridge I is SPD whenever it is solvable by Cholesky at all), a failure shows up as a
// non-positive pivot that we catch per sample, and the LU of the indefinite bordered matrix is what
// raises "singular U" on CUDA (locuslab/deq #20). LDL^T rather than Cholesky: no square roots, the
// same pivots (D[j] = L_chol[j][j]^2), so the same failure test.
#pragma once

#include "deq_fast/host_device.h"

namespace deq_fast {

// Largest history size m of the forward op: its factor lives in a fixed-size per-thread array
// (136 + 16 doubles = 1216 bytes of registers/local memory per CUDA thread).
constexpr int kLstsqMaxM = 16;
constexpr double kLstsqSumTiny = 1e-300;

// Doubles of scratch anderson_lstsq_solve needs for n entries: the packed lower triangle of the
// factor plus the solution vector.
DEQ_FAST_HOST_DEVICE constexpr int anderson_lstsq_work_size(int n) { return n * (n + 1) / 2 + n; }

// Packed lower-triangular index (row i, column j <= i).
DEQ_FAST_HOST_DEVICE inline int lstsq_tri(int i, int j) { return i * (i + 1) / 2 + j; }

// Solves one sample. gram: row stride ld, entries [i * ld + j] for i, j < n (any floating type);
// work: anderson_lstsq_work_size(n) doubles; alpha: n outputs (entries n.. are not touched).
// Requires 1 <= n and 0 <= newest < n (checked by the callers). Returns true if the solve
// succeeded, false if the one-hot fallback was written.
template <typename gram_t, typename alpha_t>
DEQ_FAST_HOST_DEVICE inline bool anderson_lstsq_solve(const gram_t* gram, int ld, int n, int newest,
                                                      double lam, bool scaled, double* work,
                                                      alpha_t* alpha) {
  // f[tri(i, j)]: L[i][j] below the diagonal, the pivot D[j] on it; w: scratch, then the solution.
  double* f = work;
  double* w = work + n * (n + 1) / 2;
  double ridge = lam;
  if (scaled) {
    double trace = 0.0;
    for (int i = 0; i < n; ++i) trace += static_cast<double>(gram[i * ld + i]);
    ridge = lam * trace / n;
  }
  bool ok = true;
  // LDL^T, column by column: D[j] = A[j][j] + ridge - sum_k L[j][k]^2 D[k],
  // L[i][j] = (A[i][j] - sum_k L[i][k] L[j][k] D[k]) / D[j].
  for (int j = 0; ok && j < n; ++j) {
    // w[k] = L[j][k] * D[k] for k < j
    double d = static_cast<double>(gram[j * ld + j]) + ridge;
    for (int k = 0; k < j; ++k) {
      w[k] = f[lstsq_tri(j, k)] * f[lstsq_tri(k, k)];
      d -= f[lstsq_tri(j, k)] * w[k];
    }
    if (!(d > 0.0) || !is_finite(d)) {
      ok = false;
      break;
    }
    f[lstsq_tri(j, j)] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = static_cast<double>(gram[i * ld + j]);
      for (int k = 0; k < j; ++k) s -= f[lstsq_tri(i, k)] * w[k];
      f[lstsq_tri(i, j)] = s / d;
    }
  }
  double total = 0.0;
  if (ok) {
    // L y = 1 (forward), then L^T w = y / D (backward).
    for (int i = 0; i < n; ++i) {
      double y = 1.0;
      for (int k = 0; k < i; ++k) y -= f[lstsq_tri(i, k)] * w[k];
      w[i] = y;
    }
    for (int i = n - 1; i >= 0; --i) {
      double x = w[i] / f[lstsq_tri(i, i)];
      for (int k = i + 1; k < n; ++k) x -= f[lstsq_tri(k, i)] * w[k];
      w[i] = x;
      total += x;
    }
    ok = is_finite(total) && (total < 0.0 ? -total : total) >= kLstsqSumTiny;
    for (int i = 0; ok && i < n; ++i) ok = is_finite(w[i]);
  }
  for (int i = 0; i < n; ++i)
    alpha[i] = static_cast<alpha_t>(ok ? w[i] / total : (i == newest ? 1.0 : 0.0));
  return ok;
}

}  // namespace deq_fast
