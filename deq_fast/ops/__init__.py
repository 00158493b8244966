"""The ops layer of deq_fast: the op table (``table.py``: every op declared and registered once),
the pure-torch references (one module per op family), and the per-solve op namespace the engine
calls (``dispatch.py``).

The C++ ops live in the compiled extension ``deq_fast._C`` (namespace ``torch.ops.deq_fast``); the
references are also the fallback when the extension is not built and the oracle of the tests.
Importing this package registers the table, so ``torch.ops.deq_fast.*`` exists whether or not
``deq_fast._C`` is built.
"""
from deq_fast.ops import table  # noqa: F401  (registers torch.ops.deq_fast.*)
