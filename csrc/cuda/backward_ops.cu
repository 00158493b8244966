// CUDA kernels of the backward linear solve ops deq_fast::bwd_* (schemas: ops.cpp; CPU kernels:
// cpu/backward_ops.cpp; argument checks shared with them: deq_fast/op_checks.h; the loop that
// calls them: backward/loop.cpp).
//
// Launch shape (benchmarks/gpu_model_backward.py models these kernels from the constants below; a
// test parses them from this file):
//   * every pass over D runs on a 1-D grid of samples x chunks of D x column groups, kThreads
//     threads per block. Chunks per sample are sized from B, D and the SM count so that the grid
//     fills the resident block slots of every SM once (at most kBlocksPerSm per SM, fewer when
//     the kernel's registers allow fewer), with at least kMinVecsPerThread vectors per thread and
//     at most kMaxChunks chunks;
//   * loads and stores are 16-byte vectors (float4 / double2) when the rows are 16-byte aligned
//     (D a multiple of the vector width and aligned base pointers), scalar otherwise; the thread
//     loop is unrolled twice (once in the dots kernels), single sums have one accumulator per
//     vector lane, history dots one per column; loops over a runtime number of columns four times (kColumnUnroll:
//     the loads of four columns are in flight together);
//   * a reduction over D is two-level and deterministic: each block writes the partial sums of its
//     chunk to a scratch buffer [B, chunks, values]; a finalise kernel (one block of
//     kFinaliseThreads threads per sample) adds them in chunk order and runs the per-sample small
//     math of deq_fast/backward_math.h on thread 0 (the same functions as the CPU kernels). No
//     floating-point atomics;
//   * inner products against history columns keep one double accumulator per column and thread;
//     a block takes at most kColsPerBlock columns (kBroydenColsPerBlock for Broyden's three dots
//     per column) and more columns take more blocks (the column groups of one chunk are adjacent
//     in the grid, so they run together and share the chunk's loads through L2).
// Passes per op (each reads or writes every [B, D] operand it names once; s = element size):
//   track         residual + ||r||^2 | decide | copy x to best_x if improved       5-7 B D s
//   masked_add    x += y                                                          3 B D s
//   anderson_mix  store F, G slot + <G_i, r> | lstsq | x = sum alpha_i F_i        (2 n + 4) B D s
//   broyden_step  <U_l, dx>, <V_l, r>, <V_l, dr> | V column | U column and step   (4 n + 11) B D s
//   gmres_start   ||r||^2 | beta | q_0 = r / beta                                 3 B D s
//   gmres_arnoldi CGS2: h = Q^T w | h2 = Q^T (w - Q h) | w - Q (h + h2), ||.||^2 | scale
//                                                                                 (3 j + 9) B D s
//   gmres_update  back substitution | x += Q y                                    (k_b + 2) B D s
#include "deq_fast/backward_math.h"
#include "deq_fast/op_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace deq_fast {
namespace backward {
namespace {

using at::Tensor;

constexpr int kThreads = 256;             // threads per block of every pass over D
constexpr int kBlocksPerSm = 8;           // resident blocks per SM the grid aims at (64 warps)
constexpr int kMinVecsPerThread = 4;      // vectors per thread and chunk, at least
constexpr int kMaxChunks = 4096;          // chunks per sample, at most
constexpr int kColsPerBlock = 12;         // history columns per block of a dots pass
constexpr int kBroydenColsPerBlock = 6;   // Broyden: three dots per column
constexpr int kFinaliseThreads = 64;      // threads per block of the per-sample finalise kernels
constexpr int kColumnUnroll = 4;          // the `#pragma unroll 4` of the column loops
constexpr int kDotsMinBlocks = 2;         // resident blocks per SM the dots kernels are compiled for
constexpr int kVecUnroll = 2;             // unrolling of the loops over a chunk's vectors
constexpr int kVecUnrollDots = 1;         // ... in the dots kernels
constexpr int kWarps = kThreads / 32;

// Per-sample coefficients between the passes of one op (float64 [B, kCoefStride]).
constexpr int kCoefStride = 3 * kMaxHistory + 4;

// ---- vectors of 16 bytes --------------------------------------------------------------------
template <typename T>
struct alignas(16) Vec {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

// The len (<= Vec::n) elements at p: one 16-byte load when vec (aligned rows) and the vector is
// whole, scalar loads otherwise; missing elements are zero.
template <typename T>
__device__ __forceinline__ Vec<T> vload(const T* p, int len, bool vec) {
  if (vec && len == Vec<T>::n) return *reinterpret_cast<const Vec<T>*>(p);
  Vec<T> r;
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i) r.v[i] = i < len ? p[i] : T(0);
  return r;
}

template <typename T>
__device__ __forceinline__ void vstore(T* p, const Vec<T>& a, int len, bool vec) {
  if (vec && len == Vec<T>::n) {
    *reinterpret_cast<Vec<T>*>(p) = a;
    return;
  }
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i)
    if (i < len) p[i] = a.v[i];
}

// The block's place in the grid: sample b, chunk of D [begin, end) in vectors, column group.
struct Tile {
  int64_t b, begin, end;
  int group;
};

struct Split {  // host side: the grid of one pass
  int chunks, groups;
  int64_t nvec;  // vectors per row
  bool vec;      // 16-byte vector loads are legal
};

__device__ __forceinline__ Tile tile_of(const Split& sp) {
  const int64_t id = blockIdx.x;
  Tile t;
  t.group = (int)(id % sp.groups);
  const int64_t bc = id / sp.groups;
  t.b = bc / sp.chunks;
  const int chunk = (int)(bc % sp.chunks);
  const int64_t per = (sp.nvec + sp.chunks - 1) / sp.chunks;
  t.begin = std::min<int64_t>(sp.nvec, chunk * per);
  t.end = std::min<int64_t>(sp.nvec, t.begin + per);
  return t;
}

// f(e, len) for every vector of the block's chunk: e = first element, len = elements (tail < n).
// Unrolled twice (kVecUnroll), or not at all for the dots kernels (kVecUnrollDots), whose
// unrolled column loops already keep kColsPerBlock loads in flight.
template <typename T, int Unroll = kVecUnroll, typename F>
__device__ __forceinline__ void for_each_vec(const Tile& t, int64_t D, F&& f) {
  constexpr int V = Vec<T>::n;
#pragma unroll Unroll
  for (int64_t i = t.begin + threadIdx.x; i < t.end; i += kThreads) {
    const int64_t e = i * V;
    f(e, (int)std::min<int64_t>(V, D - e));
  }
}

// acc[c] += <H[c0 + c], v> over one vector of elements at offset off, for this block's nc history
// columns (row stride hs); column `own` is taken from own_val, already in registers.
template <typename T, int NC>
__device__ __forceinline__ void dot_columns(double (&acc)[NC], const T* H, int64_t hs, int64_t off,
                                            int len, bool vec, int c0, int nc, int64_t own,
                                            const Vec<T>& own_val, const Vec<T>& v) {
#pragma unroll
  for (int c = 0; c < kColsPerBlock; ++c) {
    if (c >= nc) break;
    const Vec<T> h = c0 + c == own ? own_val : vload(H + (c0 + c) * hs + off, len, vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) acc[c] += (double)h.v[i] * (double)v.v[i];
  }
}

// Block sums of acc[0 .. nv) written to out[0 .. nv) (a fixed order: warp shuffles, then warps in
// order). Every thread of the block must call it.
template <int NV>
__device__ void write_block_sums(const double (&acc)[NV], int nv, double* out) {
  __shared__ double sh[kWarps][NV];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    double a = acc[v];
    for (int o = 16; o > 0; o >>= 1) a += __shfl_down_sync(0xffffffffu, a, o);
    if (lane == 0) sh[warp][v] = a;
  }
  __syncthreads();
  if (threadIdx.x < nv) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sh[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
}

// Sum of the per-lane partial sums of one thread (independent accumulators, one per vector
// lane, so that consecutive additions do not wait on each other).
template <int N>
__device__ __forceinline__ double lanes_sum(const double (&lanes)[N]) {
  double s = 0.0;
#pragma unroll
  for (int i = 0; i < N; ++i) s += lanes[i];
  return s;
}

// Finalise side: tot[v] = sum over the chunks of sample b (in chunk order) of value v, v < nv;
// part is [B, chunks, nv]. Ends with a barrier.
__device__ void sum_chunks(const double* part, int64_t b, int chunks, int nv, double* tot) {
  const double* p = part + b * chunks * nv;
  for (int v = threadIdx.x; v < nv; v += blockDim.x) {
    double s = 0.0;
    for (int c = 0; c < chunks; ++c) s += p[c * nv + v];
    tot[v] = s;
  }
  __syncthreads();
}

// ---- passes shared by several ops -------------------------------------------------------------
// ||src||^2 per sample (samples with go[b] false skip: their partials are never read).
template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const T* __restrict__ src,
                                                         const bool* __restrict__ go,
                                                         double* __restrict__ part, Split sp,
                                                         int64_t D) {
  const Tile t = tile_of(sp);
  if (!go[t.b]) return;
  const T* s = src + t.b * D;
  double lanes[Vec<T>::n] = {};
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    const Vec<T> a = vload(s + e, len, sp.vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) lanes[i] += (double)a.v[i] * (double)a.v[i];
  });
  const double acc[1] = {lanes_sum(lanes)};
  write_block_sums(acc, 1, part + blockIdx.x);
}

// dst = src / den[b] per sample, or zero where den[b] is not positive (GMRES: q = w / ||w||);
// src may be dst.
template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(const T* src, T* dst,
                                                         const double* __restrict__ den, Split sp,
                                                         int64_t D) {
  const Tile t = tile_of(sp);
  const double d = den[t.b];
  const T* s = src + t.b * D;
  T* o = dst + t.b * D;
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    Vec<T> a = vload(s + e, len, sp.vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) a.v[i] = d > 0.0 ? (T)((double)a.v[i] / d) : T(0);
    vstore(o + e, a, len, sp.vec);
  });
}

// x = (add_x ? x : 0) + sum_{c < ncols[b]} coef[b, c] hist[c] per sample (in double, columns in
// order); ncols[b] == 0 leaves sample b untouched. Anderson's mix and GMRES's update.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(T* __restrict__ x,
                                                           const T* __restrict__ hist,
                                                           const double* __restrict__ coef,
                                                           const int* __restrict__ ncols,
                                                           bool add_x, Split sp, int64_t B,
                                                           int64_t D) {
  __shared__ double c_s[kMaxHistory];
  const Tile t = tile_of(sp);
  const int nc = ncols[t.b];
  if (nc <= 0) return;
  for (int c = threadIdx.x; c < nc; c += kThreads) c_s[c] = coef[t.b * kCoefStride + c];
  __syncthreads();
  const int64_t o = t.b * D, hs = B * D;
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    double acc[Vec<T>::n];
    const Vec<T> x0 = vload(x + o + e, len, sp.vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) acc[i] = add_x ? (double)x0.v[i] : 0.0;
    #pragma unroll kColumnUnroll
    for (int c = 0; c < nc; ++c) {
      const Vec<T> q = vload(hist + c * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) acc[i] += c_s[c] * (double)q.v[i];
    }
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) out.v[i] = (T)acc[i];
    vstore(x + o + e, out, len, sp.vec);
  });
}

// ---- track ------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) track_residual_kernel(
    const T* __restrict__ x, const T* __restrict__ jtx, const T* __restrict__ grad,
    T* __restrict__ r, const bool* __restrict__ active, double* __restrict__ part, Split sp,
    int64_t D) {
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  const int64_t o = t.b * D;
  double lanes[Vec<T>::n] = {};
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    const Vec<T> a = vload(x + o + e, len, sp.vec), j = vload(jtx + o + e, len, sp.vec),
                 g = vload(grad + o + e, len, sp.vec);
    Vec<T> v;
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      v.v[i] = g.v[i] + j.v[i] - a.v[i];
      lanes[i] += (double)v.v[i] * (double)v.v[i];
    }
    vstore(r + o + e, v, len, sp.vec);
  });
  const double acc[1] = {lanes_sum(lanes)};
  write_block_sums(acc, 1, part + blockIdx.x);
}

// improve[b]: copy x to best_x (the copy pass reads it); best_rel, active updated.
__global__ void track_decide_kernel(const double* __restrict__ part, int chunks,
                                    const double* __restrict__ ign, double* __restrict__ best_rel,
                                    bool* __restrict__ active, bool* __restrict__ improve,
                                    double tol) {
  __shared__ double ss[1];
  const int64_t b = blockIdx.x;
  if (!active[b]) {
    if (threadIdx.x == 0) improve[b] = false;
    return;
  }
  sum_chunks(part, b, chunks, 1, ss);
  if (threadIdx.x == 0) {
    const double rel = sqrt(ss[0]) * ign[b];
    const TrackDecision d = track_decision(rel, best_rel[b], tol);
    improve[b] = d.improve;
    if (d.improve) best_rel[b] = rel;
    if (d.converged) active[b] = false;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) copy_if_kernel(const T* __restrict__ src,
                                                           T* __restrict__ dst,
                                                           const bool* __restrict__ go, Split sp,
                                                           int64_t D) {
  const Tile t = tile_of(sp);
  if (!go[t.b]) return;
  const int64_t o = t.b * D;
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    vstore(dst + o + e, vload(src + o + e, len, sp.vec), len, sp.vec);
  });
}

// ---- masked add -------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) masked_add_kernel(T* __restrict__ x,
                                                              const T* __restrict__ y,
                                                              const bool* __restrict__ active,
                                                              Split sp, int64_t D) {
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  const int64_t o = t.b * D;
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    Vec<T> a = vload(x + o + e, len, sp.vec);
    const Vec<T> c = vload(y + o + e, len, sp.vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) a.v[i] += c.v[i];
    vstore(x + o + e, a, len, sp.vec);
  });
}

// ---- Anderson ---------------------------------------------------------------------------------
// F[slot] = x + r, G[slot] = r (group 0), and <G_i, r> for the group's columns i < n (G[slot]
// read as r: it is being written). Partials [B, chunks, n].
template <typename T>
__global__ void __launch_bounds__(kThreads, kDotsMinBlocks) anderson_dots_kernel(
    const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ F, T* __restrict__ G,
    const bool* __restrict__ active, double* __restrict__ part, Split sp, int64_t B, int64_t D,
    int slot, int n) {
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  const int64_t o = t.b * D, hs = B * D;
  const int c0 = t.group * kColsPerBlock, nc = min(kColsPerBlock, n - c0);
  double acc[kColsPerBlock] = {};
  for_each_vec<T, kVecUnrollDots>(t, D, [&](int64_t e, int len) {
    const Vec<T> rv = vload(r + o + e, len, sp.vec);
    if (t.group == 0) {
      Vec<T> f = vload(x + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) f.v[i] += rv.v[i];
      vstore(F + slot * hs + o + e, f, len, sp.vec);
      vstore(G + slot * hs + o + e, rv, len, sp.vec);
    }
    dot_columns(acc, G, hs, o + e, len, sp.vec, c0, nc, slot, rv, rv);
  });
  write_block_sums(acc, nc, part + (blockIdx.x / sp.groups) * n + c0);
}

// Gram row `slot`, the mixing weights (anderson_lstsq_solve), ncols[b] = n (0: inactive).
__global__ void anderson_solve_kernel(const double* __restrict__ part, int chunks,
                                      double* __restrict__ gram, const bool* __restrict__ active,
                                      double* __restrict__ coef, int* __restrict__ ncols, int m,
                                      int slot, int n, double lam) {
  __shared__ double v[kMaxHistory];
  __shared__ double work[kAndersonWork];
  const int64_t b = blockIdx.x;
  if (!active[b]) {
    if (threadIdx.x == 0) ncols[b] = 0;
    return;
  }
  sum_chunks(part, b, chunks, n, v);
  if (threadIdx.x == 0) {
    double* gb = gram + b * m * m;
    for (int i = 0; i < n; ++i) {
      gb[slot * m + i] = v[i];
      gb[i * m + slot] = v[i];
    }
    anderson_lstsq_solve(gb, m, n, slot, lam, /*scaled=*/true, work, coef + b * kCoefStride);
    ncols[b] = n;
  }
}

// ---- Broyden (the three passes of cpu/backward_ops.cpp bwd_broyden_step_cpu) --------------------
// Partials [B, chunks, 3 n]: a_l = <U_l, dx>, bc_l = <V_l, r>, e_l = <V_l, r - r_prev> for the
// group's columns l < n, l != slot (a and e only when updating).
template <typename T>
__global__ void __launch_bounds__(kThreads, kDotsMinBlocks) broyden_dots_kernel(
    const T* __restrict__ r, const T* __restrict__ pp, const T* __restrict__ dp,
    const T* __restrict__ U, const T* __restrict__ V, const bool* __restrict__ active,
    double* __restrict__ part, Split sp, int64_t B, int64_t D, int n, int slot) {
  constexpr int NC = kBroydenColsPerBlock;
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  const int64_t o = t.b * D, hs = B * D;
  const bool update = slot >= 0;
  const int c0 = t.group * NC, nc = min(NC, n - c0);
  double acc[3 * NC] = {};  // a, bc, e of the group's columns
  for_each_vec<T, kVecUnrollDots>(t, D, [&](int64_t e, int len) {
    const Vec<T> rv = vload(r + o + e, len, sp.vec);
    Vec<T> pv, dv;
    if (update) {
      pv = vload(pp + o + e, len, sp.vec);
      dv = vload(dp + o + e, len, sp.vec);
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (c >= nc) break;
      if (c0 + c == slot) continue;
      const Vec<T> vl = vload(V + (c0 + c) * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) acc[NC + c] += (double)vl.v[i] * (double)rv.v[i];
      if (!update) continue;
      const Vec<T> ul = vload(U + (c0 + c) * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) {
        acc[c] += (double)ul.v[i] * (double)dv.v[i];
        acc[2 * NC + c] += (double)vl.v[i] * ((double)rv.v[i] - (double)pv.v[i]);
      }
    }
  });
  // values v of the group: a at v, bc at NC + v, e at 2 NC + v -> [a(n), bc(n), e(n)] per chunk
  __shared__ double sums[3 * NC];
  write_block_sums(acc, 3 * NC, sums);
  __syncthreads();
  double* out = part + (blockIdx.x / sp.groups) * 3 * n;
  if (threadIdx.x < 3 * nc) {
    const int which = threadIdx.x / nc, c = threadIdx.x % nc;
    out[which * n + c0 + c] = sums[which * NC + c];
  }
}

// coef [a(kMaxHistory), bc(kMaxHistory), e(kMaxHistory)] from the partials (slot column: zero).
__global__ void broyden_coef_kernel(const double* __restrict__ part, int chunks,
                                    const bool* __restrict__ active, double* __restrict__ coef,
                                    int n, int slot) {
  __shared__ double tot[3 * kMaxHistory];
  const int64_t b = blockIdx.x;
  if (!active[b]) return;
  sum_chunks(part, b, chunks, 3 * n, tot);
  for (int v = threadIdx.x; v < 3 * n; v += blockDim.x) {
    const int which = v / n, l = v % n;
    coef[b * kCoefStride + which * kMaxHistory + l] = l == slot ? 0.0 : tot[v];
  }
}

// V[slot] = v = -dx + sum_l a_l V_l; partials [den = <v, dr>, vr = <v, r>].
template <typename T>
__global__ void __launch_bounds__(kThreads) broyden_v_kernel(
    const T* __restrict__ r, const T* __restrict__ pp, const T* __restrict__ dp,
    T* __restrict__ V, const bool* __restrict__ active, const double* __restrict__ coef,
    double* __restrict__ part, Split sp, int64_t B, int64_t D, int n, int slot) {
  __shared__ double a_s[kMaxHistory];
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  for (int l = threadIdx.x; l < n; l += kThreads) a_s[l] = coef[t.b * kCoefStride + l];
  __syncthreads();
  const int64_t o = t.b * D, hs = B * D;
  double acc[2] = {0.0, 0.0};
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    const Vec<T> dv = vload(dp + o + e, len, sp.vec), rv = vload(r + o + e, len, sp.vec),
                 pv = vload(pp + o + e, len, sp.vec);
    double v[Vec<T>::n];
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) v[i] = -(double)dv.v[i];
    #pragma unroll kColumnUnroll
    for (int l = 0; l < n; ++l) {
      if (l == slot) continue;
      const Vec<T> vl = vload(V + l * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) v[i] += a_s[l] * (double)vl.v[i];
    }
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      const double ri = (double)rv.v[i];
      acc[0] += v[i] * (ri - (double)pv.v[i]);
      acc[1] += v[i] * ri;
      out.v[i] = (T)v[i];
    }
    vstore(V + slot * hs + o + e, out, len, sp.vec);
  });
  write_block_sums(acc, 2, part + blockIdx.x * 2);
}

// coef[3 kMaxHistory + 0 / 1] = den / vr; [+ 2] = 1 when the update is kept (finite den != 0).
__global__ void broyden_den_kernel(const double* __restrict__ part, int chunks,
                                   const bool* __restrict__ active, double* __restrict__ coef) {
  __shared__ double tot[2];
  const int64_t b = blockIdx.x;
  if (!active[b]) return;
  sum_chunks(part, b, chunks, 2, tot);
  if (threadIdx.x == 0) {
    double* c = coef + b * kCoefStride + 3 * kMaxHistory;
    c[0] = tot[0];
    c[1] = tot[1];
    c[2] = broyden_denominator_ok(tot[0]) ? 1.0 : 0.0;
  }
}

// Hr = -r + sum bc_l U_l, Hdr = -dr + sum e_l U_l; U[slot] = (dx - Hdr) / den (or 0, and
// V[slot] = 0, when the update failed); dx = -Hr - vr u; x += dx; r_prev = r.
template <typename T>
__global__ void __launch_bounds__(kThreads) broyden_u_kernel(
    T* __restrict__ x, const T* __restrict__ r, T* __restrict__ pp, T* __restrict__ dp,
    T* __restrict__ U, T* __restrict__ V, const bool* __restrict__ active,
    const double* __restrict__ coef, Split sp, int64_t B, int64_t D, int n, int slot) {
  __shared__ double bc_s[kMaxHistory], e_s[kMaxHistory];
  const Tile t = tile_of(sp);
  if (!active[t.b]) return;
  const double* cb = coef + t.b * kCoefStride;
  for (int l = threadIdx.x; l < n; l += kThreads) {
    bc_s[l] = cb[kMaxHistory + l];
    e_s[l] = cb[2 * kMaxHistory + l];
  }
  __syncthreads();
  const bool update = slot >= 0;
  const double den = update ? cb[3 * kMaxHistory] : 0.0, vr = update ? cb[3 * kMaxHistory + 1] : 0.0;
  const bool ok = update && cb[3 * kMaxHistory + 2] != 0.0;
  const int64_t o = t.b * D, hs = B * D;
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    const Vec<T> rv = vload(r + o + e, len, sp.vec), pv = vload(pp + o + e, len, sp.vec);
    double hr[Vec<T>::n], hd[Vec<T>::n];
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      hr[i] = -(double)rv.v[i];
      hd[i] = (double)pv.v[i] - (double)rv.v[i];
    }
    #pragma unroll kColumnUnroll
    for (int l = 0; l < n; ++l) {
      if (l == slot) continue;
      const Vec<T> ul = vload(U + l * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) {
        hr[i] += bc_s[l] * (double)ul.v[i];
        if (update) hd[i] += e_s[l] * (double)ul.v[i];
      }
    }
    Vec<T> xv = vload(x + o + e, len, sp.vec), step, us;
    const Vec<T> dv = update ? vload(dp + o + e, len, sp.vec) : Vec<T>{};
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      double st = -hr[i];
      us.v[i] = ok ? (T)(((double)dv.v[i] - hd[i]) / den) : T(0);
      if (ok) st -= vr * (double)us.v[i];
      step.v[i] = (T)st;
      xv.v[i] += step.v[i];
    }
    if (update) {
      vstore(U + slot * hs + o + e, us, len, sp.vec);
      if (!ok) vstore(V + slot * hs + o + e, Vec<T>{}, len, sp.vec);
    }
    vstore(dp + o + e, step, len, sp.vec);
    vstore(x + o + e, xv, len, sp.vec);
    vstore(pp + o + e, rv, len, sp.vec);
  });
}

// ---- GMRES ------------------------------------------------------------------------------------
// beta = ||r|| (active samples), the right-hand side s, kdim = 0, cycle flags; den[b] = beta for
// the scale pass (0: write q_0 = 0).
__global__ void gmres_start_kernel(const double* __restrict__ part, int chunks,
                                   const bool* __restrict__ active, double* __restrict__ s,
                                   int64_t* __restrict__ kdim, bool* __restrict__ cyc,
                                   double* __restrict__ den, int k1) {
  __shared__ double ss[1];
  const int64_t b = blockIdx.x;
  const bool act = active[b];
  if (act) sum_chunks(part, b, chunks, 1, ss);
  if (threadIdx.x == 0) {
    const double beta = act ? sqrt(ss[0]) : 0.0;
    const bool go = act && beta > 0.0 && is_finite(beta);
    for (int i = 0; i < k1; ++i) s[b * k1 + i] = 0.0;
    s[b * k1] = go ? beta : 0.0;
    kdim[b] = 0;
    cyc[b] = go;
    den[b] = go ? beta : 0.0;
  }
}

// Arnoldi, CGS2 pass 1: w = q_j - J^T q_j (state dtype, never stored); partials [B, chunks, j + 2]
// of h_c = <w, q_c> (c <= j, the group's columns) and ||w||^2 (group 0, value j + 1).
template <typename T>
__global__ void __launch_bounds__(kThreads, kDotsMinBlocks) arnoldi_dots_kernel(
    const T* __restrict__ jtq, const T* __restrict__ Q, const bool* __restrict__ cyc,
    double* __restrict__ part, Split sp, int64_t B, int64_t D, int j) {
  const Tile t = tile_of(sp);
  if (!cyc[t.b]) return;
  const int64_t o = t.b * D, hs = B * D;
  const int nv = j + 2, c0 = t.group * kColsPerBlock, nc = min(kColsPerBlock, j + 1 - c0);
  double acc[kColsPerBlock + 1] = {};
  for_each_vec<T, kVecUnrollDots>(t, D, [&](int64_t e, int len) {
    const Vec<T> qj = vload(Q + j * hs + o + e, len, sp.vec), jv = vload(jtq + o + e, len, sp.vec);
    Vec<T> w;
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      w.v[i] = qj.v[i] - jv.v[i];
      acc[kColsPerBlock] += (double)w.v[i] * (double)w.v[i];
    }
    dot_columns(acc, Q, hs, o + e, len, sp.vec, c0, nc, j, qj, w);
  });
  __shared__ double sums[kColsPerBlock + 1];
  write_block_sums(acc, kColsPerBlock + 1, sums);
  __syncthreads();
  double* out = part + (blockIdx.x / sp.groups) * nv;
  if (threadIdx.x < nc) out[c0 + threadIdx.x] = sums[threadIdx.x];
  if (threadIdx.x == 0 && t.group == 0) out[j + 1] = sums[kColsPerBlock];
}

// coef[off + 0 .. nv) = the chunk sums (cycling samples).
__global__ void sum_partials_kernel(const double* __restrict__ part, int chunks,
                                    const bool* __restrict__ go, double* __restrict__ coef, int nv,
                                    int off) {
  const int64_t b = blockIdx.x;
  if (!go[b]) return;
  sum_chunks(part, b, chunks, nv, coef + b * kCoefStride + off);
}

// w1 = w - sum_{c <= j} h_c q_c in double, w = q_j - jtq (state dtype): CGS2's first projection,
// recomputed identically by passes 2 and 3.
template <typename T>
__device__ __forceinline__ void cgs2_first(const T* jtq, const T* Q, const double* h, int64_t o,
                                           int64_t hs, int64_t e, int len, bool vec, int j,
                                           double (&w1)[Vec<T>::n]) {
  const Vec<T> qj = vload(Q + j * hs + o + e, len, vec), jv = vload(jtq + o + e, len, vec);
#pragma unroll
  for (int i = 0; i < Vec<T>::n; ++i) w1[i] = (double)(T)(qj.v[i] - jv.v[i]);
  #pragma unroll kColumnUnroll
  for (int c = 0; c <= j; ++c) {
    const Vec<T> q = vload(Q + c * hs + o + e, len, vec);
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) w1[i] -= h[c] * (double)q.v[i];
  }
}

// CGS2 pass 2: partials [B, chunks, j + 1] of h2_c = <w1, q_c> (the group's columns).
template <typename T>
__global__ void __launch_bounds__(kThreads, kDotsMinBlocks) arnoldi_redots_kernel(
    const T* __restrict__ jtq, const T* __restrict__ Q, const bool* __restrict__ cyc,
    const double* __restrict__ coef, double* __restrict__ part, Split sp, int64_t B, int64_t D,
    int j) {
  __shared__ double h_s[kMaxHistory];
  const Tile t = tile_of(sp);
  if (!cyc[t.b]) return;
  for (int c = threadIdx.x; c <= j; c += kThreads) h_s[c] = coef[t.b * kCoefStride + c];
  __syncthreads();
  const int64_t o = t.b * D, hs = B * D;
  const int c0 = t.group * kColsPerBlock, nc = min(kColsPerBlock, j + 1 - c0);
  double acc[kColsPerBlock] = {};
  for_each_vec<T, kVecUnrollDots>(t, D, [&](int64_t e, int len) {
    double w1[Vec<T>::n];
    cgs2_first(jtq, Q, h_s, o, hs, e, len, sp.vec, j, w1);
#pragma unroll
    for (int c = 0; c < kColsPerBlock; ++c) {
      if (c >= nc) break;
      const Vec<T> q = vload(Q + (c0 + c) * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) acc[c] += w1[i] * (double)q.v[i];
    }
  });
  write_block_sums(acc, nc, part + (blockIdx.x / sp.groups) * (j + 1) + c0);
}

// CGS2 pass 3: q_{j+1} = w2 = w1 - sum h2_c q_c in the state dtype (normalised by the scale
// pass); partials of ||w2||^2 (of the stored values).
template <typename T>
__global__ void __launch_bounds__(kThreads) arnoldi_project_kernel(
    const T* __restrict__ jtq, T* __restrict__ Q, const bool* __restrict__ cyc,
    const double* __restrict__ coef, double* __restrict__ part, Split sp, int64_t B, int64_t D,
    int j) {
  __shared__ double h_s[kMaxHistory], h2_s[kMaxHistory];
  const Tile t = tile_of(sp);
  if (!cyc[t.b]) return;
  for (int c = threadIdx.x; c <= j; c += kThreads) {
    h_s[c] = coef[t.b * kCoefStride + c];
    h2_s[c] = coef[t.b * kCoefStride + kMaxHistory + c];
  }
  __syncthreads();
  const int64_t o = t.b * D, hs = B * D;
  double lanes[Vec<T>::n] = {};
  for_each_vec<T>(t, D, [&](int64_t e, int len) {
    double w[Vec<T>::n];
    cgs2_first(jtq, Q, h_s, o, hs, e, len, sp.vec, j, w);
    #pragma unroll kColumnUnroll
    for (int c = 0; c <= j; ++c) {
      const Vec<T> q = vload(Q + c * hs + o + e, len, sp.vec);
#pragma unroll
      for (int i = 0; i < Vec<T>::n; ++i) w[i] -= h2_s[c] * (double)q.v[i];
    }
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < Vec<T>::n; ++i) {
      out.v[i] = (T)w[i];
      lanes[i] += (double)out.v[i] * (double)out.v[i];  // zero beyond len
    }
    vstore(Q + (j + 1) * hs + o + e, out, len, sp.vec);
  });
  const double acc[1] = {lanes_sum(lanes)};
  write_block_sums(acc, 1, part + blockIdx.x);
}

// Hessenberg column j = h + h2 and ||w2||, breakdown, Givens rotation, convergence estimate;
// den[b] = ||w2|| for the scale pass (0: breakdown or not cycling, q_{j+1} = 0).
__global__ void arnoldi_finalise_kernel(const double* __restrict__ part, int chunks,
                                        const double* __restrict__ coef, double* __restrict__ R,
                                        double* __restrict__ cs, double* __restrict__ sn,
                                        double* __restrict__ s, int64_t* __restrict__ kdim,
                                        bool* __restrict__ cyc, const double* __restrict__ ign,
                                        double* __restrict__ den, int k, int j, double tol) {
  __shared__ double ss[1];
  const int64_t b = blockIdx.x;
  if (!cyc[b]) {
    if (threadIdx.x == 0) den[b] = 0.0;
    return;
  }
  sum_chunks(part, b, chunks, 1, ss);
  if (threadIdx.x == 0) {
    const int k1 = k + 1;
    const double* cb = coef + b * kCoefStride;
    const double n0 = sqrt(cb[j + 1]), hn = sqrt(ss[0]);
    double* h = R + (b * k + j) * k1;
    for (int c = 0; c <= j; ++c) h[c] = cb[c] + cb[kMaxHistory + c];
    const bool breakdown = !(hn > kBreakdown * n0);
    h[j + 1] = breakdown ? 0.0 : hn;
    const double est = givens_column(j, h, cs + b * k, sn + b * k, s + b * k1);
    kdim[b] = j + 1;
    if (breakdown || est * ign[b] <= tol) cyc[b] = false;
    den[b] = breakdown ? 0.0 : hn;
  }
}

// y = R^{-1} s over the sample's Krylov dimension (coef[0 .. kb)); ncols[b] = kb.
__global__ void gmres_backsub_kernel(const double* __restrict__ R, const double* __restrict__ s,
                                     const int64_t* __restrict__ kdim, double* __restrict__ coef,
                                     int* __restrict__ ncols, int k) {
  const int64_t b = blockIdx.x;
  if (threadIdx.x != 0) return;
  const int kb = (int)kdim[b];
  ncols[b] = std::max(kb, 0);
  if (kb > 0) back_substitute(kb, R + b * k * (k + 1), k + 1, s + b * (k + 1), coef + b * kCoefStride);
}

// ---- host side --------------------------------------------------------------------------------
int sm_count() {
  int device = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

template <typename K>
int resident_blocks(K kernel) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
  return std::max(1, std::min(n, kBlocksPerSm));
}

// The grid of one pass of `kernel` over [B, D] rows with `groups` column groups: chunks so that
// B x chunks x groups blocks fill the resident slots of every SM once (a single wave).
template <typename T, typename K>
Split split_for(K kernel, int64_t B, int64_t D, int groups, std::initializer_list<const void*> ptrs) {
  constexpr int V = Vec<T>::n;
  Split sp;
  sp.groups = groups;
  sp.nvec = (D + V - 1) / V;
  sp.vec = D % V == 0;
  for (const void* p : ptrs) sp.vec = sp.vec && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  const int64_t slots =
      (int64_t)sm_count() * resident_blocks(kernel);
  const int64_t fill = std::max<int64_t>(1, slots / (B * groups));
  const int64_t most = std::max<int64_t>(1, sp.nvec / ((int64_t)kThreads * kMinVecsPerThread));
  sp.chunks = (int)std::min<int64_t>({fill, most, kMaxChunks});
  return sp;
}

int64_t blocks(const Split& sp, int64_t B) { return B * sp.chunks * sp.groups; }
int groups_of(int64_t ncols, int per_block) { return (int)std::max<int64_t>(1, (ncols + per_block - 1) / per_block); }

Tensor scratch(const Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kDouble)); }

#define DEQ_FAST_LAUNCH_SETUP(t)                \
  const c10::cuda::CUDAGuard guard(t.device()); \
  const int64_t B = t.size(0), D = t.size(1);   \
  if (B == 0) return;                           \
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

#define DEQ_FAST_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

void bwd_track_cuda(const Tensor& x, const Tensor& jtx, const Tensor& grad, const Tensor& inv_gnorm,
                    const Tensor& r, const Tensor& best_x, const Tensor& best_rel,
                    const Tensor& active, double tol) {
  check_track_args(x, jtx, grad, inv_gnorm, r, best_x, best_rel, active, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_track_cuda", [&] {
    using T = scalar_t;
    const Split sp = split_for<T>(track_residual_kernel<T>, B, D, 1,
                                  {x.data_ptr(), jtx.data_ptr(), grad.data_ptr(), r.data_ptr(), best_x.data_ptr()});
    Tensor part = scratch(x, blocks(sp, B));
    Tensor improve = at::empty({B}, active.options());
    track_residual_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), jtx.data_ptr<T>(), grad.data_ptr<T>(), r.data_ptr<T>(),
        active.data_ptr<bool>(), part.data_ptr<double>(), sp, D);
    DEQ_FAST_CHECK_LAUNCH();
    track_decide_kernel<<<B, kFinaliseThreads, 0, stream>>>(
        part.data_ptr<double>(), sp.chunks, inv_gnorm.data_ptr<double>(), best_rel.data_ptr<double>(),
        active.data_ptr<bool>(), improve.data_ptr<bool>(), tol);
    DEQ_FAST_CHECK_LAUNCH();
    copy_if_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), best_x.data_ptr<T>(), improve.data_ptr<bool>(), sp, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_masked_add_cuda(const Tensor& x, const Tensor& y, const Tensor& active) {
  check_masked_add_args(x, y, active, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_masked_add_cuda", [&] {
    using T = scalar_t;
    const Split sp = split_for<T>(masked_add_kernel<T>, B, D, 1, {x.data_ptr(), y.data_ptr()});
    masked_add_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), y.data_ptr<T>(), active.data_ptr<bool>(), sp, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_anderson_mix_cuda(const Tensor& x, const Tensor& r, const Tensor& F, const Tensor& G,
                           const Tensor& gram, const Tensor& active, int64_t slot, int64_t n,
                           double lam) {
  check_anderson_mix_args(x, r, F, G, gram, active, slot, n, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(x);
  const int m = (int)F.size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_anderson_mix_cuda", [&] {
    using T = scalar_t;
    const std::initializer_list<const void*> ptrs = {x.data_ptr(), r.data_ptr(), F.data_ptr(), G.data_ptr()};
    const Split sd = split_for<T>(anderson_dots_kernel<T>, B, D, groups_of(n, kColsPerBlock), ptrs);
    const Split sc = split_for<T>(combine_kernel<T>, B, D, 1, ptrs);
    Tensor part = scratch(x, B * sd.chunks * n);
    Tensor coef = scratch(x, B * kCoefStride);
    Tensor ncols = at::empty({B}, x.options().dtype(at::kInt));
    anderson_dots_kernel<T><<<blocks(sd, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), r.data_ptr<T>(), F.data_ptr<T>(), G.data_ptr<T>(), active.data_ptr<bool>(),
        part.data_ptr<double>(), sd, B, D, (int)slot, (int)n);
    DEQ_FAST_CHECK_LAUNCH();
    anderson_solve_kernel<<<B, kFinaliseThreads, 0, stream>>>(
        part.data_ptr<double>(), sd.chunks, gram.data_ptr<double>(), active.data_ptr<bool>(),
        coef.data_ptr<double>(), ncols.data_ptr<int>(), m, (int)slot, (int)n, lam);
    DEQ_FAST_CHECK_LAUNCH();
    combine_kernel<T><<<blocks(sc, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), F.data_ptr<T>(), coef.data_ptr<double>(), ncols.data_ptr<int>(),
        /*add_x=*/false, sc, B, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_broyden_step_cuda(const Tensor& x, const Tensor& r, const Tensor& r_prev, const Tensor& dx,
                           const Tensor& U, const Tensor& V, const Tensor& active, int64_t n,
                           int64_t slot) {
  check_broyden_step_args(x, r, r_prev, dx, U, V, active, n, slot, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_broyden_step_cuda", [&] {
    using T = scalar_t;
    const std::initializer_list<const void*> ptrs = {x.data_ptr(), r.data_ptr(), r_prev.data_ptr(),
                                                     dx.data_ptr(), U.data_ptr(), V.data_ptr()};
    Tensor coef = scratch(x, B * kCoefStride);
    if (n > 0) {
      const Split sd = split_for<T>(broyden_dots_kernel<T>, B, D, groups_of(n, kBroydenColsPerBlock), ptrs);
      Tensor part = scratch(x, B * sd.chunks * 3 * n);
      broyden_dots_kernel<T><<<blocks(sd, B), kThreads, 0, stream>>>(
          r.data_ptr<T>(), r_prev.data_ptr<T>(), dx.data_ptr<T>(), U.data_ptr<T>(), V.data_ptr<T>(),
          active.data_ptr<bool>(), part.data_ptr<double>(), sd, B, D, (int)n, (int)slot);
      DEQ_FAST_CHECK_LAUNCH();
      broyden_coef_kernel<<<B, kFinaliseThreads, 0, stream>>>(
          part.data_ptr<double>(), sd.chunks, active.data_ptr<bool>(), coef.data_ptr<double>(),
          (int)n, (int)slot);
      DEQ_FAST_CHECK_LAUNCH();
    }
    if (slot >= 0) {
      const Split sv = split_for<T>(broyden_v_kernel<T>, B, D, 1, ptrs);
      Tensor part = scratch(x, blocks(sv, B) * 2);
      broyden_v_kernel<T><<<blocks(sv, B), kThreads, 0, stream>>>(
          r.data_ptr<T>(), r_prev.data_ptr<T>(), dx.data_ptr<T>(), V.data_ptr<T>(),
          active.data_ptr<bool>(), coef.data_ptr<double>(), part.data_ptr<double>(), sv, B, D,
          (int)n, (int)slot);
      DEQ_FAST_CHECK_LAUNCH();
      broyden_den_kernel<<<B, kFinaliseThreads, 0, stream>>>(
          part.data_ptr<double>(), sv.chunks, active.data_ptr<bool>(), coef.data_ptr<double>());
      DEQ_FAST_CHECK_LAUNCH();
    }
    const Split su = split_for<T>(broyden_u_kernel<T>, B, D, 1, ptrs);
    broyden_u_kernel<T><<<blocks(su, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), r.data_ptr<T>(), r_prev.data_ptr<T>(), dx.data_ptr<T>(), U.data_ptr<T>(),
        V.data_ptr<T>(), active.data_ptr<bool>(), coef.data_ptr<double>(), su, B, D, (int)n,
        (int)slot);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_gmres_start_cuda(const Tensor& r, const Tensor& active, const Tensor& Q, const Tensor& s,
                          const Tensor& kdim, const Tensor& cycle_active) {
  check_gmres_start_args(r, active, Q, s, kdim, cycle_active, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(r);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bwd_gmres_start_cuda", [&] {
    using T = scalar_t;
    const Split sp = split_for<T>(sumsq_kernel<T>, B, D, 1, {r.data_ptr(), Q.data_ptr()});
    Tensor part = scratch(r, blocks(sp, B));
    Tensor den = scratch(r, B);
    sumsq_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        r.data_ptr<T>(), active.data_ptr<bool>(), part.data_ptr<double>(), sp, D);
    DEQ_FAST_CHECK_LAUNCH();
    gmres_start_kernel<<<B, kFinaliseThreads, 0, stream>>>(
        part.data_ptr<double>(), sp.chunks, active.data_ptr<bool>(), s.data_ptr<double>(),
        kdim.data_ptr<int64_t>(), cycle_active.data_ptr<bool>(), den.data_ptr<double>(),
        (int)Q.size(0));
    DEQ_FAST_CHECK_LAUNCH();
    scale_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        r.data_ptr<T>(), Q.data_ptr<T>(), den.data_ptr<double>(), sp, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_gmres_arnoldi_cuda(const Tensor& jtq, const Tensor& Q, const Tensor& R, const Tensor& cs,
                            const Tensor& sn, const Tensor& s, const Tensor& kdim,
                            const Tensor& cycle_active, const Tensor& inv_gnorm, int64_t j,
                            double tol) {
  check_gmres_arnoldi_args(jtq, Q, R, cs, sn, s, kdim, cycle_active, inv_gnorm, j,
                           c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(jtq);
  const int k = (int)Q.size(0) - 1, jj = (int)j, groups = groups_of(j + 1, kColsPerBlock);
  AT_DISPATCH_FLOATING_TYPES(jtq.scalar_type(), "bwd_gmres_arnoldi_cuda", [&] {
    using T = scalar_t;
    const std::initializer_list<const void*> ptrs = {jtq.data_ptr(), Q.data_ptr()};
    const Split s1 = split_for<T>(arnoldi_dots_kernel<T>, B, D, groups, ptrs);
    const Split s2 = split_for<T>(arnoldi_redots_kernel<T>, B, D, groups, ptrs);
    const Split s3 = split_for<T>(arnoldi_project_kernel<T>, B, D, 1, ptrs);
    const Split s4 = split_for<T>(scale_kernel<T>, B, D, 1, ptrs);
    Tensor part = scratch(jtq, B * std::max<int64_t>({s1.chunks * (j + 2), s2.chunks * (j + 1), s3.chunks}));
    Tensor coef = scratch(jtq, B * kCoefStride);
    Tensor den = scratch(jtq, B);
    const T* jp = jtq.data_ptr<T>();
    T* Qp = Q.data_ptr<T>();
    const bool* cyc = cycle_active.data_ptr<bool>();
    double* pp = part.data_ptr<double>();
    double* cp = coef.data_ptr<double>();
    arnoldi_dots_kernel<T><<<blocks(s1, B), kThreads, 0, stream>>>(jp, Qp, cyc, pp, s1, B, D, jj);
    DEQ_FAST_CHECK_LAUNCH();
    // h at coef[0 .. j], ||w||^2 at coef[j + 1]; then h2 at coef[kMaxHistory ..]
    sum_partials_kernel<<<B, kFinaliseThreads, 0, stream>>>(pp, s1.chunks, cyc, cp, jj + 2, 0);
    DEQ_FAST_CHECK_LAUNCH();
    arnoldi_redots_kernel<T><<<blocks(s2, B), kThreads, 0, stream>>>(jp, Qp, cyc, cp, pp, s2, B, D, jj);
    DEQ_FAST_CHECK_LAUNCH();
    sum_partials_kernel<<<B, kFinaliseThreads, 0, stream>>>(pp, s2.chunks, cyc, cp, jj + 1, kMaxHistory);
    DEQ_FAST_CHECK_LAUNCH();
    arnoldi_project_kernel<T><<<blocks(s3, B), kThreads, 0, stream>>>(jp, Qp, cyc, cp, pp, s3, B, D, jj);
    DEQ_FAST_CHECK_LAUNCH();
    arnoldi_finalise_kernel<<<B, kFinaliseThreads, 0, stream>>>(
        pp, s3.chunks, cp, R.data_ptr<double>(), cs.data_ptr<double>(), sn.data_ptr<double>(),
        s.data_ptr<double>(), kdim.data_ptr<int64_t>(), cycle_active.data_ptr<bool>(),
        inv_gnorm.data_ptr<double>(), den.data_ptr<double>(), k, jj, tol);
    DEQ_FAST_CHECK_LAUNCH();
    T* q_next = Qp + (j + 1) * B * D;
    scale_kernel<T><<<blocks(s4, B), kThreads, 0, stream>>>(q_next, q_next, den.data_ptr<double>(), s4, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

void bwd_gmres_update_cuda(const Tensor& x, const Tensor& Q, const Tensor& R, const Tensor& s,
                           const Tensor& kdim) {
  check_gmres_update_args(x, Q, R, s, kdim, c10::DeviceType::CUDA);
  DEQ_FAST_LAUNCH_SETUP(x);
  const int k = (int)Q.size(0) - 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_gmres_update_cuda", [&] {
    using T = scalar_t;
    const Split sp = split_for<T>(combine_kernel<T>, B, D, 1, {x.data_ptr(), Q.data_ptr()});
    Tensor coef = scratch(x, B * kCoefStride);
    Tensor ncols = at::empty({B}, x.options().dtype(at::kInt));
    gmres_backsub_kernel<<<B, 32, 0, stream>>>(R.data_ptr<double>(), s.data_ptr<double>(),
                                               kdim.data_ptr<int64_t>(), coef.data_ptr<double>(),
                                               ncols.data_ptr<int>(), k);
    DEQ_FAST_CHECK_LAUNCH();
    combine_kernel<T><<<blocks(sp, B), kThreads, 0, stream>>>(
        x.data_ptr<T>(), Q.data_ptr<T>(), coef.data_ptr<double>(), ncols.data_ptr<int>(),
        /*add_x=*/true, sp, B, D);
    DEQ_FAST_CHECK_LAUNCH();
  });
}

}  // namespace
}  // namespace backward
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CUDA, m) {
  using namespace deq_fast::backward;
  m.impl("bwd_track", &bwd_track_cuda);
  m.impl("bwd_masked_add", &bwd_masked_add_cuda);
  m.impl("bwd_anderson_mix", &bwd_anderson_mix_cuda);
  m.impl("bwd_broyden_step", &bwd_broyden_step_cuda);
  m.impl("bwd_gmres_start", &bwd_gmres_start_cuda);
  m.impl("bwd_gmres_arnoldi", &bwd_gmres_arnoldi_cuda);
  m.impl("bwd_gmres_update", &bwd_gmres_update_cuda);
}
