// deq_fast::anderson_lstsq -- the one copy of the math, shared by the CPU kernel (lstsq.cpp) and the
// CUDA kernel (lstsq_cuda.cu), pytorch/vision style. Depends on nothing but <cmath>, so a standalone
// translation unit can compile it with nvcc (tests/test_extension.py does).
//
// Per sample, in float64 whatever the storage dtype:
//   A     = gram[:n, :n]                    (symmetric PSD; only the lower triangle is read)
//   ridge = lam * (trace(A) / n if scaled else 1)
//   w     = (A + ridge I)^{-1} 1            (LDL^T without pivoting)
//   alpha = w / sum(w);  alpha[n:m] = 0
// Fallback: alpha = one-hot at `newest` if a pivot is <= 0 or not finite, or w / sum(w) is not
// finite, or |sum(w)| < 1e-300.
//
// This is the bordered system [[0, 1^T], [1, A + ridge I]] [nu; alpha] = [1; 0] of locuslab/deq and
// TorchDEQ with nu eliminated. The SPD form is preferred: it is half the size, needs no pivoting
// (A + ridge I is SPD whenever it is solvable by Cholesky at all), a failure shows up as a
// non-positive pivot that we catch per sample, and the LU of the indefinite bordered matrix is what
// raises "singular U" on CUDA (locuslab/deq #20).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DEQ_FAST_HOST_DEVICE __host__ __device__
#else
#define DEQ_FAST_HOST_DEVICE
#endif

namespace deq_fast {

// Largest history size m: the factor lives in a fixed-size per-thread array (packed lower
// triangle, 136 doubles = 1088 bytes of registers/local memory per CUDA thread).
constexpr int kLstsqMaxM = 16;
constexpr double kLstsqSumTiny = 1e-300;

DEQ_FAST_HOST_DEVICE inline bool lstsq_isfinite(double x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

DEQ_FAST_HOST_DEVICE inline double lstsq_abs(double x) { return x < 0.0 ? -x : x; }

// Packed lower-triangular index (row i, column j <= i).
DEQ_FAST_HOST_DEVICE inline int lstsq_tri(int i, int j) { return i * (i + 1) / 2 + j; }

// Solves one sample. gram: m*m row-major; alpha: m outputs. Requires 1 <= n <= m <= kLstsqMaxM and
// 0 <= newest < n (checked by the callers). Returns true if the solve succeeded, false if the
// one-hot fallback was written.
template <typename scalar_t>
DEQ_FAST_HOST_DEVICE inline bool anderson_lstsq_one(const scalar_t* gram, int m, int n, int newest,
                                                    double lam, bool scaled, scalar_t* alpha) {
  // f[tri(i, j)]: L[i][j] below the diagonal, the pivot D[j] on it.
  double f[kLstsqMaxM * (kLstsqMaxM + 1) / 2];
  double w[kLstsqMaxM];
  double ridge = lam;
  if (scaled) {
    double trace = 0.0;
    for (int i = 0; i < n; ++i) trace += static_cast<double>(gram[i * m + i]);
    ridge = lam * trace / n;
  }
  bool ok = true;
  // LDL^T, column by column: D[j] = A[j][j] + ridge - sum_k L[j][k]^2 D[k],
  // L[i][j] = (A[i][j] - sum_k L[i][k] L[j][k] D[k]) / D[j].
  for (int j = 0; ok && j < n; ++j) {
    // w[k] = L[j][k] * D[k] for k < j (scratch, reused below as the solution vector)
    double d = static_cast<double>(gram[j * m + j]) + ridge;
    for (int k = 0; k < j; ++k) {
      w[k] = f[lstsq_tri(j, k)] * f[lstsq_tri(k, k)];
      d -= f[lstsq_tri(j, k)] * w[k];
    }
    if (!(d > 0.0) || !lstsq_isfinite(d)) {
      ok = false;
      break;
    }
    f[lstsq_tri(j, j)] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = static_cast<double>(gram[i * m + j]);
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
    ok = lstsq_isfinite(total) && lstsq_abs(total) >= kLstsqSumTiny;
    for (int i = 0; ok && i < n; ++i) ok = lstsq_isfinite(w[i]);
  }
  for (int i = 0; i < m; ++i) {
    double a = 0.0;
    if (i < n) a = ok ? w[i] / total : (i == newest ? 1.0 : 0.0);
    alpha[i] = static_cast<scalar_t>(a);
  }
  return ok;
}

}  // namespace deq_fast
