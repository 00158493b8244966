"""Registered ops of deq_fast: one module per op (schema/implementations/fake + pure-torch reference).

The C++ ops live in the compiled extension ``deq_fast._C`` (namespace ``torch.ops.deq_fast``); each
module here pairs the op with its pure-PyTorch reference, which is also the fallback when the
extension is not built and the oracle of the tests.
"""
