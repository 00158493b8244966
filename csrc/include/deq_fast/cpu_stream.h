// Streaming helpers of the CPU kernels (cpu/backward_ops.cpp, cpu/broyden.cpp): dot products and
// linear combinations over history columns. These kernels are bound by memory traffic over the
// histories: the helpers read each column once per call, in tiles that keep the double
// accumulators in L1/L2, and are vectorised.
//
// Built twice where the toolchain can: for x86-64-v3 (AVX2/FMA) and for the baseline, picked at
// load time (GCC >= 12 function multi-versioning); elsewhere only the baseline version exists.
// Each translation unit that includes this header gets its own (internal) copies.
#pragma once

#include <cstdint>

namespace deq_fast {
namespace cpu_stream {
namespace {

// Longest history a combination takes (the per-sample coefficient arrays are this long).
constexpr int64_t kMaxColumns = 64;

#if defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define DEQ_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DEQ_FAST_CLONES
#endif

// Elements per tile of the history combinations: the double accumulators stay in L1/L2.
constexpr int64_t kTile = 2048;

// Dot products in double (products too: fp32 products of tiny or huge values would underflow or
// overflow), over 16 independent lanes so that the compiler can vectorise the loop (a strictly
// ordered sum cannot be).
constexpr int64_t kLanes = 16;

template <typename scalar_t>
__attribute__((always_inline)) inline double dot_impl(const scalar_t* a, const scalar_t* b,
                                                      int64_t D) {
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j)
      s[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
  double total = 0.0;
  for (; i < D; ++i) total += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  for (int64_t j = 0; j < kLanes; ++j) total += s[j];
  return total;
}

// <a, b> and <a, b - c> in one pass over a (the difference formed per element in double, so
// that a small b - c does not cancel).
template <typename scalar_t>
__attribute__((always_inline)) inline void dot2_impl(const scalar_t* a, const scalar_t* b,
                                                     const scalar_t* c, int64_t D, double* ab,
                                                     double* adiff) {
  constexpr int64_t kHalf = kLanes / 2;
  double sb[kHalf] = {}, sd[kHalf] = {};
  int64_t i = 0;
  for (; i + kHalf <= D; i += kHalf)
    for (int64_t j = 0; j < kHalf; ++j) {
      const double ai = static_cast<double>(a[i + j]), bi = static_cast<double>(b[i + j]);
      sb[j] += ai * bi;
      sd[j] += ai * (bi - static_cast<double>(c[i + j]));
    }
  double tb = 0.0, td = 0.0;
  for (; i < D; ++i) {
    const double ai = static_cast<double>(a[i]), bi = static_cast<double>(b[i]);
    tb += ai * bi;
    td += ai * (bi - static_cast<double>(c[i]));
  }
  for (int64_t j = 0; j < kHalf; ++j) {
    tb += sb[j];
    td += sd[j];
  }
  *ab = tb;
  *adiff = td;
}

// <a, b> and <c, d> in one pass (two independent streams: more memory-level parallelism).
template <typename scalar_t>
__attribute__((always_inline)) inline void dot_pair_impl(const scalar_t* a, const scalar_t* b,
                                                         const scalar_t* c, const scalar_t* d,
                                                         int64_t D, double* ab, double* cd) {
  constexpr int64_t kHalf = kLanes / 2;
  double s[kHalf] = {}, t[kHalf] = {};
  int64_t i = 0;
  for (; i + kHalf <= D; i += kHalf)
    for (int64_t j = 0; j < kHalf; ++j) {
      s[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
      t[j] += static_cast<double>(c[i + j]) * static_cast<double>(d[i + j]);
    }
  double sa = 0.0, sc = 0.0;
  for (; i < D; ++i) {
    sa += static_cast<double>(a[i]) * static_cast<double>(b[i]);
    sc += static_cast<double>(c[i]) * static_cast<double>(d[i]);
  }
  for (int64_t j = 0; j < kHalf; ++j) {
    sa += s[j];
    sc += t[j];
  }
  *ab = sa;
  *cd = sc;
}

// acc[0 .. len) += sum_{l < n, l != skip} c[l] * hist[l * hs + 0 .. len), in slot order per
// element. Four slots per sweep over the accumulators (one load/store of acc per four columns).
template <typename scalar_t>
__attribute__((always_inline)) inline void combine_impl(double* acc, const double* c, const scalar_t* hist, int64_t hs, int64_t n,
                         int64_t skip, int64_t len) {
  int64_t idx[kMaxColumns];
  int64_t k = 0;
  for (int64_t l = 0; l < n; ++l)
    if (l != skip) idx[k++] = l;
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const scalar_t* h0 = hist + idx[j] * hs;
    const scalar_t* h1 = hist + idx[j + 1] * hs;
    const scalar_t* h2 = hist + idx[j + 2] * hs;
    const scalar_t* h3 = hist + idx[j + 3] * hs;
    const double c0 = c[idx[j]], c1 = c[idx[j + 1]], c2 = c[idx[j + 2]], c3 = c[idx[j + 3]];
    for (int64_t i = 0; i < len; ++i)
      acc[i] = (((acc[i] + c0 * static_cast<double>(h0[i])) + c1 * static_cast<double>(h1[i])) +
                c2 * static_cast<double>(h2[i])) + c3 * static_cast<double>(h3[i]);
  }
  for (; j < k; ++j) {
    const scalar_t* hl = hist + idx[j] * hs;
    const double cl = c[idx[j]];
    for (int64_t i = 0; i < len; ++i) acc[i] += cl * static_cast<double>(hl[i]);
  }
}

// acc1 += sum c1[l] hist_l and acc2 += sum c2[l] hist_l over the same columns in one sweep.
template <typename scalar_t>
__attribute__((always_inline)) inline void combine2_impl(double* acc1, double* acc2,
                                                         const double* c1, const double* c2,
                                                         const scalar_t* hist, int64_t hs,
                                                         int64_t n, int64_t skip, int64_t len) {
  int64_t idx[kMaxColumns];
  int64_t k = 0;
  for (int64_t l = 0; l < n; ++l)
    if (l != skip) idx[k++] = l;
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
    const scalar_t* h0 = hist + idx[j] * hs;
    const scalar_t* h1 = hist + idx[j + 1] * hs;
    const double a0 = c1[idx[j]], a1 = c1[idx[j + 1]], b0 = c2[idx[j]], b1 = c2[idx[j + 1]];
    for (int64_t i = 0; i < len; ++i) {
      const double x0 = static_cast<double>(h0[i]), x1 = static_cast<double>(h1[i]);
      acc1[i] = (acc1[i] + a0 * x0) + a1 * x1;
      acc2[i] = (acc2[i] + b0 * x0) + b1 * x1;
    }
  }
  for (; j < k; ++j) {
    const scalar_t* hl = hist + idx[j] * hs;
    const double a = c1[idx[j]], b = c2[idx[j]];
    for (int64_t i = 0; i < len; ++i) {
      const double x = static_cast<double>(hl[i]);
      acc1[i] += a * x;
      acc2[i] += b * x;
    }
  }
}

#define DEQ_FAST_STREAMING(T)                                                                      \
  DEQ_FAST_CLONES double dot(const T* a, const T* b, int64_t D) { return dot_impl(a, b, D); }     \
  DEQ_FAST_CLONES void dot2(const T* a, const T* b, const T* c, int64_t D, double* ab,             \
                            double* adiff) {                                                       \
    dot2_impl(a, b, c, D, ab, adiff);                                                              \
  }                                                                                                \
  DEQ_FAST_CLONES void dot_pair(const T* a, const T* b, const T* c, const T* d, int64_t D,         \
                                double* ab, double* cd) {                                          \
    dot_pair_impl(a, b, c, d, D, ab, cd);                                                          \
  }                                                                                                \
  DEQ_FAST_CLONES void combine_tile(double* acc, const double* c, const T* hist, int64_t hs,       \
                                    int64_t n, int64_t skip, int64_t len) {                        \
    combine_impl(acc, c, hist, hs, n, skip, len);                                                  \
  }                                                                                                \
  DEQ_FAST_CLONES void combine2_tile(double* acc1, double* acc2, const double* c1,                 \
                                     const double* c2, const T* hist, int64_t hs, int64_t n,       \
                                     int64_t skip, int64_t len) {                                  \
    combine2_impl(acc1, acc2, c1, c2, hist, hs, n, skip, len);                                     \
  }
DEQ_FAST_STREAMING(float)
DEQ_FAST_STREAMING(double)
#undef DEQ_FAST_STREAMING

}  // namespace
}  // namespace cpu_stream
}  // namespace deq_fast
