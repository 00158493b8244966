"""``torchdeq.utils``: ``mixed_init``, ``mem_gc``, ``add_deq_args``."""
# re-exports (torchdeq's namespace; no __all__, as torchdeq)
from .arg_utils import add_deq_args as add_deq_args
from .init import mixed_init as mixed_init
from .mem import mem_gc as mem_gc
