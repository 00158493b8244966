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
// product reads the stored values. Products and partial sums run in the state dtype on 32-byte
// vectors over blocks of 64 elements (full-width arithmetic: the float -> double conversions of
// per-element double accumulation made these passes compute-bound at about half the bandwidth),
// each block's lane sums are widened to double and summed in double; the tile totals are summed
// in order (deterministic: fixed tiles, blocks and lanes, no dependence on threads), and rounded
// once to the accumulation dtype. The reference's bmm also multiplies and accumulates in the
// accumulation dtype, so the two agree to its rounding (float32: ~1e-6 relative).
// alpha comes from the one C++ copy of the least-squares solve (include/deq_fast/anderson_lstsq.h,
// any m: scratch on the stack up to kLstsqMaxM, on the heap beyond), rounded to the accumulation
// dtype as the reference's alpha is; the mix multiplies and sums in the state dtype in slot order
// per element, as the reference's bmm does (alpha cast to the state dtype).
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

// ---- streaming helpers, vectorised (see cpu_stream.h for the clones) -------------------------
//
// Blocked accumulation: within a block of kBlock elements, products and sums run in the state
// dtype on 32-byte vectors (GCC/Clang vector extensions: full-width arithmetic, no conversions;
// these passes were bound by float -> double conversions, not by memory). Each block's lane sums
// are then widened to double and added to double totals. For float32 a lane's block sum carries
// kBlock / 8 = 8 products, so its error is a few float32 roundings of the block's absolute sum;
// the totals over a row are double.
constexpr int64_t kBlock = 64;

// The vectors never cross a call: every helper below is inlined into the cloned entry points,
// so GCC's note that a 32/64-byte vector argument's ABI depends on -mavx does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define DEQ_FAST_INLINE __attribute__((always_inline)) inline

// 32-byte vectors of the state dtype (8 floats or 4 doubles) and their lanes widened to double.
// (GCC takes vector_size only on non-dependent types: one explicit definition per dtype.)
typedef float vec_f __attribute__((vector_size(32)));
typedef double wide_f __attribute__((vector_size(64)));
typedef double vec_d __attribute__((vector_size(32)));

template <typename T, typename Vec, typename Wide>
struct SimdOf {
  typedef Vec vec;
  typedef Wide wide;
  static constexpr int64_t kLen = sizeof(Vec) / sizeof(T);
  static DEQ_FAST_INLINE vec load(const T* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static DEQ_FAST_INLINE void store(T* p, vec v) { __builtin_memcpy(p, &v, sizeof v); }
  static DEQ_FAST_INLINE wide widen(vec v) { return __builtin_convertvector(v, wide); }
  static DEQ_FAST_INLINE double sum(wide w) {
    double t = 0.0;
    for (int64_t j = 0; j < kLen; ++j) t += w[j];
    return t;
  }
};
template <typename T>
struct Simd;
template <>
struct Simd<float> : SimdOf<float, vec_f, wide_f> {};
template <>
struct Simd<double> : SimdOf<double, vec_d, vec_d> {};

// One sweep over a tile of pass 1, for K history columns h[0..K) (0 <= K <= kMaxSweep):
//   kFresh: F_s = fx, G_s = g = fx - x (state dtype), *gg = ||g||^2, *ff = ||fx||^2 and
//           out[c] = <h[c], g>, all from the g just formed (in registers);
//   else:   out[c] = <h[c], G_s> (further columns against the tile of g already written, in L1).
template <int K, bool kFresh, typename scalar_t>
DEQ_FAST_INLINE void sweep_impl(const scalar_t* x, const scalar_t* fx,
                                scalar_t* Fs, scalar_t* Gs,
                                const scalar_t* const* h, int64_t len,
                                double* out, double* gg, double* ff) {
  using S = Simd<scalar_t>;
  constexpr int kCols = K > 0 ? K : 1;                 // (no zero-length arrays)
  const scalar_t* col[kCols] = {};
  for (int c = 0; c < K; ++c) col[c] = h[c];
  typename S::wide tot[kCols] = {}, tg = {}, tf = {};
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    typename S::vec s[kCols] = {}, sg = {}, sf = {};
    for (int64_t k = i; k < i + kBlock; k += S::kLen) {
      typename S::vec g;
      if constexpr (kFresh) {
        const typename S::vec f = S::load(fx + k);
        g = f - S::load(x + k);
        S::store(Fs + k, f);
        S::store(Gs + k, g);
        sg += g * g;
        sf += f * f;
      } else {
        g = S::load(Gs + k);
      }
      for (int c = 0; c < K; ++c) s[c] += S::load(col[c] + k) * g;
    }
    for (int c = 0; c < K; ++c) tot[c] += S::widen(s[c]);
    if constexpr (kFresh) {
      tg += S::widen(sg);
      tf += S::widen(sf);
    }
  }
  double rg = S::sum(tg), rf = S::sum(tf);
  double rc[kCols];
  for (int c = 0; c < K; ++c) rc[c] = S::sum(tot[c]);
  for (; i < len; ++i) {                               // the tail: per element, in double
    scalar_t g;
    if constexpr (kFresh) {
      const scalar_t f = fx[i];
      g = f - x[i];
      Fs[i] = f;
      Gs[i] = g;
      rg += static_cast<double>(g) * static_cast<double>(g);
      rf += static_cast<double>(f) * static_cast<double>(f);
    } else {
      g = Gs[i];
    }
    for (int c = 0; c < K; ++c) rc[c] += static_cast<double>(col[c][i]) * static_cast<double>(g);
  }
  for (int c = 0; c < K; ++c) out[c] = rc[c];
  if constexpr (kFresh) {
    *gg = rg;
    *ff = rf;
  }
}

// x[0 .. len) = sum_{j < n} cf[j] F_j + (damped: sum_{j < n} cg[j] G_j), F_j = F + j * D, in slot
// order per element, the sums in registers over kMixRun elements (one store per element).
template <typename scalar_t>
constexpr int64_t kMixRun = 4 * sizeof(scalar_t);    // 16 floats, 32 doubles (measured best)

template <typename scalar_t>
DEQ_FAST_INLINE void mix_row_impl(const scalar_t* cf, const scalar_t* cg,
                                  const scalar_t* F, const scalar_t* G,
                                  int64_t D, int64_t n, bool damped,
                                  scalar_t* x, int64_t len) {
  int64_t i = 0;
  for (; i + kMixRun<scalar_t> <= len; i += kMixRun<scalar_t>) {
    scalar_t a[kMixRun<scalar_t>] = {};
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t c = cf[j];
      const scalar_t* h = F + j * D + i;
      for (int64_t k = 0; k < kMixRun<scalar_t>; ++k) a[k] += c * h[k];
    }
    if (damped)
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t c = cg[j];
        const scalar_t* h = G + j * D + i;
        for (int64_t k = 0; k < kMixRun<scalar_t>; ++k) a[k] += c * h[k];
      }
    for (int64_t k = 0; k < kMixRun<scalar_t>; ++k) x[i + k] = a[k];
  }
  for (; i < len; ++i) {
    scalar_t a = 0;
    for (int64_t j = 0; j < n; ++j) a += cf[j] * F[j * D + i];
    if (damped)
      for (int64_t j = 0; j < n; ++j) a += cg[j] * G[j * D + i];
    x[i] = a;
  }
}

// sweep_impl with K = k chosen at run time (0 <= k <= 8).
template <bool kFresh, typename T>
DEQ_FAST_INLINE void sweep_k(int k, const T* x, const T* fx, T* Fs, T* Gs,
                             const T* const* h, int64_t len, double* out,
                             double* gg, double* ff) {
  switch (k) {
    case 8: sweep_impl<8, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 7: sweep_impl<7, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 6: sweep_impl<6, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 5: sweep_impl<5, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 4: sweep_impl<4, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 3: sweep_impl<3, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 2: sweep_impl<2, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    case 1: sweep_impl<1, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
    default: sweep_impl<0, kFresh>(x, fx, Fs, Gs, h, len, out, gg, ff); break;
  }
}

#define DEQ_FAST_ANDERSON_STREAMING(T)                                                            \
  DEQ_FAST_CLONES void sweep_fresh(int k, const T* x, const T* fx, T* Fs, T* Gs,                 \
                                   const T* const* h, int64_t len, double* out, double* gg,       \
                                   double* ff) {                                                  \
    sweep_k<true>(k, x, fx, Fs, Gs, h, len, out, gg, ff);                                         \
  }                                                                                               \
  DEQ_FAST_CLONES void sweep_more(int k, const T* Gs, const T* const* h, int64_t len,            \
                                  double* out) {                                                  \
    sweep_k<false>(k, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),             \
                   static_cast<T*>(nullptr), const_cast<T*>(Gs), h, len, out, nullptr, nullptr);  \
  }                                                                                               \
  DEQ_FAST_CLONES void mix_row(const T* cf, const T* cg, const T* F, const T* G, int64_t D,     \
                                int64_t n, bool damped, T* x, int64_t len) {                      \
    mix_row_impl(cf, cg, F, G, D, n, damped, x, len);                                            \
  }
DEQ_FAST_ANDERSON_STREAMING(float)
DEQ_FAST_ANDERSON_STREAMING(double)
#undef DEQ_FAST_ANDERSON_STREAMING

// Pass 1 over one tile: F_s, G_s, ||g||^2, ||fx||^2 and out[k] = <cols[k], g> for k < count,
// the first kMaxSweep columns in the sweep that forms g, the others kMaxSweep per further sweep
// (one accumulator vector per column: 8 columns leave registers for the loads).
constexpr int64_t kMaxSweep = 8;

template <typename scalar_t>
void residual_tile(const scalar_t* x, const scalar_t* fx, scalar_t* Fs, scalar_t* Gs,
                   const scalar_t* const* cols, int64_t count, int64_t len, double* out,
                   double* gg, double* ff) {
  int64_t k = std::min(kMaxSweep, count);
  sweep_fresh(static_cast<int>(k), x, fx, Fs, Gs, cols, len, out, gg, ff);
  for (; k < count; k += kMaxSweep)
    sweep_more(static_cast<int>(std::min(kMaxSweep, count - k)), Gs, cols + k, len, out + k);
}

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
      std::vector<double> row(m), part(m);
      std::vector<int64_t> others;                 // the slots other than `slot`, in order
      for (int64_t j = 0; j < m; ++j)
        if (j != slot) others.push_back(j);
      const int64_t n_others = static_cast<int64_t>(others.size());
      std::vector<const scalar_t*> cols(std::max<int64_t>(n_others, 1));
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
          for (int64_t k = 0; k < n_others; ++k) cols[k] = Gb + others[k] * D + t0;
          residual_tile(xp + o + t0, fp + o + t0, Fs + t0, Gs + t0, cols.data(), n_others, len,
                        part.data(), &gg_t, &ff_t);
          row[slot] += gg_t;
          ff += ff_t;
          for (int64_t k = 0; k < n_others; ++k) row[others[k]] += part[k];
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
      std::vector<scalar_t> cf(std::max<int64_t>(n, 1)), cg(std::max<int64_t>(n, 1));
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
          cf[j] = static_cast<scalar_t>(alpha[j]);
          cg[j] = static_cast<scalar_t>((beta - 1.0) * static_cast<double>(alpha[j]));
        }
        mix_row(cf.data(), cg.data(), Fb, Gb, D, n, damped, xp + o, D);
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
