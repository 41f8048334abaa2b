"""unet_flax: a Flax diffusion U-Net proven equal to its PyTorch reference.

The public API is what this module exports (`__all__`); the modules below it are free to move, and when
one does its old path keeps working, with a `DeprecationWarning`, for one more minor release
(`unet_flax.moved`). `import unet_flax` imports neither PyTorch nor the training and checkpoint stack:
training, sampling and the weight converters load on first use.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from .config import SamplerConfig, SamplingConfig, TrainConfig, UNetConfig
from .model import (
    AttentionBlock,
    CrossAttentionBlock,
    Downsample,
    GroupNorm,
    ResAttnBlock,
    ResidualBlock,
    TimestepEmbedding,
    UNet,
    Upsample,
    timestep_embedding,
)

try:
    __version__ = importlib.metadata.version("unet_flax")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "train": "unet_flax.train_loop",
    "sample": "unet_flax.sampling",
    "sample_from_checkpoint": "unet_flax.sampling",
    "torch_to_flax": "unet_flax.torch_format",
    "flax_to_torch": "unet_flax.torch_format",
    "from_diffusers": "unet_flax.diffusers_format",
    "to_diffusers": "unet_flax.diffusers_format",
    "make_plan": "unet_flax.samplers",
    "run": "unet_flax.samplers",
}

if TYPE_CHECKING:
    from .diffusers_format import from_diffusers, to_diffusers
    from .samplers import make_plan, run
    from .sampling import sample, sample_from_checkpoint
    from .torch_format import flax_to_torch, torch_to_flax
    from .train_loop import train


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'unet_flax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttentionBlock",
    "CrossAttentionBlock",
    "Downsample",
    "GroupNorm",
    "ResAttnBlock",
    "ResidualBlock",
    "SamplerConfig",
    "SamplingConfig",
    "TimestepEmbedding",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "Upsample",
    "__version__",
    "flax_to_torch",
    "from_diffusers",
    "make_plan",
    "run",
    "sample",
    "sample_from_checkpoint",
    "timestep_embedding",
    "to_diffusers",
    "torch_to_flax",
    "train",
]
