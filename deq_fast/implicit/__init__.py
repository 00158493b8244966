"""Layer 4: implicit differentiation, the backward linear solve ``g = grad + J_f(z*)^T g``.

:mod:`~deq_fast.implicit.backward` holds :func:`implicit_backward` (the C++ loop of ``deq_fast._C``
when built, the Python reference loop otherwise) and :func:`shine_apply`;
:mod:`~deq_fast.implicit.reference` the Python reference loop (per-iteration steps from
:mod:`deq_fast.ops.backward`); :mod:`~deq_fast.implicit.grad` the gradient functions a DEQ layer
attaches (exact, phantom, JFB; the exact one in a form ``torch.compile`` captures).

Imports only :mod:`deq_fast.ops` and :mod:`deq_fast.solvers` (the captured backward's adjoint
solve) below it.
"""
