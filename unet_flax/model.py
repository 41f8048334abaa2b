"""The diffusion U-Net in Flax (linen), NHWC.

Block for block the PyTorch reference in `reference.py`: same attribute names, same order, same
math. Parameters are float32; `dtype` sets the computation dtype (bfloat16 for mixed precision).
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .config.unet_config import GROUP_NORM_EPSILON, NORM_BACKWARDS, UNetConfig, check_divisible, timestep_frequencies

Dtype = Any
Array = jax.Array



class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (eps 1e-5, float32 statistics, params `scale` and `bias`), and what
    follows it elementwise in the blocks: the time embedding's scale and shift, an activation, dropout.

    All of it is `group_norm_activation`, one fused operation in both directions of differentiation.
    """

    num_groups: int = 32
    epsilon: float = GROUP_NORM_EPSILON
    dtype: Dtype = jnp.float32
    backward: str = "auto"  # what the backward pass does with the activation's slope: see recomputes_slope

    @nn.compact
    def __call__(self, x: Array, scale_shift: tuple[Array, Array] | None = None,
                 activation: Callable[[Array], Array] | None = None, dropout_rate: float = 0.0,
                 shared_dropout_seed: Array | None = None) -> Array:
        """GroupNorm(x) [* (1 + scale) + shift] [-> activation] [-> dropout].

        Dropout draws from this layer's key of the 'dropout' rng, or, given `shared_dropout_seed` (a uint32
        `dropout_seed` that a network hands all its layers), from that word salted with the CRC-32 of this
        layer's path: flax's per-layer key is a fold-in, a small kernel of its own for each layer on a GPU."""
        channels = x.shape[-1]
        check_divisible(channels, self.num_groups, "num_groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        seed, salt = None, 0
        if dropout_rate > 0 and shared_dropout_seed is None:
            seed = dropout_seed(self.make_rng("dropout"))
        elif dropout_rate > 0:
            seed, salt = shared_dropout_seed, zlib.crc32("/".join(self.path).encode())
        return group_norm_activation(x, scale, bias, scale_shift, seed, self.num_groups, self.epsilon,
                                     jnp.dtype(self.dtype), activation, dropout_rate, self.backward, salt)


# What group_norm_activation keeps for the backward pass, besides its inputs.
GROUP_STATISTICS, ACTIVATION_SLOPE = "group_statistics", "activation_slope"
# Where group_norm_activation's backward pass recomputes the activation's slope by default (jax.default_backend()).
RECOMPUTE_SLOPE_ON = ("gpu", "tpu")


def recomputes_slope(backward: str) -> bool:
    """Whether GroupNorm's backward pass recomputes the activation's slope ('recompute') or keeps it from the
    forward pass ('keep'); 'auto': recompute where JAX computes on a GPU or TPU (RECOMPUTE_SLOPE_ON), keep on a
    CPU. Decided when the step is traced: a program compiled ahead of time for another machine's devices
    names its choice (benchmarks/h100_aot.py). jax.lax.platform_dependent, which would decide when the step is
    lowered, runs both choices as branches of one conditional, whose residuals for the backward pass JAX
    fills in with zeros for the branch not taken: on the H100 float32 step, 3.3 GB more moved and 600 MB more
    scratch memory."""
    if backward not in NORM_BACKWARDS:
        raise ValueError(f"backward must be one of {NORM_BACKWARDS}, got {backward!r}")
    return jax.default_backend() in RECOMPUTE_SLOPE_ON if backward == "auto" else backward == "recompute"


def group_norm_activation(x: Array, scale: Array, bias: Array, scale_shift: tuple[Array, Array] | None,
                          dropout_seed: Array | None, num_groups: int, epsilon: float, dtype: Dtype,
                          activation: Callable[[Array], Array] | None = None, dropout_rate: float = 0.0,
                          backward: str = "auto", dropout_salt: int = 0) -> Array:
    """GroupNorm of NHWC `x` with per-channel `scale` and `bias`, then `* (1 + s) + t` for a (B, 1, 1, C)
    `scale_shift` pair (s, t), then the elementwise `activation`, then dropout at `dropout_rate` drawn
    by the uint32 `dropout_seed` and the constant `dropout_salt` (`dropout_mask`; kept values scaled by 1 / (1 - rate),
    as flax.linen.Dropout does): float32 inside, rounded to `dtype` once. `backward`: see `recomputes_slope`.

    One fused operation in both modes of differentiation (jvp and jacfwd as well as grad). Its derivative
    is written out, a jax.custom_jvp whose tangent is linear, so JAX transposes it for reverse mode, and
    checkpointed to keep only the input and three numbers per group: the backward pass reads the input and
    the output's gradient twice, once for all its sums and once for the input's gradient, and on a GPU or
    TPU recomputes the rest (the normalised input, the activation's derivative, dropout's mask) inside both
    kernels. Differentiated op by op, the float32 normalised, modulated and activated maps and dropout's
    mask were kept and read back, and every sum was a pass of its own: the largest memory traffic of a
    bfloat16 train step on a GPU. Keeping the activation's derivative (2 bytes a value) still cost the
    cifar10 step on an H100 2.6 GB of its 14.6 GB of memory traffic and 0.8 GB of its 3.1 GB of scratch
    memory; on a CPU it is kept, as recomputing it costs more there (docs/benchmarks.md).
    """
    # No scale and shift is None, not zeros: zeros would reach the backward pass through the checkpoint's barrier,
    # where XLA cannot fold them away and computes with them in small kernels of their own (46 per cifar10 step).
    return _group_norm_activation(x, scale, bias, None if scale_shift is None else tuple(scale_shift),
                                  jnp.zeros((), jnp.uint32) if dropout_seed is None else dropout_seed,
                                  num_groups, epsilon, jnp.dtype(dtype), activation, (dropout_rate, dropout_salt),
                                  recomputes_slope(backward))


# `dropout` is (rate, salt) (see _activate).
@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _fused(x, scale, bias, scale_shift, dropout_seed, num_groups, epsilon, dtype, activation, dropout,
           recompute_slope):
    normalized, _ = _normalize(x, _group_statistics(x, num_groups, epsilon), num_groups)
    return _activate(_modulate(normalized, scale, bias, scale_shift), dropout_seed, activation,
                     dropout)[0].astype(dtype)


@_fused.defjvp
def _fused_jvp(num_groups, epsilon, dtype, activation, dropout, recompute_slope, primals, tangents):
    """The derivative as  k (a dx + q + n p):  n the normalised input, k the activation's and dropout's
    elementwise derivative, a = (1 + s) scale / std, and q, p per (sample, channel) from the parameters'
    tangents and the group means of dx and n dx (GroupNorm's textbook derivative,
    dn = (dx - mean(dx) - n mean(n dx)) / std).

    Both pairs of sums are written as one complex sum, over dx (1 + in) and of (q - ip)(1 + in), whose
    real part is q + n p: one pass over the activations each, forward and (transposed) backward. As two
    real sums, XLA computes one and writes the other's float32 operand out for a second kernel.
    """
    x, scale, bias, scale_shift, seed = primals
    dx, dscale, dbias, dscale_shift, _ = tangents
    statistics = _group_statistics(x, num_groups, epsilon)
    normalized, inverse_std = _normalize(x, statistics, num_groups)
    out, slope = _activate(_modulate(normalized, scale, bias, scale_shift), seed, activation, dropout)

    def recomputed(slope: Array) -> tuple[Array, Array, Array]:
        # n and k again, from the input behind a barrier: each of the backward pass's two kernels recomputes
        # them from x (an exponential, dropout's mask) instead of sharing one copy, which XLA would write out
        # in float32 and read back twice. On accelerators (RECOMPUTE_SLOPE_ON), whose elementwise work waits on
        # memory.
        x_apart, seed_apart = jax.lax.optimization_barrier((x, seed))
        normalized_apart, _ = _normalize(x_apart, statistics, num_groups)
        _, slope_apart = _activate(_modulate(normalized_apart, scale, bias, scale_shift), seed_apart, activation,
                                   dropout)
        return slope, normalized_apart, slope_apart

    def kept(slope: Array) -> tuple[Array, Array, Array]:
        # The slope kept in `dtype` for the backward pass: on a CPU recomputing its exponential costs more than
        # reading it back (the digits step: 133 ms kept, 151 ms recomputed in both kernels, 145 ms once).
        slope = checkpoint_name(slope.astype(dtype), ACTIVATION_SLOPE).astype(jnp.float32)
        return slope, normalized, slope

    slope, normalized_apart, slope_apart = (recomputed if recompute_slope else kept)(slope)
    per_sample = (x.shape[0], 1, 1, x.shape[-1])  # coefficients per (sample, channel), so the sums are too
    one_plus_s = 1.0 if scale_shift is None else 1 + scale_shift[0].astype(jnp.float32)
    a = jnp.broadcast_to(one_plus_s * scale * inverse_std, per_sample)
    dx = dx.astype(jnp.float32)
    # mean(dx) + i mean(n dx)
    means = _group_mean(dx * jax.lax.complex(jnp.ones_like(normalized), normalized), num_groups)
    q_from_tangents, p_from_tangents = one_plus_s * dbias, one_plus_s * dscale
    if scale_shift is not None:
        dtime_scale, dtime_shift = (tangent.astype(jnp.float32) for tangent in dscale_shift)
        q_from_tangents = q_from_tangents + bias * dtime_scale + dtime_shift
        p_from_tangents = p_from_tangents + scale * dtime_scale
    q = -a * jnp.real(means) + jnp.broadcast_to(q_from_tangents, per_sample)
    p = -a * jnp.imag(means) + jnp.broadcast_to(p_from_tangents, per_sample)
    from_params_and_means = jnp.real(jax.lax.complex(q, -p) * jax.lax.complex(jnp.ones_like(normalized_apart),
                                                                               normalized_apart))
    return out.astype(dtype), (slope * (a * dx) + slope_apart * from_params_and_means).astype(dtype)


_group_norm_activation = jax.checkpoint(
    _fused, static_argnums=(5, 6, 7, 8, 9, 10),
    policy=jax.checkpoint_policies.save_only_these_names(GROUP_STATISTICS, ACTIVATION_SLOPE))


def _normalize(x: Array, statistics: tuple[Array, Array, Array], num_groups: int) -> tuple[Array, Array]:
    """(x - group mean) / std as float32 in x's shape, from `_group_statistics`, and 1 / std per
    (sample, channel), (B, 1, 1, C)."""
    shift, mean, inverse_std = statistics
    normalized = ((_groups(x, num_groups) - shift - mean) * inverse_std).reshape(x.shape)
    return normalized, _per_channel(inverse_std.reshape(x.shape[0], 1, 1, num_groups), x.shape[-1])


def _group_mean(x: Array, num_groups: int) -> Array:
    """Each group's mean of NHWC `x`, per (sample, channel): (B, 1, 1, C)."""
    per_channel = x.mean(axis=(1, 2), keepdims=True)  # the spatial sum first, per channel
    return _per_channel(per_channel.reshape(*per_channel.shape[:3], num_groups, -1).mean(axis=4), x.shape[-1])


def _per_channel(per_group: Array, channels: int) -> Array:
    """(..., G, *rest) per-group values repeated for each of the group's channels: (..., C, *rest)."""
    groups = per_group.shape[3]
    expanded = jnp.repeat(per_group[:, :, :, :, None], channels // groups, axis=4)
    return expanded.reshape(*per_group.shape[:3], channels, *per_group.shape[4:])


def _modulate(normalized: Array, scale: Array, bias: Array, scale_shift: tuple[Array, Array] | None) -> Array:
    h = normalized * scale + bias
    if scale_shift is None:
        return h
    time_scale, time_shift = scale_shift
    return h * (1 + time_scale.astype(jnp.float32)) + time_shift.astype(jnp.float32)


def _activate(h: Array, seed: Array, activation: Callable[[Array], Array] | None,
              dropout: tuple[float, int]) -> tuple[Array, Array]:
    """activation(h) with dropout at rate dropout[0] from `seed` and the salt dropout[1] (`dropout_mask`), and
    its elementwise derivative (the mask's scale included)."""
    dropout_rate, salt = dropout
    out, slope = (h, jnp.ones_like(h)) if activation is None else jax.jvp(activation, (h,), (jnp.ones_like(h),))
    if dropout_rate > 0:
        keep = dropout_mask(seed, 1.0 - dropout_rate, h.shape, salt)
        out = jax.lax.select(keep, out / (1.0 - dropout_rate), jnp.zeros_like(out))
        slope = jax.lax.select(keep, slope / (1.0 - dropout_rate), jnp.zeros_like(slope))
    return out, slope


def dropout_seed(key: Array) -> Array:
    """The 32-bit word `dropout_mask` hashes: the last word of a JAX random key's data, typed or raw (a raw
    `PRNGKey(n)` ends in n). A layer's key from `make_rng` is a fold-in's output, random bits already: on a GPU
    the one small kernel computing that word is all a layer's seed costs, where drawing words from the key
    (threefry again) and reading both of the key's took three."""
    return jax.random.key_data(key).ravel()[-1]


def dropout_mask(seed: Array, keep_rate: float, shape: tuple[int, ...], salt: int = 0) -> Array:
    """Which values of a (B, ...) array dropout keeps, each with probability `keep_rate` (to 2**-24): a
    counter-based hash of the value's sample, its position in the sample (modulo 2**32), the uint32
    `seed` (`dropout_seed`) and the constant `salt` (a layer's, where layers share one seed).

    A few integer operations per value, which XLA recomputes inside every kernel that needs the mask (the
    forward pass and both of the backward pass's); jax.random.bernoulli's threefry (20 rounds) XLA computes
    once and writes its mask out, an activation-sized boolean array read back by each.
    """
    sample = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    position = jnp.zeros(shape, jnp.uint32)
    for axis in range(1, len(shape)):  # the value's index within its sample
        position = position * np.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    # The salt enters each value's hash, not the seed: XLA would compute seed ^ salt in a kernel of its own.
    bits = _mix32(_mix32(position ^ seed) + (sample * np.uint32(0x9E3779B9) + np.uint32(salt)) + seed)
    return (bits >> 8) < np.uint32(round(keep_rate * (1 << 24)))


def _mix32(x: Array) -> Array:
    """A 32-bit integer hash whose every output bit depends on every input bit (lowbias32)."""
    x = (x ^ (x >> 16)) * np.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _groups(x: Array, num_groups: int) -> Array:
    """x as float32 groups (B, H*W, G, C/G)."""
    return x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)


def _group_statistics(x: Array, num_groups: int, epsilon: float) -> tuple[Array, Array, Array]:
    """Each group's shift (one of its own samples), mean after the shift and 1/sqrt(variance + eps),
    from one pass over x.

    The shift makes the one-pass variance E[d^2] - E[d]^2 exact where it would otherwise cancel:
    activations far from zero relative to their spread (mean 5, std 1e-3) lose the variance to
    float32 rounding in E[x^2] - E[x]^2, and even a two-pass mean loses ~1e-4 (torch's own float32),
    while the deviations from one sample are of the order of the spread (1e-7 against float64).
    GroupNorm does not change when its input is shifted, so the shift is held constant where this is
    differentiated (derivatives of the derivative): its exact derivative is zero.
    """
    groups = _groups(x, num_groups)
    shift = jax.lax.stop_gradient(groups[:, :1, :, :1])
    shifted = groups - shift
    # Two sums XLA fuses into one pass (as one variadic reduction, it writes the float32 groups out).
    mean = shifted.mean(axis=(1, 3), keepdims=True)
    variance = jnp.maximum(jnp.square(shifted).mean(axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
    return tuple(checkpoint_name(value, GROUP_STATISTICS)
                 for value in (shift, mean, jax.lax.rsqrt(variance + epsilon)))


def group_norm(num_groups: int, epsilon: float, dtype: Dtype, backward: str, name: str | None = None) -> GroupNorm:
    return GroupNorm(num_groups, epsilon, dtype, backward, name=name)


# Explicit padding: 'SAME' pads (0, 1) at stride 2, where torch's padding=1 pads (1, 1).
CONV3X3_PADDING = {"symmetric": ((1, 1), (1, 1)), "bottom_right": ((0, 1), (0, 1))}


def conv3x3(features: int, dtype: Dtype, stride: int = 1, padding: str = "symmetric",
            name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=CONV3X3_PADDING[padding],
                   dtype=dtype, name=name)


def conv1x1(features: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), dtype=dtype, name=name)


def timestep_embedding(t: Array, dim: int, order: str = "cos_sin", shift: float = 0.0) -> Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, [cos, sin] or [sin, cos]."""
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(timestep_frequencies(dim, shift))[None, :]
    waves = [jnp.cos(args), jnp.sin(args)]
    embedding = jnp.concatenate(waves if order == "cos_sin" else waves[::-1], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm (scale/shift from t_emb) -> SiLU -> conv3x3, + skip.

    `time_conditioning='additive'` adds the projected t_emb before norm2 instead (DDPM's block);
    the sum with the skip is divided by `output_scale`.
    """

    out_channels: int
    time_emb_dim: int | None = None
    num_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    epsilon: float = GROUP_NORM_EPSILON
    time_conditioning: str = "scale_shift"
    output_scale: float = 1.0
    norm_backward: str = "auto"  # GroupNorm.backward

    def setup(self) -> None:
        self.norm1 = group_norm(self.num_groups, self.epsilon, self.dtype, self.norm_backward)
        self.conv1 = conv3x3(self.out_channels, self.dtype)
        self.time_mlp = None
        if self.time_emb_dim is not None:
            # For scale and shift (or one added term)
            width = self.out_channels * (2 if self.time_conditioning == "scale_shift" else 1)
            self.time_mlp = nn.Sequential([nn.silu, nn.Dense(width, dtype=self.dtype)])
        self.norm2 = group_norm(self.num_groups, self.epsilon, self.dtype, self.norm_backward)
        self.conv2 = conv3x3(self.out_channels, self.dtype)
        self.activation = nn.silu
        # Called, and so given parameters, only when the channel count changes (else identity).
        self.skip_connection = conv1x1(self.out_channels, self.dtype)

    def __call__(self, x: Array, t_emb: Array | None = None, train: bool = False,
                 shared_dropout_seed: Array | None = None) -> Array:
        """`shared_dropout_seed`: see GroupNorm; None draws dropout from the 'dropout' rng."""
        check_divisible(x.shape[-1], self.num_groups, "num_groups")
        check_divisible(self.out_channels, self.num_groups, "num_groups")
        if self.time_mlp is not None and t_emb is None and self.is_initializing():
            # The reference always owns time_mlp's weights; create them even when called without t_emb.
            self.time_mlp(jnp.zeros((1, self.time_emb_dim), self.dtype))
        if self.time_mlp is not None and t_emb is not None and t_emb.shape[-1] != self.time_emb_dim:
            raise ValueError(f"t_emb has width {t_emb.shape[-1]}, expected time_emb_dim={self.time_emb_dim}")

        residual = x
        # Each GroupNorm and what follows it elementwise run as one fused operation (GroupNorm's docstring).
        h = self.norm1(x, activation=self.activation)
        h = self.conv1(h)
        dropout_rate = self.dropout if train else 0.0
        if self.time_mlp is not None and t_emb is not None:
            time_encoding = self.time_mlp(t_emb)[:, None, None, :]
            if self.time_conditioning == "additive":
                h = self.norm2(h + time_encoding, activation=self.activation, dropout_rate=dropout_rate,
                               shared_dropout_seed=shared_dropout_seed)
            else:
                scale, shift = jnp.split(time_encoding, 2, axis=-1)
                # Modulate features: norm2(h) * (1 + scale) + shift
                h = self.norm2(h, (scale, shift), activation=self.activation, dropout_rate=dropout_rate,
                               shared_dropout_seed=shared_dropout_seed)
        else:
            h = self.norm2(h, activation=self.activation, dropout_rate=dropout_rate,
                           shared_dropout_seed=shared_dropout_seed)
        h = self.conv2(h)
        if x.shape[-1] != self.out_channels:
            residual = self.skip_connection(residual)
        return (h + residual) / self.output_scale


def attention_implementation(requested: str, dtype: Dtype, head_dim: int, query_length: int,
                             key_length: int) -> str:
    """The `implementation` for jax.nn.dot_product_attention: `requested`, or for 'auto' cuDNN's fused
    attention where `cudnn_attention_applies` on this machine's GPU and XLA's elsewhere."""
    if requested != "auto":
        return requested
    if jax.default_backend() != "gpu":
        return "xla"
    applies = cudnn_attention_applies(dtype, head_dim, query_length, key_length, _cuda_compute_capability())
    return "cudnn" if applies else "xla"


def cudnn_attention_applies(dtype: Dtype, head_dim: int, query_length: int, key_length: int,
                            compute_capability: tuple[int, ...] | None) -> bool:
    """Whether cuDNN's fused attention takes these inputs, forward and backward: an NVIDIA GPU of compute
    capability 8.0 or later, bf16/fp16, a head size that is a multiple of 8 and at most 128 (256 from
    Hopper on), and even query and key lengths (its backward pass refuses odd ones, e.g. a 7x7 map or a
    7-token context)."""
    if compute_capability is None or compute_capability < (8, 0):
        return False
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8 or query_length % 2 or key_length % 2:
        return False
    return head_dim <= (256 if compute_capability >= (9, 0) else 128)


def _cuda_compute_capability() -> tuple[int, ...] | None:
    """(major, minor) of the first GPU when it is an NVIDIA one; ROCm devices report e.g. 'gfx90a'."""
    try:
        return tuple(int(part) for part in jax.devices()[0].compute_capability.split("."))
    except (AttributeError, ValueError):
        return None


def _split_heads(x: Array, parts: int, num_heads: int) -> tuple[Array, ...]:
    """(B, ..., parts*C) -> `parts` arrays (B, L, heads, C/heads) with the seed's channel order.

    The seed reshapes NCHW (b, c, h, w) to (b*heads, head_dim, h*w): q, k, v are consecutive
    channel thirds and head n owns channels n*head_dim .. (n+1)*head_dim - 1 of each.
    """
    batch, channels = x.shape[0], x.shape[-1] // parts
    x = x.reshape(batch, -1, parts, num_heads, channels // num_heads)
    return tuple(x[:, :, i] for i in range(parts))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the h*w positions: GroupNorm -> to_qkv -> attention -> to_out, + x.

    `normalize=False` drops the GroupNorm; the sum with x is divided by `output_scale`.
    """

    num_heads: int = 8
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # see attention_implementation(); 'cudnn' only for bf16/fp16 on GPU
    epsilon: float = GROUP_NORM_EPSILON
    normalize: bool = True
    output_scale: float = 1.0
    norm_backward: str = "auto"  # GroupNorm.backward

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        check_divisible(c, self.num_groups, "num_groups")
        check_divisible(c, self.num_heads, "num_heads")
        residual = x
        if self.normalize:
            x = group_norm(self.num_groups, self.epsilon, self.dtype, self.norm_backward, name="norm")(x)
        qkv = conv1x1(c * 3, self.dtype, name="to_qkv")(x)
        q, k, v = _split_heads(qkv, 3, self.num_heads)
        implementation = attention_implementation(self.attention_impl, q.dtype, q.shape[-1], q.shape[1], k.shape[1])
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        out = out.reshape(b, h, w, c)
        out = conv1x1(c, self.dtype, name="to_out")(out)
        return (out + residual) / self.output_scale  # Add residual connection


class CrossAttentionBlock(nn.Module):
    """Queries from the normalised image features, keys and values from a (B, L, context_dim) context."""

    num_heads: int = 8
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    epsilon: float = GROUP_NORM_EPSILON
    output_scale: float = 1.0
    norm_backward: str = "auto"  # GroupNorm.backward

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        b, h, w, c = x.shape
        check_divisible(c, self.num_groups, "num_groups")
        check_divisible(c, self.num_heads, "num_heads")
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context must have shape (batch={b}, length, context_dim), got {context.shape}")
        residual = x
        normalized = group_norm(self.num_groups, self.epsilon, self.dtype, self.norm_backward, name="norm")(x)
        q = conv1x1(c, self.dtype, name="to_q")(normalized)
        kv = nn.Dense(c * 2, dtype=self.dtype, name="to_kv")(context)
        (q,) = _split_heads(q, 1, self.num_heads)
        k, v = _split_heads(kv, 2, self.num_heads)
        implementation = attention_implementation(self.attention_impl, q.dtype, q.shape[-1], q.shape[1], k.shape[1])
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
        out = out.reshape(b, h, w, c)
        out = conv1x1(c, self.dtype, name="to_out")(out)
        return (out + residual) / self.output_scale


class Downsample(nn.Module):
    """Stride-2 conv3x3, padded 1 on every side ('symmetric') or after the last row and column only."""

    dtype: Dtype = jnp.float32
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return conv3x3(x.shape[-1], self.dtype, stride=2, padding=self.padding, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Repeating is exactly torch's F.interpolate(scale_factor=2, mode='nearest').
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(x.shape[-1], self.dtype, name="conv")(x)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the timestep, then Linear -> SiLU -> Linear."""

    channels: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    order: str = "cos_sin"
    frequency_shift: float = 0.0

    def setup(self) -> None:
        self.mlp = nn.Sequential([
            nn.Dense(self.embed_dim, dtype=self.dtype),
            nn.silu,
            nn.Dense(self.embed_dim, dtype=self.dtype),
        ])

    def __call__(self, t: Array) -> Array:
        return self.mlp(timestep_embedding(t, self.channels, self.order, self.frequency_shift))


class ResAttnBlock(nn.Module):
    """A ResidualBlock, followed at low resolution by self-attention (and cross-attention with a context).

    In the middle of the U-Net (`middle`) every residual sum is divided by mid_block_scale_factor and
    the self-attention's GroupNorm follows mid_attention_norm.
    """

    out_channels: int
    time_emb_dim: int
    attention: bool
    config: UNetConfig
    middle: bool = False

    def setup(self) -> None:
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        scale = cfg.mid_block_scale_factor if self.middle else 1.0
        heads = cfg.attention_heads(self.out_channels) if self.attention else None
        self.resnet = ResidualBlock(self.out_channels, self.time_emb_dim, cfg.num_groups, cfg.dropout, dtype,
                                    cfg.norm_eps, cfg.time_conditioning, scale, cfg.norm_backward)
        self.attn = None
        self.cross_attn = None
        if self.attention:
            self.attn = AttentionBlock(heads, cfg.num_groups, dtype, cfg.attention_impl, cfg.norm_eps,
                                       cfg.mid_attention_norm or not self.middle, scale, cfg.norm_backward)
            if cfg.context_dim is not None:
                self.cross_attn = CrossAttentionBlock(heads, cfg.num_groups, dtype, cfg.attention_impl,
                                                      cfg.norm_eps, scale, cfg.norm_backward)

    def __call__(self, x: Array, t_emb: Array, context: Array | None, train: bool,
                 shared_dropout_seed: Array | None = None) -> Array:
        x = self.resnet(x, t_emb, train, shared_dropout_seed)
        if self.attn is not None:
            x = self.attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context)
        return x


class UNet(nn.Module):
    """The diffusion U-Net: (B, H, W, in_channels) noisy images and (B,) timesteps -> (B, H, W, out_channels)."""

    config: UNetConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        emb_dim = cfg.time_embed_dim
        # Rematerialise each block in the backward pass when asked: trades compute for memory.
        block = nn.remat(ResAttnBlock, static_argnums=(4,)) if cfg.remat else ResAttnBlock
        encoder, decoder = cfg.block_plan()

        self.time_embed = TimestepEmbedding(cfg.base_channels, emb_dim, dtype, cfg.timestep_embedding_order,
                                            cfg.timestep_frequency_shift)
        if cfg.num_classes is not None:
            self.label_embedding = nn.Embed(cfg.num_label_embeddings, emb_dim, dtype=dtype)
        self.conv_in = conv3x3(cfg.base_channels, dtype)
        self.down_blocks = [block(s.out_channels, emb_dim, s.attention, cfg) for level in encoder for s in level]
        self.downsamples = [Downsample(dtype, cfg.downsample_padding) for _ in range(cfg.num_levels - 1)]
        mid_channels = encoder[-1][-1].out_channels
        self.mid_block1 = block(mid_channels, emb_dim, cfg.mid_attention, cfg, True)
        self.mid_block2 = block(mid_channels, emb_dim, False, cfg, True)
        self.up_blocks = [block(s.out_channels, emb_dim, s.attention, cfg) for level in decoder for s in level]
        self.upsamples = [Upsample(dtype) for _ in range(cfg.num_levels - 1)]
        self.norm_out = group_norm(cfg.num_groups, cfg.norm_eps, dtype, cfg.norm_backward)
        self.conv_out = conv3x3(cfg.out_channels, dtype)

    def __call__(self, x: Array, t: Array, y: Array | None = None, context: Array | None = None,
                 train: bool = False) -> Array:
        cfg = self.config
        t = self._check_inputs(x, t, y, context)
        if cfg.center_input:
            x = 2 * x - 1.0

        emb = self.time_embed(t)
        if cfg.num_classes is not None:
            # No label means unconditional: the extra null label, as trained for classifier-free guidance.
            labels = jnp.full(x.shape[:1], cfg.num_classes, jnp.int32) if y is None else y
            emb = emb + self.label_embedding(labels)

        # One key for all the blocks' dropout (GroupNorm's shared_dropout_seed).
        seed = dropout_seed(self.make_rng("dropout")) if train and cfg.dropout > 0 else None
        h = self.conv_in(x)
        skips = [h]
        down_blocks = iter(self.down_blocks)
        for level in range(cfg.num_levels):
            for _ in range(cfg.num_res_blocks):
                h = next(down_blocks)(h, emb, context, train, seed)
                skips.append(h)
            if level != cfg.num_levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block1(h, emb, context, train, seed)
        h = self.mid_block2(h, emb, context, train, seed)

        up_blocks = iter(self.up_blocks)
        for i, level in enumerate(reversed(range(cfg.num_levels))):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(up_blocks)(jnp.concatenate([h, skips.pop()], axis=-1), emb, context, train, seed)
            if level != 0:
                h = self.upsamples[i](h)

        h = self.conv_out(self.norm_out(h, activation=nn.silu))
        return h.astype(jnp.float32)

    def _check_inputs(self, x: Array, t: Array, y: Array | None, context: Array | None) -> Array:
        """Fail at trace time, naming the bad value, on what would otherwise fail deep inside."""
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (batch, height, width, {cfg.in_channels}), got shape {x.shape}")
        if x.shape[-1] != cfg.in_channels:
            hint = " (it looks like NCHW: use x.transpose(0, 2, 3, 1))" if x.shape[1] == cfg.in_channels else ""
            raise ValueError(
                f"x has {x.shape[-1]} channels in its last axis, expected in_channels={cfg.in_channels}: "
                f"the U-Net takes NHWC, got shape {x.shape}{hint}")
        for axis, size in (("height", x.shape[1]), ("width", x.shape[2])):
            if size % cfg.downsample_factor:
                raise ValueError(f"input {axis} {size} is not divisible by 2**(levels-1) = "
                                 f"{cfg.downsample_factor} for channel_mults={cfg.channel_mults}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, x.shape[:1])
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {t.shape}")
        if y is None and cfg.num_classes is not None and not cfg.null_label:
            raise ValueError(f"the model has num_classes={cfg.num_classes} and no null label "
                             f"(null_label=False): pass labels y of shape ({x.shape[0]},)")
        if y is not None:
            if cfg.num_classes is None:
                raise ValueError("labels y were given, but the model has num_classes=None (unconditional)")
            if jnp.shape(y) != x.shape[:1]:
                raise ValueError(f"labels y must have shape ({x.shape[0]},), got {jnp.shape(y)}")
            if not isinstance(y, jax.core.Tracer):  # a traced label can only be checked by its caller
                labels = np.asarray(y)
                bad = labels[(labels < 0) | (labels >= cfg.num_label_embeddings)]
                if bad.size:
                    null = f", and {cfg.num_classes} is the null label" if cfg.null_label else ""
                    raise ValueError(f"label {bad[0]} out of range: labels are 0..{cfg.num_classes - 1}{null}")
        if context is not None and cfg.context_dim is None:
            raise ValueError("context was given, but the model has context_dim=None (no cross-attention)")
        if cfg.context_dim is not None:
            if context is None:
                raise ValueError(f"the model has context_dim={cfg.context_dim}: pass context of shape "
                                 f"(batch, length, {cfg.context_dim})")
            if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
                raise ValueError(f"context must have shape (batch, length, {cfg.context_dim}), "
                                 f"got {context.shape}")
        return t


# -- initialisation ------------------------------------------------------------------------------

def example_inputs(model: UNetConfig, batch_size: int = 1) -> tuple:
    """Zeros shaped as the U-Net's inputs (x, t, y), to initialise it or trace it."""
    x = jnp.zeros((batch_size, model.image_size, model.image_size, model.in_channels), jnp.float32)
    y = None if model.num_classes is None else jnp.zeros((batch_size,), jnp.int32)
    return x, jnp.zeros((batch_size,), jnp.int32), y


# The parameters of the modules that hold one of these (flax's Conv, Dense, Embed) are cast to the module's
# dtype before use; GroupNorm's scale and bias are read in float32, where it normalises.
CAST_BY_THEIR_MODULE = ("kernel", "embedding")


def compute_dtype_params(params: Any, dtype: Dtype) -> Any:
    """`params` as the U-Net's layers read them when it computes in `dtype`: the parameters of its convolutions,
    dense layers and label embedding cast to `dtype`, GroupNorm's left float32. The U-Net computes the same from
    either tree, and its gradient with respect to a cast leaf, cast back to float32, is the float32 leaf's."""
    casts = {path[:-1] for path in flax.traverse_util.flatten_dict(params) if path[-1] in CAST_BY_THEIR_MODULE}
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.astype(dtype) if tuple(key.key for key in path[:-1]) in casts else leaf, params)


def init_params(model: UNetConfig, rng: jax.Array) -> Any:
    """The U-Net's initial parameters, from one compiled program: run op by op, Flax's init compiles
    each of its hundreds of small operations apart (25 s of a tiny run's start on a 2-core CPU)."""
    if isinstance(rng, jax.core.Tracer):  # traced (eval_shape, a caller's jit): part of that program
        return _init(model, rng)
    return _init_program(jax.default_backend())(model, rng)


@functools.cache
def _init_program(backend: str) -> Callable[[UNetConfig, jax.Array], Any]:
    # The program is one threefry expansion per parameter and runs once: LLVM's optimisations take
    # XLA:CPU 30 s on it for nothing (5 s without them, on a 2-core CPU without AVX-512).
    options = {"xla_backend_optimization_level": 0} if backend == "cpu" else None
    return jax.jit(_init, static_argnums=0, compiler_options=options)


def _init(model: UNetConfig, rng: jax.Array) -> Any:
    return UNet(model).init(rng, *example_inputs(model))["params"]


def param_shapes(model: UNetConfig) -> Any:
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves), computing nothing."""
    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
