// CUDA kernels of the backward linear solve ops deq_fast::bwd_* (schemas: ops.cpp; CPU kernels:
// cpu/backward_ops.cpp; the loop that calls them: backward/loop.cpp).
//
// One thread block per sample (per-sample reductions over D are block reductions in double);
// thread 0 runs the per-sample small math of deq_fast/backward_math.h (the same functions as the CPU kernels).
// Every kernel reads and writes each [B, D] operand once per pass; bytes per call, with s the
// element size: track 5 B D s, anderson_mix (n + 4 + n) B D s, broyden_step about
// (4 n + 8) B D s, gmres_arnoldi (2 j + 5) B D s, gmres_update (k + 2) B D s.
#include "deq_fast/backward_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace deq_fast {
namespace backward {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

// Sum of v over the block (every thread gets the result). sh: at least kThreads / 32 + 1 doubles.
__device__ double block_sum(double v, double* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) t += sh[i];
    sh[32] = t;
  }
  __syncthreads();
  const double r = sh[32];
  __syncthreads();  // sh is reused by the next call
  return r;
}

template <typename scalar_t>
__device__ double block_dot(const scalar_t* a, const scalar_t* b, int64_t D, double* sh) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += (double)a[i] * (double)b[i];
  return block_sum(s, sh);
}

template <typename scalar_t>
__global__ void track_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ jtx,
                             const scalar_t* __restrict__ grad, const double* __restrict__ ign,
                             scalar_t* __restrict__ r, scalar_t* __restrict__ best_x,
                             double* __restrict__ best_rel, bool* __restrict__ active, int64_t D,
                             double tol) {
  __shared__ double sh[33];
  __shared__ bool improve;
  const int64_t b = blockIdx.x, o = b * D;
  if (!active[b]) return;  // uniform over the block
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const scalar_t v = grad[o + i] + jtx[o + i] - x[o + i];
    r[o + i] = v;
    ss += (double)v * (double)v;
  }
  ss = block_sum(ss, sh);
  if (threadIdx.x == 0) {
    const double rel = sqrt(ss) * ign[b];
    const TrackDecision d = track_decision(rel, best_rel[b], tol);
    improve = d.improve;
    if (d.improve) best_rel[b] = rel;
    if (d.converged) active[b] = false;
  }
  __syncthreads();
  if (improve)
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) best_x[o + i] = x[o + i];
}

template <typename scalar_t>
__global__ void masked_add_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  const bool* __restrict__ active, int64_t D) {
  const int64_t b = blockIdx.x, o = b * D;
  if (!active[b]) return;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) x[o + i] += y[o + i];
}

template <typename scalar_t>
__global__ void anderson_mix_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                    scalar_t* __restrict__ F, scalar_t* __restrict__ G,
                                    double* __restrict__ gram, const bool* __restrict__ active,
                                    int64_t B, int64_t D, int m, int slot, int n, double lam) {
  __shared__ double sh[33];
  __shared__ double work[kAndersonWork];  // 17 KB for m = 64 (was m^2 doubles, 32 KB)
  __shared__ double alpha[kMaxHistory];
  const int64_t b = blockIdx.x, o = b * D, hs = B * D;
  if (!active[b]) return;
  scalar_t* fs = F + slot * hs + o;
  scalar_t* gs = G + slot * hs + o;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    fs[i] = x[o + i] + r[o + i];
    gs[i] = r[o + i];
  }
  __syncthreads();
  double* gb = gram + b * m * m;
  for (int i = 0; i < n; ++i) {
    const double v = block_dot(G + i * hs + o, gs, D, sh);
    if (threadIdx.x == 0) {
      gb[slot * m + i] = v;
      gb[i * m + slot] = v;
    }
  }
  if (threadIdx.x == 0) anderson_lstsq_solve(gb, m, n, slot, lam, /*scaled=*/true, work, alpha);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    double acc = 0.0;
    for (int k = 0; k < n; ++k) acc += alpha[k] * (double)F[k * hs + o + i];
    x[o + i] = (scalar_t)acc;
  }
}

template <typename scalar_t>
__global__ void broyden_step_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                    scalar_t* __restrict__ pp, scalar_t* __restrict__ dp,
                                    scalar_t* __restrict__ U, scalar_t* __restrict__ V,
                                    const bool* __restrict__ active, int64_t B, int64_t D, int n,
                                    int slot, int n_after) {
  __shared__ double sh[33];
  __shared__ double cu[kMaxHistory], cv[kMaxHistory];
  __shared__ double den_s;
  const int64_t b = blockIdx.x, o = b * D, hs = B * D;
  if (!active[b]) return;
  if (slot >= 0) {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) pp[o + i] = r[o + i] - pp[o + i];
    __syncthreads();
    for (int l = 0; l < n; ++l) {
      const bool keep = l != slot;
      const double a = keep ? block_dot(dp + o, U + l * hs + o, D, sh) : 0.0;
      const double c = keep ? block_dot(V + l * hs + o, pp + o, D, sh) : 0.0;
      if (threadIdx.x == 0) {
        cu[l] = a;
        cv[l] = c;
      }
    }
    __syncthreads();
    scalar_t* us = U + slot * hs + o;
    scalar_t* vs = V + slot * hs + o;
    double den = 0.0;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      double v = -(double)dp[o + i];
      double h = -(double)pp[o + i];
      for (int l = 0; l < n; ++l) {
        if (l == slot) continue;
        v += cu[l] * (double)V[l * hs + o + i];
        h += cv[l] * (double)U[l * hs + o + i];
      }
      den += v * (double)pp[o + i];
      vs[i] = (scalar_t)v;
      us[i] = (scalar_t)((double)dp[o + i] - h);
    }
    den = block_sum(den, sh);
    if (threadIdx.x == 0) den_s = den;
    __syncthreads();
    const bool ok = broyden_denominator_ok(den_s);
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
      if (ok) {
        us[i] = (scalar_t)(us[i] / den_s);
      } else {
        us[i] = scalar_t(0);
        vs[i] = scalar_t(0);
      }
    }
    __syncthreads();
  }
  for (int l = 0; l < n_after; ++l) {
    const double c = block_dot(V + l * hs + o, r + o, D, sh);
    if (threadIdx.x == 0) cv[l] = c;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    double d = (double)r[o + i];
    for (int l = 0; l < n_after; ++l) d -= cv[l] * (double)U[l * hs + o + i];
    dp[o + i] = (scalar_t)d;
    x[o + i] += dp[o + i];
    pp[o + i] = r[o + i];
  }
}

template <typename scalar_t>
__global__ void gmres_start_kernel(const scalar_t* __restrict__ r, const bool* __restrict__ active,
                                   scalar_t* __restrict__ q0, double* __restrict__ s,
                                   int64_t* __restrict__ kdim, bool* __restrict__ cyc, int64_t D,
                                   int k1) {
  __shared__ double sh[33];
  const int64_t b = blockIdx.x, o = b * D;
  const bool act = active[b];
  const double beta = act ? sqrt(block_dot(r + o, r + o, D, sh)) : 0.0;
  const bool go = act && beta > 0.0 && is_finite(beta);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) q0[o + i] = go ? (scalar_t)(r[o + i] / beta) : scalar_t(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < k1; ++i) s[b * k1 + i] = 0.0;
    s[b * k1] = go ? beta : 0.0;
    kdim[b] = 0;
    cyc[b] = go;
  }
}

template <typename scalar_t>
__global__ void gmres_arnoldi_kernel(const scalar_t* __restrict__ jtq, scalar_t* __restrict__ Q,
                                     double* __restrict__ R, double* __restrict__ cs,
                                     double* __restrict__ sn, double* __restrict__ s,
                                     int64_t* __restrict__ kdim, bool* __restrict__ cyc,
                                     const double* __restrict__ ign, int64_t B, int64_t D, int k,
                                     int j, double tol) {
  __shared__ double sh[33];
  __shared__ bool breakdown_s;
  const int64_t b = blockIdx.x, o = b * D, hs = B * D;
  const int k1 = k + 1;
  scalar_t* w = Q + (j + 1) * hs + o;
  if (!cyc[b]) {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) w[i] = scalar_t(0);
    return;
  }
  const scalar_t* qj = Q + j * hs + o;
  double n0 = 0.0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    w[i] = qj[i] - jtq[o + i];
    n0 += (double)w[i] * (double)w[i];
  }
  n0 = sqrt(block_sum(n0, sh));
  double* h = R + (b * k + j) * k1;
  for (int c = 0; c <= j; ++c) {
    const scalar_t* qc = Q + c * hs + o;
    const double hc = block_dot(w, qc, D, sh);  // ends with a barrier: all reads of w are done
    if (threadIdx.x == 0) h[c] = hc;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) w[i] = (scalar_t)(w[i] - hc * qc[i]);
    __syncthreads();
  }
  const double hn = sqrt(block_dot(w, w, D, sh));
  if (threadIdx.x == 0) {
    const bool breakdown = !(hn > kBreakdown * n0);
    breakdown_s = breakdown;
    h[j + 1] = breakdown ? 0.0 : hn;
    const double est = givens_column(j, h, cs + b * k, sn + b * k, s + b * k1);
    kdim[b] = j + 1;
    if (breakdown || est * ign[b] <= tol) cyc[b] = false;
  }
  __syncthreads();
  const bool breakdown = breakdown_s;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) w[i] = breakdown ? scalar_t(0) : (scalar_t)(w[i] / hn);
}

template <typename scalar_t>
__global__ void gmres_update_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ Q,
                                    const double* __restrict__ R, const double* __restrict__ s,
                                    const int64_t* __restrict__ kdim, int64_t B, int64_t D, int k) {
  __shared__ double y[kMaxHistory];
  const int64_t b = blockIdx.x, o = b * D, hs = B * D;
  const int kb = (int)kdim[b];
  if (kb <= 0) return;
  if (threadIdx.x == 0) back_substitute(kb, R + b * k * (k + 1), k + 1, s + b * (k + 1), y);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    double acc = (double)x[o + i];
    for (int c = 0; c < kb; ++c) acc += y[c] * (double)Q[c * hs + o + i];
    x[o + i] = (scalar_t)acc;
  }
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

// Every operand on the device of `like` and contiguous (the kernels index raw pointers).
void check_operands(const Tensor& like, std::initializer_list<const Tensor*> operands) {
  for (const Tensor* t : operands)
    TORCH_CHECK(t->device() == like.device() && t->is_contiguous(),
                "every operand must be a contiguous tensor on ", like.device());
}

#define DEQ_FAST_LAUNCH_SETUP(t)                   \
  check_cuda(t, #t);                               \
  const c10::cuda::CUDAGuard guard(t.device());    \
  const int64_t B = t.size(0);                     \
  if (B == 0) return;                              \
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

void bwd_track_cuda(const Tensor& x, const Tensor& jtx, const Tensor& grad, const Tensor& inv_gnorm,
                    const Tensor& r, const Tensor& best_x, const Tensor& best_rel,
                    const Tensor& active, double tol) {
  DEQ_FAST_LAUNCH_SETUP(x);
  check_operands(x, {&jtx, &grad, &inv_gnorm, &r, &best_x, &best_rel, &active});
  const int64_t D = x.size(1);
  for (auto* t : {&jtx, &grad, &r, &best_x}) {
    check_cuda(*t, "state");
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), "state mismatch");
  }
  TORCH_CHECK(best_rel.scalar_type() == at::kDouble && inv_gnorm.scalar_type() == at::kDouble &&
              active.scalar_type() == at::kBool, "bad small-state dtypes");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_track_cuda", [&] {
    track_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), jtx.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        inv_gnorm.data_ptr<double>(), r.data_ptr<scalar_t>(), best_x.data_ptr<scalar_t>(),
        best_rel.data_ptr<double>(), active.data_ptr<bool>(), D, tol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_masked_add_cuda(const Tensor& x, const Tensor& y, const Tensor& active) {
  DEQ_FAST_LAUNCH_SETUP(x);
  check_operands(x, {&y, &active});
  check_cuda(y, "y");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_masked_add_cuda", [&] {
    masked_add_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), active.data_ptr<bool>(), x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_anderson_mix_cuda(const Tensor& x, const Tensor& r, const Tensor& F, const Tensor& G,
                           const Tensor& gram, const Tensor& active, int64_t slot, int64_t n,
                           double lam) {
  DEQ_FAST_LAUNCH_SETUP(x);
  check_operands(x, {&r, &F, &G, &gram, &active});
  const int64_t m = F.size(0);
  TORCH_CHECK(m <= kMaxHistory && 1 <= n && n <= m && 0 <= slot && slot < n, "bad slot/n");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_anderson_mix_cuda", [&] {
    anderson_mix_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(),
        G.data_ptr<scalar_t>(), gram.data_ptr<double>(), active.data_ptr<bool>(), B, x.size(1),
        (int)m, (int)slot, (int)n, lam);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_broyden_step_cuda(const Tensor& x, const Tensor& r, const Tensor& r_prev, const Tensor& dx,
                           const Tensor& U, const Tensor& V, const Tensor& active, int64_t n,
                           int64_t slot) {
  DEQ_FAST_LAUNCH_SETUP(x);
  check_operands(x, {&r, &r_prev, &dx, &U, &V, &active});
  const int64_t L = U.size(0);
  TORCH_CHECK(L <= kMaxHistory && 0 <= n && n <= L && -1 <= slot && slot < L &&
                  (slot < 0 || slot <= n), "bad n/slot");
  const int64_t n_after = slot >= 0 ? std::max(n, slot + 1) : n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_broyden_step_cuda", [&] {
    broyden_step_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), r_prev.data_ptr<scalar_t>(),
        dx.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(),
        active.data_ptr<bool>(), B, x.size(1), (int)n, (int)slot, (int)n_after);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_gmres_start_cuda(const Tensor& r, const Tensor& active, const Tensor& Q, const Tensor& s,
                          const Tensor& kdim, const Tensor& cycle_active) {
  DEQ_FAST_LAUNCH_SETUP(r);
  check_operands(r, {&active, &Q, &s, &kdim, &cycle_active});
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "bwd_gmres_start_cuda", [&] {
    gmres_start_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        r.data_ptr<scalar_t>(), active.data_ptr<bool>(), Q.data_ptr<scalar_t>(),
        s.data_ptr<double>(), kdim.data_ptr<int64_t>(), cycle_active.data_ptr<bool>(), r.size(1),
        (int)Q.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_gmres_arnoldi_cuda(const Tensor& jtq, const Tensor& Q, const Tensor& R, const Tensor& cs,
                            const Tensor& sn, const Tensor& s, const Tensor& kdim,
                            const Tensor& cycle_active, const Tensor& inv_gnorm, int64_t j,
                            double tol) {
  DEQ_FAST_LAUNCH_SETUP(jtq);
  check_operands(jtq, {&Q, &R, &cs, &sn, &s, &kdim, &cycle_active, &inv_gnorm});
  const int64_t k = Q.size(0) - 1;
  TORCH_CHECK(k <= kMaxHistory && 0 <= j && j < k, "j must be in [0, restart)");
  AT_DISPATCH_FLOATING_TYPES(jtq.scalar_type(), "bwd_gmres_arnoldi_cuda", [&] {
    gmres_arnoldi_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        jtq.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), R.data_ptr<double>(),
        cs.data_ptr<double>(), sn.data_ptr<double>(), s.data_ptr<double>(),
        kdim.data_ptr<int64_t>(), cycle_active.data_ptr<bool>(), inv_gnorm.data_ptr<double>(), B,
        jtq.size(1), (int)k, (int)j, tol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_gmres_update_cuda(const Tensor& x, const Tensor& Q, const Tensor& R, const Tensor& s,
                           const Tensor& kdim) {
  DEQ_FAST_LAUNCH_SETUP(x);
  check_operands(x, {&Q, &R, &s, &kdim});
  const int64_t k = Q.size(0) - 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bwd_gmres_update_cuda", [&] {
    gmres_update_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), R.data_ptr<double>(),
        s.data_ptr<double>(), kdim.data_ptr<int64_t>(), B, x.size(1), (int)k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
