"""The U-Net's shape, shared by the Flax model and the PyTorch reference.

Kept free of JAX and PyTorch imports so that either side, and the checkpoint code, can read it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..errors import ConfigError
from .fields import FREE, check_choices, check_range, setting

DTYPES = ("float32", "bfloat16", "float16")
GROUP_NORM_EPSILON = 1e-5  # torch.nn.GroupNorm's default; flax's is 1e-6
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# What GroupNorm's fused backward pass does with the activation's slope (model.group_norm_activation).
NORM_BACKWARDS = ("auto", "recompute", "keep")
# How a residual block takes the time embedding: as a scale and shift after norm2 (the seed's), or
# added to the features before norm2 (DDPM's, diffusers' "default").
TIME_CONDITIONINGS = ("scale_shift", "additive")
TIMESTEP_EMBEDDING_ORDERS = ("cos_sin", "sin_cos")
# The stride-2 convolution's zero padding: one row/column on every side, or only after the last
# (diffusers' downsample_padding=0).
DOWNSAMPLE_PADDINGS = ("symmetric", "bottom_right")

@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block of the U-Net, with the attention that follows it at low resolution."""

    in_channels: int
    out_channels: int
    attention: bool


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A diffusion U-Net: encoder levels, a middle (res, attention, res) and a mirrored decoder.

    `attention_resolutions` are feature-map sizes, measured from `image_size`, after whose residual
    blocks a self-attention block sits (the seed's rule: 16x16 and below). The network accepts any
    input whose height and width divide by 2**(len(channel_mults) - 1); `image_size` only fixes
    which levels carry attention.
    """

    in_channels: int = setting(3, flag=False)  # the data's
    out_channels: int | None = setting(None, flag=False)  # None: the same as in_channels
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    image_size: int = 32
    num_heads: int = 8
    num_groups: int = 32
    dropout: float = 0.0
    num_classes: int | None = setting(None, flag=False)  # labels 0..num_classes-1, plus num_classes as the null label
    context_dim: int | None = setting(None, flag=False)  # width of the cross-attention context (none in train.py)
    # computation dtype of the Flax model; parameters stay float32
    dtype: str = setting("float32", resume=FREE, choices=DTYPES)
    # jax.nn.dot_product_attention's implementation; 'auto': cuDNN's fused attention where it applies
    # (a CUDA GPU, bf16/fp16, a head size it accepts), XLA elsewhere. Weights do not depend on it.
    attention_impl: str = setting("auto", resume=FREE, choices=ATTENTION_IMPLEMENTATIONS)
    remat: bool = setting(False, resume=FREE)  # recompute each block in the backward pass to save memory
    # Whether GroupNorm's backward pass recomputes its activation's slope or keeps it from the forward pass;
    # 'auto': recompute on a GPU or TPU, keep on a CPU (JAX's default backend). The same gradients either way.
    norm_backward: str = setting("auto", resume=FREE, choices=NORM_BACKWARDS)
    # The variants of diffusers' UNet2DModel; the defaults are this project's own U-Net.
    time_conditioning: str = setting("scale_shift", choices=TIME_CONDITIONINGS)
    norm_eps: float = GROUP_NORM_EPSILON  # every GroupNorm's epsilon
    timestep_embedding_order: str = setting("cos_sin", choices=TIMESTEP_EMBEDDING_ORDERS)
    timestep_frequency_shift: float = 0.0  # frequencies exp(-ln(10000) i / (dim/2 - shift))
    head_dim: int | None = None  # channels per attention head; when set, num_heads is not used
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    mid_attention_norm: bool = True  # the middle attention's GroupNorm (diffusers' scale-shift models have none)
    downsample_padding: str = setting("symmetric", choices=DOWNSAMPLE_PADDINGS)
    center_input: bool = False  # x -> 2x - 1 before conv_in, for models trained on [0, 1] inputs
    mid_block_scale_factor: float = 1.0  # the middle blocks divide their residual sums by it
    null_label: bool = True  # a label embedding for "no label" (classifier-free guidance), as num_classes

    def __post_init__(self) -> None:
        # Accept lists (from JSON or a command line) but store tuples, so the config stays hashable.
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks",
                     "image_size", "num_heads", "num_groups"):
            check_range(name, getattr(self, name), 1, integer=True)
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ConfigError(f"channel_mults must be positive integers, got {self.channel_mults}")
        check_range("dropout", self.dropout, 0, 1, high_open=True)
        check_range("num_classes", self.num_classes, 1, integer=True, optional=True)
        check_range("context_dim", self.context_dim, 1, integer=True, optional=True)
        check_choices(self)
        check_range("norm_eps", self.norm_eps, 0, low_open=True)
        check_range("mid_block_scale_factor", self.mid_block_scale_factor, 0, low_open=True)
        check_range("timestep_frequency_shift", self.timestep_frequency_shift)
        if self.base_channels >= 2 and not self.timestep_frequency_shift < self.base_channels // 2:
            raise ConfigError(f"timestep_frequency_shift must be below base_channels // 2 = "
                              f"{self.base_channels // 2}, got {self.timestep_frequency_shift}")
        check_range("head_dim", self.head_dim, 1, integer=True, optional=True)
        if self.image_size % self.downsample_factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2**(levels-1) = {self.downsample_factor}"
            )
        sizes = [self.image_size // 2**level for level in range(self.num_levels)]
        for resolution in self.attention_resolutions:
            if resolution not in sizes:
                raise ConfigError(f"attention_resolutions {resolution} matches no level: the levels' feature maps "
                                  f"are {', '.join(map(str, sizes))} wide (image_size {self.image_size}, "
                                  f"{self.num_levels} levels)")
        for mult in sorted(set(self.channel_mults)):
            check_divisible(self.base_channels * mult, self.num_groups, "num_groups")
        for channels in sorted(self.attention_channels()):
            self.attention_heads(channels)

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    def attention_heads(self, channels: int) -> int:
        """The head count of an attention over `channels`: num_heads, or channels // head_dim."""
        if self.head_dim is None:
            check_divisible(channels, self.num_heads, "num_heads")
            return self.num_heads
        check_divisible(channels, self.head_dim, "head_dim")
        return channels // self.head_dim

    def attended_channels(self) -> set[int]:
        """The channel counts of the network's attention blocks: the levels with attention, the middle."""
        channels = {self.base_channels * self.channel_mults[level]
                    for level in range(self.num_levels) if self.level_has_attention(level)}
        if self.mid_attention:
            channels.add(self.base_channels * self.channel_mults[-1])
        return channels

    def attention_channels(self) -> set[int]:
        """The channel counts the head size must divide: the attention blocks' (and every level's for
        num_heads, which the seed checks everywhere)."""
        if self.head_dim is not None:
            return self.attended_channels()
        return self.attended_channels() | {self.base_channels * mult for mult in self.channel_mults}

    @property
    def num_label_embeddings(self) -> int:
        """Rows of the label embedding: the classes, and the null label when there is one."""
        return self.num_classes + int(self.null_label) if self.num_classes is not None else 0

    def level_has_attention(self, level: int) -> bool:
        return self.image_size // 2**level in self.attention_resolutions

    def block_plan(self) -> tuple[list[list[BlockSpec]], list[list[BlockSpec]]]:
        """The residual(+attention) blocks of the encoder per level, and of the decoder per level
        from the deepest up. Decoder blocks take the encoder's skip activations concatenated on
        channels, the last one first; both frameworks build their networks from this one plan."""
        channels = self.base_channels
        skip_channels = [channels]  # conv_in's output
        encoder = []
        for level, mult in enumerate(self.channel_mults):
            blocks = []
            for _ in range(self.num_res_blocks):
                blocks.append(BlockSpec(channels, self.base_channels * mult, self.level_has_attention(level)))
                channels = self.base_channels * mult
                skip_channels.append(channels)
            encoder.append(blocks)
            if level != self.num_levels - 1:
                skip_channels.append(channels)  # the downsampled map
        decoder = []
        for level in reversed(range(self.num_levels)):
            blocks = []
            for _ in range(self.num_res_blocks + 1):
                out_channels = self.base_channels * self.channel_mults[level]
                blocks.append(BlockSpec(channels + skip_channels.pop(), out_channels,
                                        self.level_has_attention(level)))
                channels = out_channels
            decoder.append(blocks)
        return encoder, decoder

    def require_null_label(self, name: str, value: float, neutral: float) -> None:
        """Classifier-free guidance and label dropout use the null label: a labelled model without one
        (as imported from diffusers) takes neither; `name` set to anything but `neutral` is refused."""
        if value != neutral and self.num_classes is not None and not self.null_label:
            raise ConfigError(f"{name} {value} needs the null label, and this model has none (null_label=False): "
                              f"set {name} to {neutral}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown UNetConfig fields: {', '.join(unknown)}")
        return cls(**fields)


def check_divisible(channels: int, divisor: int, divisor_name: str) -> None:
    """Raise the error a user can act on, before GroupNorm or a head split fails obscurely."""
    if channels % divisor:
        raise ConfigError(f"channels ({channels}) must be divisible by {divisor_name} ({divisor})")


def timestep_frequencies(dim: int, shift: float = 0.0, max_period: float = 10000.0) -> np.ndarray:
    """Frequencies f_i = exp(-ln(max_period) i / (dim/2 - shift)) of the sinusoidal timestep embedding.

    Computed once as constants, so the Flax model and the PyTorch reference multiply t by the very
    same numbers: exp() evaluated in float32 on each side differs by an ulp, which at t ~ 1000 moves
    the phase by ~1e-4 and breaks 1e-5 parity. The exponent is rounded to float32 step by step as
    diffusers computes it, and exp() is then taken in float64 and rounded once: this reproduces
    diffusers' own frequencies (all but an entry or two, by one ulp).
    """
    half = dim // 2
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def compute_dtype(backend: str, accelerator_dtype: str = "bfloat16") -> str:
    """The dtype to compute in on `backend`: float32 on the CPU, which has no fast bf16; elsewhere
    `accelerator_dtype`."""
    return "float32" if backend == "cpu" else accelerator_dtype
