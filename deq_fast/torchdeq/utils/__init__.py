"""``torchdeq.utils``: ``mixed_init``, ``mem_gc``, ``add_deq_args``."""
from .init import mixed_init
from .mem import mem_gc
from .arg_utils import add_deq_args
