// The C++ iteration loop of the backward linear solve of implicit differentiation, exposed to
// Python as deq_fast._C.backward_solve (pybind11, see register_backward_bindings).
//
// Solves, per sample, g = grad + J^T g where J^T v is a vector-Jacobian product through the
// autograd graph of one tracked f(z*) (torch::autograd::grad, re-entrant: this runs inside an
// autograd.Function backward). The per-iteration state updates are the registered ops
// deq_fast::bwd_* (schemas: ops.cpp; CPU kernels: cpu/backward_ops.cpp; CUDA kernels:
// cuda/backward_ops.cu), called through the dispatcher so that the loop runs on whichever device
// the state lives on; their per-sample math is in deq_fast/backward_math.h.
//
// Per iteration the loop dispatches one VJP and one or two ops; the host reads a device flag
// only every `check_every` iterations (and once per GMRES restart cycle).
#include "deq_fast/backward_math.h"
#include "deq_fast/module.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>

namespace deq_fast {
namespace backward {
namespace {

using at::Tensor;

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
