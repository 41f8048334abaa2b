"""Generating images from a trained UNet: classifier-free guidance around a sampler (samplers.py).

    samples = sample_from_checkpoint("runs/digits", SamplingConfig(labels=(3, 7), guidance_scale=3.0))
    samples.images  # uint8 NHWC
    sample_from_checkpoint("runs/digits", SamplingConfig(sampler=SamplerConfig("dpm_solver"), sampling_steps=10))

`sample(params, train_config, sampling_config)` does the same for weights in hand (train.py's grids).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from . import diffusion, samplers
from .checkpoint import load_params
from .config import SamplerConfig, SamplingConfig, TrainConfig, UNetConfig
from .config.sampler_config import READ_BY
from .config.unet_config import compute_dtype
from .errors import ConfigError
from .model import UNet, compute_dtype_params
from .parallel import DATA_AXIS, data_mesh


@dataclasses.dataclass(frozen=True)
class Samples:
    images: np.ndarray  # uint8, NHWC
    labels: np.ndarray | None  # the class of each image; None for an unconditional model
    columns: int | None  # a grid's row length: one row per class when no labels were asked for
    config: TrainConfig  # the model's
    settings: dict[str, Any]  # what was sampled, as a report shows it


def for_this_backend(model: UNetConfig) -> UNetConfig:
    """A saved model config set to sample here, whatever it was trained with: float32 on the CPU (no
    fast bf16 there), the attention this backend runs best, no remat. Weights do not depend on these."""
    return dataclasses.replace(model, dtype=compute_dtype(jax.default_backend(), model.dtype), attention_impl="auto",
                               remat=False)


def sample_from_checkpoint(workdir: str | Path, sampling: SamplingConfig, progress: bool = False) -> Samples:
    """Samples from a workdir's checkpoint (sampling.step, else the latest), as `sample` makes them."""
    params, config, step = load_params(workdir, sampling.step, sampling.ema)
    samples = sample(params, TrainConfig.from_dict(config), sampling, progress)
    return dataclasses.replace(samples, settings={"workdir": str(workdir), "step": step, **samples.settings})


def sample(params: Any, config: TrainConfig, sampling: SamplingConfig, progress: bool = False) -> Samples:
    """`sampling.num_samples` images from `config`'s model with these weights. Batch i draws from
    fold_in(PRNGKey(seed), i * batch_size), so a seed gives the same images whatever the devices."""
    model = for_this_backend(config.model)
    sampler = sampling.sampler or config.sampler
    plan = samplers.make_plan(sampler, sampling.sampling_steps, config.noise_schedule, config.timesteps,
                              config.prediction)
    labels, columns = class_labels(sampling, model.num_classes)
    guidance = config.guidance_scale if sampling.guidance_scale is None else sampling.guidance_scale
    if labels is not None:
        model.require_null_label("guidance_scale", guidance, 1.0)
    config = dataclasses.replace(config, model=model)
    images = _generate_in_batches(params, config, labels, plan, guidance_scale=guidance, sampling=sampling,
                                  progress=progress)
    settings = {"num_samples": len(images), **_sampler_settings(sampler), "model_evaluations": plan.evaluations,
                "sampling_steps": config.timesteps if sampler.sampler == "ddpm" else sampling.sampling_steps,
                "guidance_scale": guidance if labels is not None else None, "seed": sampling.seed,
                "ema": sampling.ema}
    return Samples(images, labels, columns, config, settings)


def _sampler_settings(sampler: SamplerConfig) -> dict[str, Any]:
    """The sampler's name and the settings it reads (SamplerConfig.READ_BY), as a report shows them."""
    return {"sampler": sampler.sampler, **{name: getattr(sampler, name) for name, readers in READ_BY.items()
                                           if sampler.sampler in readers}}


def class_labels(sampling: SamplingConfig, num_classes: int | None) -> tuple[np.ndarray | None, int | None]:
    """The label of each sample, and a grid's row length where every class gets a row."""
    if num_classes is None:
        if sampling.labels is not None:
            raise ConfigError("labels given, but this model is unconditional (trained without class_conditional)")
        return None, None
    if sampling.labels is None:
        return rows_per_class(num_classes, sampling.num_samples)
    bad = [label for label in sampling.labels if not 0 <= label < num_classes]
    if bad:
        raise ConfigError(f"label {bad[0]} out of range: this model has classes 0..{num_classes - 1}")
    return np.resize(np.asarray(sampling.labels, np.int32), sampling.num_samples), None


def guided_denoiser(model: UNet, params, labels: jax.Array | None, guidance_scale: float,
                    context: jax.Array | None = None) -> diffusion.Denoiser:
    """The model as (x_t, t) -> output; with labels and scale != 1, guided by the null label:
    uncond + scale * (cond - uncond), both halves in one batched call."""
    num_classes = model.config.num_classes
    if labels is None or num_classes is None or guidance_scale == 1.0:
        return lambda x, t: model.apply({"params": params}, x, t, labels, context)
    model.config.require_null_label("guidance_scale", guidance_scale, 1.0)

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


@functools.partial(jax.jit, static_argnames=("model_config", "shape", "guidance_scale", "batch_sharding"))
def generate(params, key: jax.Array, labels: jax.Array | None, plan: samplers.Plan, *, model_config: UNetConfig,
             shape: tuple[int, ...], guidance_scale: float = 1.0,
             batch_sharding: NamedSharding | None = None) -> jax.Array:
    """Samples in [-1, 1], NHWC, from noise drawn with `key`, by the sampler `plan` (samplers.make_plan): the
    same key gives the same images. Plans with as many model evaluations share the compiled program.

    With `batch_sharding` the batch is split over its devices (XLA partitions the whole loop)."""
    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    # Cast once, not at each of the loop's model evaluations.
    params = compute_dtype_params(params, model_config.dtype)
    denoise = guided_denoiser(UNet(model_config), params, labels, guidance_scale)
    return samplers.run(denoise, plan, x_T, step_key if plan.stochastic else None)


def _generate_in_batches(params, config: TrainConfig, labels: np.ndarray | None, plan: samplers.Plan, *,
                         guidance_scale: float, sampling: SamplingConfig, progress: bool) -> np.ndarray:
    m = config.model
    images, nonfinite = [], 0
    num_samples, batch_size = sampling.num_samples, sampling.batch_size
    starts = range(0, num_samples, batch_size)
    devices = jax.local_device_count()  # this process's own: in a multi-host job one process samples
    mesh = data_mesh(jax.local_devices())
    if devices > 1:
        params = jax.device_put(params, NamedSharding(mesh, P()))
    for start in tqdm(starts, unit="batch", disable=not progress or len(starts) == 1):
        count = min(batch_size, num_samples - start)
        # Spread the batch over the devices where it divides evenly; the images do not change.
        sharding = NamedSharding(mesh, P(DATA_AXIS)) if devices > 1 and count % devices == 0 else None
        batch_labels = None if labels is None else jnp.asarray(labels[start:start + count])
        out = generate(params, jax.random.fold_in(jax.random.PRNGKey(sampling.seed), start), batch_labels, plan,
                       model_config=m, shape=(count, m.image_size, m.image_size, m.in_channels),
                       guidance_scale=guidance_scale, batch_sharding=sharding)
        out = np.asarray(out)
        nonfinite += int((~np.isfinite(out)).reshape(count, -1).any(axis=1).sum())
        images.append(diffusion.to_uint8(out))
    if nonfinite:
        print(f"warning: {nonfinite} of {num_samples} samples hold NaN or inf (NaN written as black): the "
              "parameters give non-finite outputs, as a diverged run's do", file=sys.stderr)
    return np.concatenate(images)
