"""Generating images from a trained UNet: classifier-free guidance around the diffusion sampler."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import diffusion
from .config import UNetConfig
from .model import UNet


def guided_denoiser(model: UNet, params, labels: jax.Array | None, guidance_scale: float,
                    context: jax.Array | None = None) -> diffusion.Denoiser:
    """The model as (x_t, t) -> output; with labels and scale != 1, guided by the null label:
    uncond + scale * (cond - uncond), both halves in one batched call."""
    num_classes = model.config.num_classes
    if labels is None or num_classes is None or guidance_scale == 1.0:
        return lambda x, t: model.apply({"params": params}, x, t, labels, context)

    def denoise(x, t):
        both_labels = jnp.concatenate([labels, jnp.full_like(labels, num_classes)])
        both_context = None if context is None else jnp.concatenate([context, context])
        out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          both_labels, both_context)
        cond, uncond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)
    return denoise


@functools.partial(jax.jit, static_argnames=("model_config", "shape", "num_steps", "guidance_scale", "schedule_name",
                                             "timesteps", "prediction"))
def generate(params, key: jax.Array, labels: jax.Array | None, *, model_config: UNetConfig,
             shape: tuple[int, ...], num_steps: int, eta: float = 0.0, guidance_scale: float = 1.0,
             schedule_name: str = "linear", timesteps: int = 1000, prediction: str = "epsilon") -> jax.Array:
    """Samples in [-1, 1], NHWC, from noise drawn with `key`: the same key gives the same images."""
    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape, jnp.float32)
    denoise = guided_denoiser(UNet(model_config), params, labels, guidance_scale)
    schedule = diffusion.make_schedule(schedule_name, timesteps)
    return diffusion.sample(denoise, schedule, x_T, step_key, num_steps, eta, prediction)
