"""Layer 3: drop-in solver APIs of the libraries deq_fast replaces, on deq_fast's engine.

* :mod:`~deq_fast.compat.locuslab`  ``anderson`` / ``broyden`` of locuslab/deq (dict results)
* :mod:`~deq_fast.compat.torchdeq`  ``anderson_solver``, ``broyden_solver``, ``fixed_point_iter``,
  ``get_solver`` ... of ``torchdeq.solver`` (``(z, indexing_list, info)`` results)

Imports only :mod:`deq_fast.solvers` and :mod:`deq_fast.ops` below it.
"""
