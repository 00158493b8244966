"""Layer 5: what a model is built from.

* :mod:`~deq_fast.nn.deq`           the DEQ module (:func:`get_deq`) and its forward paths
* :mod:`~deq_fast.nn.options`       its options, parsed once into a dataclass
* :mod:`~deq_fast.nn.norm`          weight / spectral normalisation for DEQ layers
* :mod:`~deq_fast.nn.dropout`       variational (fixed-mask) dropout
* :mod:`~deq_fast.nn.regularizers`  Jacobian regularisation, spectral radius, fixed-point correction

Imports only the layers below it (implicit, compat, solvers, ops).
"""
