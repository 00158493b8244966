// Every op schema of deq_fast._C, declared once (the one TORCH_LIBRARY block of the namespace).
// Kernels are registered per backend next to their code: TORCH_LIBRARY_IMPL(deq_fast, CPU, m) in
// cpu/*.cpp, TORCH_LIBRARY_IMPL(deq_fast, CUDA, m) in cuda/*.cu; fake (shape-only) kernels in
// Python (deq_fast/ops/table.py), as in pytorch/extension-cpp.
//
// The forward solver ops (anderson_residual, anderson_mix, broyden_dots, broyden_update,
// fixed_point_step, track_status) exist with or without this extension, so
// their schemas are declared by the Python op table (deq_fast/ops/table.py, a FRAGMENT of the
// same namespace); this extension only adds their CPU kernels (cpu/anderson.cpp, cpu/broyden.cpp,
// cpu/fixed_point.cpp, cpu/status.cpp).
#include <torch/library.h>

TORCH_LIBRARY(deq_fast, m) {
  // Anderson mixing weights (forward solver; math: include/deq_fast/anderson_lstsq.h)
  m.def("anderson_lstsq(Tensor gram, int n, int newest, float lam, bool scaled) -> Tensor");
  // Per-iteration updates of the backward linear solve (backward/loop.cpp calls them; math:
  // include/deq_fast/backward_math.h). Mutated arguments are declared (a!): they are in-place.

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
