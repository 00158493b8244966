"""``torchdeq.norm``: weight/spectral normalisation applied once per step, with registries."""
# re-exports (torchdeq's namespace; no __all__, as torchdeq)
from .base_norm import (
    apply_norm as apply_norm,
    register_norm as register_norm,
    register_norm_module as register_norm_module,
    remove_norm as remove_norm,
    reset_norm as reset_norm,
)
