"""The one table of solver names: the engine's methods and the names the drop-in APIs use for them.

A forward method is what the engine runs (:data:`METHODS`). TorchDEQ's names are aliases of them
(:data:`ALIASES`); :func:`method_of` resolves either to a method and names the known ones when it
cannot.
"""
from __future__ import annotations

__all__ = ["METHODS", "ALIASES", "method_of"]

#: what :func:`deq_fast.solvers.engine.run` can run
METHODS = ("anderson", "broyden", "fixed_point")

#: other names of the methods: TorchDEQ's solver keys (``torchdeq.solver.get_solver``)
ALIASES = {"fixed_point_iter": "fixed_point", "simple_fixed_point_iter": "fixed_point"}


def method_of(name: str, argument: str = "method") -> str:
    """The engine method that ``name`` (a method or an alias) stands for.

    Example:
        >>> method_of("fixed_point_iter")
        'fixed_point'
    """
    method = ALIASES.get(name, name)
    if method not in METHODS:
        known = sorted(METHODS + tuple(ALIASES))
        raise ValueError(f"{argument} must be one of {known}, got {name!r}")
    return method
