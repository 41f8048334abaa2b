"""Deprecated: moved to `unet_flax.torch_format`, `unet_flax.diffusers_format` and, as a command, to
`python -m unet_flax.scripts.convert` (`unet-flax-convert`). Removed in unet_flax 0.3.0."""
import sys

from unet_flax.moved import forward, run_moved_command

__getattr__, __dir__ = forward("unet_flax.convert")

if __name__ == "__main__":
    sys.exit(run_moved_command("unet_flax.convert"))
