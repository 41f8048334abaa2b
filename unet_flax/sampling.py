"""Generating images from a trained UNet: classifier-free guidance around the diffusion sampler."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tqdm import tqdm

from . import diffusion
from .input_pipeline import to_uint8
from .model import UNet
from .train_config import TrainConfig
from .unet_config import ConfigError, UNetConfig


def for_this_backend(model: UNetConfig) -> UNetConfig:
    """A saved model config set to sample here, whatever it was trained with: float32 on the CPU (no
    fast bf16 there), the attention this backend runs best, no remat. Weights do not depend on these."""
    dtype = "float32" if jax.default_backend() == "cpu" else model.dtype
    return dataclasses.replace(model, dtype=dtype, attention_impl="auto", remat=False)


def guidance_scale_for(config: TrainConfig, requested: float | None) -> float:
    """The guidance scale to sample with: the requested one, else the training config's. A model
    without a null label (as imported from diffusers) has no unconditional half to guide against."""
    scale = config.guidance_scale if requested is None else requested
    model = config.model
    if scale != 1.0 and model.num_classes is not None and not model.null_label:
        raise ConfigError(f"guidance scale {scale} needs the null label, and this model has none "
                          f"(null_label=False): use --guidance-scale 1")
    return scale


def guided_denoiser(model: UNet, params, labels: jax.Array | None, guidance_scale: float,
                    context: jax.Array | None = None) -> diffusion.Denoiser:
    """The model as (x_t, t) -> output; with labels and scale != 1, guided by the null label:
    uncond + scale * (cond - uncond), both halves in one batched call."""
    num_classes = model.config.num_classes
    if labels is None or num_classes is None or guidance_scale == 1.0:
        return lambda x, t: model.apply({"params": params}, x, t, labels, context)
    if not model.config.null_label:
        raise ValueError(f"guidance_scale {guidance_scale} needs the null label, and the model has "
                         f"null_label=False: sample with guidance_scale 1")

    def pairs(a: jax.Array, b: jax.Array) -> jax.Array:
        # Example i's two halves at rows 2i and 2i+1: a batch sharded over devices keeps each pair on one.
        return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])

    def denoise(x, t):
        both_context = None if context is None else pairs(context, context)
        out = model.apply({"params": params}, pairs(x, x), pairs(t, t),
                          pairs(labels, jnp.full_like(labels, num_classes)), both_context)
        out = out.reshape(x.shape[0], 2, *out.shape[1:])
        cond, uncond = out[:, 0], out[:, 1]
        return uncond + guidance_scale * (cond - uncond)
    return denoise


def rows_per_class(num_classes: int, num_samples: int) -> tuple[np.ndarray, int]:
    """Labels that lay `num_samples` out as a grid with one row per class (class k fills row k, the
    last rows may be short), and the row length."""
    per_class = -(-num_samples // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)[:num_samples], per_class


@functools.partial(jax.jit, static_argnames=("model_config", "shape", "num_steps", "guidance_scale", "schedule_name",
                                             "timesteps", "prediction", "timestep_spacing",
                                             "batch_sharding"))
def generate(params, key: jax.Array, labels: jax.Array | None, *, model_config: UNetConfig,
             shape: tuple[int, ...], num_steps: int, eta: float = 0.0, guidance_scale: float = 1.0,
             schedule_name: str = "linear", timesteps: int = 1000, prediction: str = "epsilon",
             timestep_spacing: str = "linspace", batch_sharding: NamedSharding | None = None) -> jax.Array:
    """Samples in [-1, 1], NHWC, from noise drawn with `key`: the same key gives the same images.

    With `batch_sharding` the batch is split over its devices (XLA partitions the whole loop)."""
    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    denoise = guided_denoiser(UNet(model_config), params, labels, guidance_scale)
    schedule = diffusion.make_schedule(schedule_name, timesteps)
    return diffusion.sample(denoise, schedule, x_T, step_key, num_steps, eta, prediction, timestep_spacing)


def sample_images(params, config, num_samples: int, labels: np.ndarray | None, num_steps: int, eta: float,
                  guidance_scale: float, seed: int, batch_size: int, progress: bool = False,
                  timestep_spacing: str = "linspace") -> np.ndarray:
    """`num_samples` uint8 NHWC images from a TrainConfig's model, in batches; batch i draws from
    fold_in(PRNGKey(seed), i * batch_size), so a seed always gives the same images."""
    m = config.model
    images = []
    starts = range(0, num_samples, batch_size)
    devices = jax.local_device_count()  # this process's own: in a multi-host job one process samples
    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    if devices > 1:
        params = jax.device_put(params, NamedSharding(mesh, P()))
    for start in tqdm(starts, unit="batch", disable=not progress or len(starts) == 1):
        count = min(batch_size, num_samples - start)
        # Spread the batch over the devices where it divides evenly; the images do not change.
        sharding = NamedSharding(mesh, P("data")) if devices > 1 and count % devices == 0 else None
        batch_labels = None if labels is None else jnp.asarray(labels[start:start + count])
        out = generate(params, jax.random.fold_in(jax.random.PRNGKey(seed), start), batch_labels, model_config=m,
                       shape=(count, m.image_size, m.image_size, m.in_channels), num_steps=num_steps, eta=eta,
                       guidance_scale=guidance_scale, schedule_name=config.noise_schedule,
                       timesteps=config.timesteps, prediction=config.prediction,
                       timestep_spacing=timestep_spacing, batch_sharding=sharding)
        images.append(to_uint8(out))
    return np.concatenate(images)
