"""The PyTorch reference, NCHW.

`ResidualBlock` and `AttentionBlock` are the user's seed code, line for line (plus arguments for
groups, dropout, epsilon and diffusers' variants, whose defaults reproduce it exactly). The rest of the U-Net is built
around them module for module as `model.py` builds the Flax one, from the same `UNetConfig`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config.unet_config import UNetConfig, check_divisible, timestep_frequencies
from .diffusion import beta_schedule, sampling_timesteps


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_emb_dim=None, num_groups=32, dropout=0.0, eps=1e-5,
                 time_conditioning="scale_shift", output_scale=1.0):
        super().__init__()
        self.time_conditioning = time_conditioning
        self.output_scale = output_scale
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        # Optional time embedding projection
        self.time_mlp = None
        if time_emb_dim is not None:
            self.time_mlp = nn.Sequential(
                nn.SiLU(),
                # For scale and shift (or one added term)
                nn.Linear(time_emb_dim, out_channels * (2 if time_conditioning == "scale_shift" else 1))
            )
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.activation = nn.SiLU()  # Swish activation is common
        self.dropout = nn.Dropout(dropout)
        # Skip connection matching
        if in_channels != out_channels:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x, t_emb=None):
        residual = x
        h = self.norm1(x)
        h = self.activation(h)
        h = self.conv1(h)
        if self.time_mlp is not None and t_emb is not None and self.time_conditioning == "additive":
            h = self.norm2(h + self.time_mlp(t_emb)[:, :, None, None])
        elif self.time_mlp is not None and t_emb is not None:
            time_encoding = self.time_mlp(t_emb)
            time_encoding = time_encoding.view(h.shape[0], h.shape[1] * 2, 1, 1)
            scale, shift = torch.chunk(time_encoding, 2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift  # Modulate features
        else:
            h = self.norm2(h)  # Apply norm if no time embedding modulation
        h = self.activation(h)
        h = self.dropout(h)
        h = self.conv2(h)
        return (h + self.skip_connection(residual)) / self.output_scale


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=8, num_groups=32, eps=1e-5, normalize=True, output_scale=1.0):
        super().__init__()
        check_divisible(channels, num_heads, "num_heads")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.output_scale = output_scale
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps) if normalize else nn.Identity()
        # Query, Key, Value projections
        self.to_qkv = nn.Conv2d(channels, channels * 3, kernel_size=1)
        # Output projection
        self.to_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        residual = x
        qkv = self.to_qkv(self.norm(x))
        # (b, c, h, w) -> (b*num_heads, head_dim, h*w)
        q, k, v = qkv.chunk(3, dim=1)
        q = q.reshape(b * self.num_heads, self.head_dim, h * w)
        k = k.reshape(b * self.num_heads, self.head_dim, h * w)
        v = v.reshape(b * self.num_heads, self.head_dim, h * w)
        # (b*num_heads, h*w, head_dim) @ (b*num_heads, head_dim, h*w) -> (b*num_heads, h*w, h*w)
        attention_scores = torch.bmm(q.transpose(1, 2), k) * self.scale
        attention_probs = F.softmax(attention_scores, dim=-1)
        # (b*num_heads, h*w, h*w) @ (b*num_heads, h*w, head_dim) -> (b*num_heads, h*w, head_dim)
        out = torch.bmm(attention_probs, v.transpose(1, 2))
        # (b*num_heads, h*w, head_dim) -> (b, c, h, w)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        out = self.to_out(out)
        return (out + residual) / self.output_scale  # Add residual connection


class CrossAttentionBlock(nn.Module):
    """AttentionBlock with keys and values from a (B, L, context_dim) context instead of the image."""

    def __init__(self, channels, context_dim, num_heads=8, num_groups=32, eps=1e-5, output_scale=1.0):
        super().__init__()
        check_divisible(channels, num_heads, "num_heads")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.output_scale = output_scale
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.to_q = nn.Conv2d(channels, channels, kernel_size=1)
        self.to_kv = nn.Linear(context_dim, channels * 2)
        self.to_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        length = context.shape[1]
        residual = x
        q = self.to_q(self.norm(x)).reshape(b * self.num_heads, self.head_dim, h * w)
        # (b, L, c) -> (b, c, L) -> (b*num_heads, head_dim, L): the same head split as the queries
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.transpose(1, 2).reshape(b * self.num_heads, self.head_dim, length)
        v = v.transpose(1, 2).reshape(b * self.num_heads, self.head_dim, length)
        attention_scores = torch.bmm(q.transpose(1, 2), k) * self.scale
        attention_probs = F.softmax(attention_scores, dim=-1)
        out = torch.bmm(attention_probs, v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        out = self.to_out(out)
        return (out + residual) / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels, padding="symmetric"):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1 if padding == "symmetric" else 0)

    def forward(self, x):
        if self.padding == "bottom_right":
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def timestep_embedding(t, dim, order="cos_sin", shift=0.0):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, [cos, sin] or [sin, cos]."""
    freqs = torch.from_numpy(timestep_frequencies(dim, shift)).to(t.device)
    args = t.float()[:, None] * freqs[None, :]
    waves = [torch.cos(args), torch.sin(args)]
    embedding = torch.cat(waves if order == "cos_sin" else waves[::-1], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, channels, embed_dim, order="cos_sin", frequency_shift=0.0):
        super().__init__()
        self.channels, self.order, self.frequency_shift = channels, order, frequency_shift
        self.mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.channels, self.order, self.frequency_shift))


class ResAttnBlock(nn.Module):
    def __init__(self, in_channels, out_channels, time_emb_dim, attention, config: UNetConfig, middle=False):
        super().__init__()
        cfg = config
        scale = cfg.mid_block_scale_factor if middle else 1.0
        self.resnet = ResidualBlock(in_channels, out_channels, time_emb_dim, cfg.num_groups, cfg.dropout,
                                    cfg.norm_eps, cfg.time_conditioning, scale)
        self.attn = None
        self.cross_attn = None
        if attention:
            heads = cfg.attention_heads(out_channels)
            self.attn = AttentionBlock(out_channels, heads, cfg.num_groups, cfg.norm_eps,
                                       cfg.mid_attention_norm or not middle, scale)
            if cfg.context_dim is not None:
                self.cross_attn = CrossAttentionBlock(out_channels, cfg.context_dim, heads, cfg.num_groups,
                                                      cfg.norm_eps, scale)

    def forward(self, x, t_emb, context=None):
        x = self.resnet(x, t_emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.time_embed_dim
        encoder, decoder = cfg.block_plan()

        self.time_embed = TimestepEmbedding(cfg.base_channels, emb_dim, cfg.timestep_embedding_order,
                                            cfg.timestep_frequency_shift)
        if cfg.num_classes is not None:
            self.label_embedding = nn.Embedding(cfg.num_label_embeddings, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResAttnBlock(s.in_channels, s.out_channels, emb_dim, s.attention, cfg) for level in encoder for s in level)
        self.downsamples = nn.ModuleList(
            Downsample(level[-1].out_channels, cfg.downsample_padding) for level in encoder[:-1])
        mid_channels = encoder[-1][-1].out_channels
        self.mid_block1 = ResAttnBlock(mid_channels, mid_channels, emb_dim, cfg.mid_attention, cfg, middle=True)
        self.mid_block2 = ResAttnBlock(mid_channels, mid_channels, emb_dim, False, cfg, middle=True)
        self.up_blocks = nn.ModuleList(
            ResAttnBlock(s.in_channels, s.out_channels, emb_dim, s.attention, cfg) for level in decoder for s in level)
        self.upsamples = nn.ModuleList(Upsample(level[-1].out_channels) for level in decoder[:-1])
        self.norm_out = nn.GroupNorm(cfg.num_groups, cfg.base_channels * cfg.channel_mults[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cfg.base_channels * cfg.channel_mults[0], cfg.out_channels, kernel_size=3,
                                  padding=1)

    def forward(self, x, t, y=None, context=None):
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)
        if cfg.num_classes is not None:
            labels = torch.full((x.shape[0],), cfg.num_classes, device=x.device) if y is None else y
            emb = emb + self.label_embedding(labels)
        if cfg.center_input:
            x = 2 * x - 1.0

        h = self.conv_in(x)
        skips = [h]
        down_blocks = iter(self.down_blocks)
        for level in range(cfg.num_levels):
            for _ in range(cfg.num_res_blocks):
                h = next(down_blocks)(h, emb, context)
                skips.append(h)
            if level != cfg.num_levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block1(h, emb, context)
        h = self.mid_block2(h, emb, context)

        up_blocks = iter(self.up_blocks)
        for i, level in enumerate(reversed(range(cfg.num_levels))):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(up_blocks)(torch.cat([h, skips.pop()], dim=1), emb, context)
            if level != 0:
                h = self.upsamples[i](h)

        return self.conv_out(F.silu(self.norm_out(h)))


# -- diffusion, the same math as diffusion.py, for training and sampling the reference ------------

def alphas_cumprod(schedule: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """The very float32 values diffusion.make_schedule holds: both come from one float64 schedule."""
    return torch.from_numpy(np.cumprod(1 - beta_schedule(schedule, timesteps)).astype(np.float32))


def q_sample(abar, x0, t, noise):
    abar_t = abar[t].view(-1, *([1] * (x0.ndim - 1)))
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def diffusion_loss(model, abar, x0, t, noise, y=None, context=None, prediction="epsilon", min_snr_gamma=None):
    """MSE to the epsilon or v target, Min-SNR-gamma weighted where gamma is given, averaged over the batch
    (diffusion.diffusion_loss)."""
    output = model(q_sample(abar, x0, t, noise), t, y, context)
    abar_t = abar[t].view(-1, *([1] * (x0.ndim - 1)))
    target = noise if prediction == "epsilon" else abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x0
    per_example = ((output.float() - target) ** 2).flatten(1).mean(1)
    if min_snr_gamma is None:
        return per_example.mean()
    snr = abar[t] / (1 - abar[t])
    clipped = snr.clamp(max=min_snr_gamma)
    return (per_example * (clipped / snr if prediction == "epsilon" else clipped / (snr + 1))).mean()


def _x0_and_noise(abar_t, x_t, output, prediction):
    if prediction == "epsilon":
        x0 = (x_t - (1 - abar_t).sqrt() * output) / abar_t.sqrt()
    else:
        x0 = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * output
    x0 = x0.clamp(-1.0, 1.0)
    return x0, (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()


@torch.no_grad()
def ddim_sample(model, abar, x_T, num_steps, y=None, context=None, prediction="epsilon", guidance_scale=1.0,
                timestep_spacing="linspace"):
    """Deterministic DDIM (eta = 0) from x_T, step for step diffusion.sample; guidance as sampling.py."""
    steps, previous = sampling_timesteps(abar.shape[0], num_steps, timestep_spacing)
    x = x_T
    for t, t_prev in zip(steps.tolist(), previous.tolist()):
        batch_t = torch.full((x.shape[0],), t, dtype=torch.long)
        if y is not None and model.config.num_classes is not None and guidance_scale != 1.0:
            null = torch.full_like(y, model.config.num_classes)
            both = model(torch.cat([x, x]), torch.cat([batch_t, batch_t]), torch.cat([y, null]),
                         None if context is None else torch.cat([context, context]))
            cond, uncond = both.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        else:
            output = model(x, batch_t, y, context)
        x0, noise = _x0_and_noise(abar[t], x, output, prediction)
        abar_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * noise
    return x


def load_numpy_state_dict(module: nn.Module, arrays) -> nn.Module:
    """Load `convert.flax_to_torch`'s numpy arrays into `module`, strictly (every key, every shape)."""
    module.load_state_dict({key: torch.tensor(value) for key, value in arrays.items()}, strict=True)
    return module
