"""unet_flax: a Flax diffusion U-Net proven equal to its PyTorch reference.

`import unet_flax` does not import PyTorch; the reference lives in `unet_flax.reference`.
"""
from .config import UNetConfig
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

__all__ = [
    "AttentionBlock",
    "CrossAttentionBlock",
    "Downsample",
    "GroupNorm",
    "ResAttnBlock",
    "ResidualBlock",
    "TimestepEmbedding",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
