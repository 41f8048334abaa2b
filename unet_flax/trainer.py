"""Deprecated: `train` moved to `unet_flax.train_loop` (or `unet_flax.train`). Removed in unet_flax 0.3.0."""
from unet_flax.moved import forward

__getattr__, __dir__ = forward("unet_flax.trainer")
