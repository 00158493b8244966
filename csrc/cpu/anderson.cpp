// CPU kernels of the forward solver ops deq_fast::anderson_residual / anderson_mix: Anderson
// mixing's two passes (deq_fast/ops/anderson.py) as one sweep each per sample over the state and
// the history ring. The schemas are declared by the Python op table (deq_fast/ops/table.py),
// because the ops exist without this extension too; this file only registers their CPU kernels.
//
//   anderson_residual = anderson_residual_reference  (pass 1: F_s, G_s, Gram row, ||g||^2, ||fx||^2)
//   anderson_mix      = anderson_mix_reference       (pass 2: best, alpha, x = sum alpha_j F_j ...)
//
// Layout as in deq_fast/ops/anderson.py: x, fx, best [B, D]; F, G [B, m, D] (ring, slot s written
// by pass 1); gram [B, m, m] and sq [B, 2] in the accumulation dtype (float32 for float32 states,
// float64 for float64); improved [B] bool.
//
// Numerics. g = fx - x is formed in the state dtype (as torch.sub does) and stored; every dot
// product reads the stored values, accumulates products in double over 16 lanes per tile of 2048
// elements, then sums the tile partials in order (deterministic: fixed tiles, fixed lanes, no
// dependence on threads), and rounds once to the accumulation dtype. The reference's bmm
// accumulates in the accumulation dtype, so the two agree to its rounding (float32: ~1e-6 relative).
// alpha comes from the one C++ copy of the least-squares solve (include/deq_fast/anderson_lstsq.h,
// any m: scratch on the stack up to kLstsqMaxM, on the heap beyond), rounded to the accumulation
// dtype as the reference's alpha is; the mix accumulates in double and rounds once per element.
//
// Bytes per call (size = element size, beta = 1):
//   anderson_residual: read x, fx and the m - 1 other rows of G; write F_s, G_s  -> (m + 3) B D size
//   anderson_mix:      read n rows of F (and n of G when beta != 1); write x      -> (n + 1) B D size
//                      plus, for improved samples, the best copy (read + write one row).
// Unwritten ring slots are zero (the engine allocates the rings with zeros): pass 1 still reads
// them (its Gram row is defined over every slot), pass 2 mixes over the first n slots only (alpha
// is zero beyond n, so the reference's sum over all m slots is the same number).
//
// float32/float64 states; other dtypes are refused with an error (the torch path then calls the
// reference, see deq_fast/ops/table.py).
#include "deq_fast/anderson_lstsq.h"
#include "deq_fast/cpu_stream.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace deq_fast {
namespace anderson_cpu {
namespace {

using at::Tensor;
using namespace deq_fast::cpu_stream;

int64_t grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_state(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous CPU [B, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 for the C++ CPU kernel, got ", x.scalar_type(),
              " (the torch path runs the reference for other dtypes)");
}

void check_like(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              name, " must be a contiguous tensor shaped and typed like x");
}

void check_ring(const Tensor& F, const Tensor& G, const Tensor& gram, const Tensor& x) {
  const int64_t B = x.size(0), D = x.size(1);
  for (const Tensor* t : {&F, &G}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(2) == D && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "F and G must be contiguous [B, m, D] tensors of x's dtype");
  }
  const int64_t m = F.size(1);
  TORCH_CHECK(m >= 1 && G.size(1) == m, "F and G must have the same ring length m >= 1");
  TORCH_CHECK(gram.scalar_type() == acc_type(x) && gram.is_contiguous() && gram.dim() == 3 &&
                  gram.size(0) == B && gram.size(1) == m && gram.size(2) == m,
              "gram must be a contiguous [B, m, m] tensor of the accumulation dtype");
}

// ---- pass 1 helpers: the residual tile and the Gram row, vectorised (see cpu_stream.h) --------

// F_s = fx, G_s = g = fx - x (state dtype) over one tile; returns ||g||^2 and ||fx||^2 of it.
template <typename scalar_t>
__attribute__((always_inline)) inline void residual_tile_impl(const scalar_t* x, const scalar_t* fx,
                                                              scalar_t* Fs, scalar_t* Gs,
                                                              int64_t len, double* gg, double* ff) {
  constexpr int64_t kHalf = kLanes / 2;
  double sg[kHalf] = {}, sf[kHalf] = {};
  int64_t i = 0;
  for (; i + kHalf <= len; i += kHalf)
    for (int64_t j = 0; j < kHalf; ++j) {
      const scalar_t f = fx[i + j];
      const scalar_t g = f - x[i + j];
      Fs[i + j] = f;
      Gs[i + j] = g;
      sg[j] += static_cast<double>(g) * static_cast<double>(g);
      sf[j] += static_cast<double>(f) * static_cast<double>(f);
    }
  double tg = 0.0, tf = 0.0;
  for (; i < len; ++i) {
    const scalar_t f = fx[i];
    const scalar_t g = f - x[i];
    Fs[i] = f;
    Gs[i] = g;
    tg += static_cast<double>(g) * static_cast<double>(g);
    tf += static_cast<double>(f) * static_cast<double>(f);
  }
  for (int64_t j = 0; j < kHalf; ++j) {
    tg += sg[j];
    tf += sf[j];
  }
  *gg = tg;
  *ff = tf;
}

// out[k] = <hist_{cols[k]}, v> over one tile, four columns per sweep (v is loaded once per four
// columns and stays in L1).
template <typename scalar_t>
__attribute__((always_inline)) inline void dots4_impl(const scalar_t* h0, const scalar_t* h1,
                                                      const scalar_t* h2, const scalar_t* h3,
                                                      const scalar_t* v, int64_t len, double* out) {
  constexpr int64_t kQ = 4;   // lanes per column: 4 columns x 4 lanes = 16 double accumulators
  double s0[kQ] = {}, s1[kQ] = {}, s2[kQ] = {}, s3[kQ] = {};
  int64_t i = 0;
  for (; i + kQ <= len; i += kQ)
    for (int64_t j = 0; j < kQ; ++j) {
      const double vj = static_cast<double>(v[i + j]);
      s0[j] += static_cast<double>(h0[i + j]) * vj;
      s1[j] += static_cast<double>(h1[i + j]) * vj;
      s2[j] += static_cast<double>(h2[i + j]) * vj;
      s3[j] += static_cast<double>(h3[i + j]) * vj;
    }
  double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0;
  for (; i < len; ++i) {
    const double vi = static_cast<double>(v[i]);
    t0 += static_cast<double>(h0[i]) * vi;
    t1 += static_cast<double>(h1[i]) * vi;
    t2 += static_cast<double>(h2[i]) * vi;
    t3 += static_cast<double>(h3[i]) * vi;
  }
  for (int64_t j = 0; j < kQ; ++j) {
    t0 += s0[j];
    t1 += s1[j];
    t2 += s2[j];
    t3 += s3[j];
  }
  out[0] = t0;
  out[1] = t1;
  out[2] = t2;
  out[3] = t3;
}

#define DEQ_FAST_ANDERSON_STREAMING(T)                                                            \
  DEQ_FAST_CLONES void residual_tile(const T* x, const T* fx, T* Fs, T* Gs, int64_t len,         \
                                     double* gg, double* ff) {                                    \
    residual_tile_impl(x, fx, Fs, Gs, len, gg, ff);                                               \
  }                                                                                               \
  DEQ_FAST_CLONES void dots4(const T* h0, const T* h1, const T* h2, const T* h3, const T* v,     \
                             int64_t len, double* out) {                                          \
    dots4_impl(h0, h1, h2, h3, v, len, out);                                                      \
  }
DEQ_FAST_ANDERSON_STREAMING(float)
DEQ_FAST_ANDERSON_STREAMING(double)
#undef DEQ_FAST_ANDERSON_STREAMING

// Pass 1 (see deq_fast/ops/anderson.py): F[:, s] = fx; G[:, s] = g = fx - x;
// gram[:, s, j] = gram[:, j, s] = <G_j, g> for every j; sq = [||g||^2, ||fx||^2].
void anderson_residual(const Tensor& x, const Tensor& fx_in, const Tensor& F, const Tensor& G,
                       const Tensor& gram, const Tensor& sq, int64_t slot) {
  check_state(x, "anderson_residual");
  const Tensor fx = fx_in.contiguous();   // f may return any strides (the locuslab contract)
  check_like(fx, "fx", x);
  check_ring(F, G, gram, x);
  const int64_t B = x.size(0), D = x.size(1), m = F.size(1);
  TORCH_CHECK(0 <= slot && slot < m, "slot must be in [0, m), got ", slot);
  TORCH_CHECK(sq.scalar_type() == acc_type(x) && sq.dim() == 2 && sq.size(0) == B &&
                  sq.size(1) == 2,
              "sq must be a [B, 2] tensor of the accumulation dtype");
  const int64_t sq0 = sq.stride(0), sq1 = sq.stride(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anderson_residual_cpu", [&] {
    using acc_t = scalar_t;   // float -> float, double -> double (gram/sq dtype)
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = fx.const_data_ptr<scalar_t>();
    scalar_t* Fp = F.mutable_data_ptr<scalar_t>();
    scalar_t* Gp = G.mutable_data_ptr<scalar_t>();
    acc_t* gp = gram.mutable_data_ptr<acc_t>();
    acc_t* sp = sq.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      std::vector<double> row(m);
      std::vector<int64_t> others;
      others.reserve(m);
      for (int64_t j = 0; j < m; ++j)
        if (j != slot) others.push_back(j);
      const int64_t n_others = static_cast<int64_t>(others.size());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        const scalar_t* Gb = Gp + b * m * D;
        scalar_t* Fs = Fp + (b * m + slot) * D;
        scalar_t* Gs = Gp + (b * m + slot) * D;
        std::fill(row.begin(), row.end(), 0.0);
        double ff = 0.0;
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0);
          double gg_t = 0.0, ff_t = 0.0;
          residual_tile(xp + o + t0, fp + o + t0, Fs + t0, Gs + t0, len, &gg_t, &ff_t);
          row[slot] += gg_t;
          ff += ff_t;
          // the other slots against the tile of g just written (in L1)
          int64_t k = 0;
          double part[4];
          for (; k + 4 <= n_others; k += 4) {
            dots4(Gb + others[k] * D + t0, Gb + others[k + 1] * D + t0,
                  Gb + others[k + 2] * D + t0, Gb + others[k + 3] * D + t0, Gs + t0, len, part);
            for (int64_t q = 0; q < 4; ++q) row[others[k + q]] += part[q];
          }
          for (; k + 2 <= n_others; k += 2) {
            dot_pair(Gb + others[k] * D + t0, Gs + t0, Gb + others[k + 1] * D + t0, Gs + t0, len,
                     &part[0], &part[1]);
            row[others[k]] += part[0];
            row[others[k + 1]] += part[1];
          }
          if (k < n_others) row[others[k]] += dot(Gb + others[k] * D + t0, Gs + t0, len);
        }
        acc_t* gb = gp + b * m * m;
        for (int64_t j = 0; j < m; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          gb[slot * m + j] = v;
          gb[j * m + slot] = v;
        }
        sp[b * sq0] = static_cast<acc_t>(row[slot]);
        sp[b * sq0 + sq1] = static_cast<acc_t>(ff);
      }
    });
  });
}

// Pass 2 (see deq_fast/ops/anderson.py): best = (F_newest if keep_f else x) where improved; then,
// unless n == 0, alpha = anderson_lstsq(gram, n, newest, lam, scaled) and
// x = sum_{j < n} alpha_j F_j + (beta - 1) sum_{j < n} alpha_j G_j.
void anderson_mix(const Tensor& F, const Tensor& G, const Tensor& gram, const Tensor& x,
                  const Tensor& best, const Tensor& improved, int64_t n, int64_t newest,
                  double lam, bool scaled, double beta, bool keep_f) {
  check_state(x, "anderson_mix");
  check_like(best, "best", x);
  check_ring(F, G, gram, x);
  const int64_t B = x.size(0), D = x.size(1), m = F.size(1);
  TORCH_CHECK(improved.scalar_type() == at::kBool && improved.is_contiguous() &&
                  improved.numel() == B,
              "improved must be a contiguous [B] bool tensor");
  TORCH_CHECK(0 <= n && n <= m, "n must be in [0, m], got ", n);
  TORCH_CHECK(0 <= newest && newest < (n > 0 ? n : m),
              "newest must be in [0, n) (a slot of the ring when n = 0), got ", newest);
  TORCH_CHECK(std::isfinite(lam) && lam >= 0.0, "lam must be a finite float >= 0, got ", lam);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "anderson_mix_cpu", [&] {
    using acc_t = scalar_t;
    const scalar_t* Fp = F.const_data_ptr<scalar_t>();
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const acc_t* gp = gram.const_data_ptr<acc_t>();
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    scalar_t* bp = best.mutable_data_ptr<scalar_t>();
    const bool* imp = improved.const_data_ptr<bool>();
    const bool damped = beta != 1.0;
    at::parallel_for(0, B, grain(D), [&](int64_t b0, int64_t b1) {
      std::vector<double> work(anderson_lstsq_work_size(static_cast<int>(std::max<int64_t>(n, 1))));
      std::vector<acc_t> alpha(std::max<int64_t>(n, 1));
      std::vector<double> cf(std::max<int64_t>(n, 1)), cg(std::max<int64_t>(n, 1));
      double acc[kTile];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * D;
        const scalar_t* Fb = Fp + b * m * D;
        const scalar_t* Gb = Gp + b * m * D;
        if (imp[b]) {
          const scalar_t* src = keep_f ? Fb + newest * D : xp + o;
          std::copy(src, src + D, bp + o);
        }
        if (n == 0) continue;
        anderson_lstsq_solve(gp + b * m * m, static_cast<int>(m), static_cast<int>(n),
                             static_cast<int>(newest), lam, scaled, work.data(), alpha.data());
        for (int64_t j = 0; j < n; ++j) {
          cf[j] = static_cast<double>(alpha[j]);
          cg[j] = (beta - 1.0) * cf[j];
        }
        for (int64_t t0 = 0; t0 < D; t0 += kTile) {
          const int64_t len = std::min(kTile, D - t0);
          std::fill(acc, acc + len, 0.0);
          for (int64_t l0 = 0; l0 < n; l0 += kMaxColumns) {
            const int64_t nb = std::min(kMaxColumns, n - l0);
            combine_tile(acc, cf.data() + l0, Fb + l0 * D + t0, D, nb, -1, len);
            if (damped) combine_tile(acc, cg.data() + l0, Gb + l0 * D + t0, D, nb, -1, len);
          }
          scalar_t* xt = xp + o + t0;
          for (int64_t i = 0; i < len; ++i) xt[i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  });
}

}  // namespace
}  // namespace anderson_cpu
}  // namespace deq_fast

TORCH_LIBRARY_IMPL(deq_fast, CPU, m) {
  m.impl("anderson_residual", &deq_fast::anderson_cpu::anderson_residual);
  m.impl("anderson_mix", &deq_fast::anderson_cpu::anderson_mix);
}
