"""``torchdeq.norm``: weight/spectral normalisation applied once per step, with registries."""
from .base_norm import (apply_norm, register_norm, register_norm_module, remove_norm,
                        reset_norm)
