"""Layer 2: the fixed-point solvers on the flattened ``(B, D)`` state.

* :mod:`~deq_fast.solvers.packing`  states of any shape (or tuples of tensors) to ``(B, D)`` and back
* :mod:`~deq_fast.solvers.engine`   the loops of Anderson, Broyden and fixed-point iteration, built on
  the fused ops of :mod:`deq_fast.ops`
* :mod:`~deq_fast.solvers.api`      the native API :func:`solve` -> :class:`SolveResult`

Imports only :mod:`deq_fast.ops` below it.
"""
