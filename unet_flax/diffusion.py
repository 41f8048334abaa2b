"""Diffusion math as pure functions of arrays: schedules, the forward process, the loss, DDIM's timesteps
(the samplers are in samplers.py).

Randomness is always an argument (t, noise, keys), so a test can hand the PyTorch side the very
same draws. Schedules are computed in float64 with numpy and stored as float32.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# DDPM's linear betas, first and last, at T = 1000; the linear schedule scales them by 1000 / T.
DDPM_BETAS = (1e-4, 0.02)

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]  # (x_t, t) -> model output


def check_sampling_steps(num_steps: int, timesteps: int) -> None:
    """A sampler visits at most every one of the model's training timesteps."""
    if not 1 <= num_steps <= timesteps:
        raise ConfigError(f"sampling_steps must be in 1..{timesteps} (the model's timesteps), got {num_steps}")


def from_uint8(images):
    """uint8 pixels -> float32 in [-1, 1], the range diffusion runs in (numpy or JAX arrays)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """[-1, 1] -> uint8 pixels, rounded and clipped, on the host; NaN as black, +-inf as white and black."""
    images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def beta_schedule(name: str, timesteps: int = 1000) -> np.ndarray:
    """float64 betas: 'linear' (DDPM, 1e-4..0.02 at T=1000) or 'cosine' (improved DDPM)."""
    if name == "linear":
        scale = 1000 / timesteps
        return np.linspace(scale * DDPM_BETAS[0], scale * DDPM_BETAS[1], timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        alphas_cumprod = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


@flax.struct.dataclass
class Schedule:
    betas: Array
    alphas_cumprod: Array

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str = "linear", timesteps: int = 1000) -> Schedule:
    betas = beta_schedule(name, timesteps)
    return Schedule(betas=jnp.asarray(betas, jnp.float32),
                    alphas_cumprod=jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def _gather(values: Array, t: Array, ndim: int) -> Array:
    """values[t] shaped to broadcast against a (B, ...) array of rank ndim."""
    return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    abar = _gather(schedule.alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def training_target(schedule: Schedule, x0: Array, t: Array, noise: Array, prediction: str) -> Array:
    if prediction == "epsilon":
        return noise
    if prediction == "v":  # v = sqrt(abar) noise - sqrt(1 - abar) x0
        abar = _gather(schedule.alphas_cumprod, t, x0.ndim)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def loss_weights(schedule: Schedule, t: Array, prediction: str, min_snr_gamma: float | None) -> Array:
    """Min-SNR-gamma weights (Hang et al. 2023), expressed for the chosen target; ones if None."""
    if min_snr_gamma is None:
        return jnp.ones(t.shape, jnp.float32)
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    clipped = jnp.minimum(snr, min_snr_gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def diffusion_loss(denoise: Denoiser, schedule: Schedule, x0: Array, t: Array, noise: Array,
                   prediction: str = "epsilon", min_snr_gamma: float | None = None) -> Array:
    """Weighted MSE between the model's output on x_t and the target, averaged over the batch."""
    x_t = q_sample(schedule, x0, t, noise)
    output = denoise(x_t, t).astype(jnp.float32)
    target = training_target(schedule, x0, t, noise, prediction)
    per_example = jnp.mean(jnp.square(output - target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_example * loss_weights(schedule, t, prediction, min_snr_gamma))


def sampling_timesteps(timesteps: int, num_steps: int, spacing: str = "linspace") -> tuple[np.ndarray, np.ndarray]:
    """The timesteps a sampler visits, from high to low, and the timestep each one steps to (-1: the
    clean image, abar = 1).

    linspace: num_steps evenly spaced from T-1 to 0 (all T when num_steps == T), each stepping to
    the next. leading and trailing: diffusers' DDIMScheduler (steps_offset 0, set_alpha_to_one),
    k * (T // n) for k = n-1 .. 0, or round(T - k T / n) - 1 for k = 0 .. n-1, each stepping to
    t - T // n as diffusers' step does.
    """
    check_sampling_steps(num_steps, timesteps)
    if spacing == "linspace":
        steps = np.round(np.linspace(timesteps - 1, 0, num_steps)).astype(np.int32)
        return steps, np.append(steps[1:], -1).astype(np.int32)
    if spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (timesteps // num_steps)
    elif spacing == "trailing":
        steps = np.round(np.arange(timesteps, 0, -timesteps / num_steps)) - 1
    else:
        raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    steps = steps.astype(np.int32)
    return steps, np.maximum(steps - timesteps // num_steps, -1).astype(np.int32)

