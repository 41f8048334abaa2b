"""Schedules, the forward process and the samplers, checked against their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_flax import diffusion, samplers
from unet_flax.config import SamplerConfig


def test_linear_schedule_is_ddpm():
    betas = diffusion.beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000


def test_cosine_schedule():
    betas = diffusion.beta_schedule("cosine", 1000)
    abar = np.cumprod(1 - betas)
    assert np.all(np.diff(abar) < 0) and abar[0] > 0.999 and abar[-1] < 1e-4 and betas.max() <= 0.999


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule must be one of .* got 'quadratic'"):
        diffusion.beta_schedule("quadratic")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_target_inverts_to_x0(prediction):
    schedule = diffusion.make_schedule("cosine", 1000)
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(key1, (4, 5, 3, 2), minval=-1, maxval=1)
    noise = jax.random.normal(key2, x0.shape)
    t = jnp.array([0, 10, 500, 990])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    target = diffusion.training_target(schedule, x0, t, noise, prediction)
    abar = schedule.alphas_cumprod[t][:, None, None, None]
    if prediction == "epsilon":
        x0_hat = (x_t - jnp.sqrt(1 - abar) * target) / jnp.sqrt(abar)
    else:
        x0_hat = jnp.sqrt(abar) * x_t - jnp.sqrt(1 - abar) * target
    np.testing.assert_allclose(x0_hat[:3], x0[:3], atol=2e-4)  # at t=990 x0 is barely in x_t


def test_min_snr_weights():
    schedule = diffusion.make_schedule("linear", 1000)
    t = jnp.arange(0, 1000, 50)
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    eps_w = diffusion.loss_weights(schedule, t, "epsilon", 5.0)
    np.testing.assert_allclose(eps_w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    assert np.all(np.asarray(diffusion.loss_weights(schedule, t, "v", None)) == 1)


ORACLE_SAMPLERS = [(SamplerConfig("ddim"), 20), (SamplerConfig("ddim", eta=1.0), 7), (SamplerConfig("ddpm"), 1),
                   (SamplerConfig("dpm_solver", solver_order=3), 9),
                   (SamplerConfig("dpm_solver", algorithm_type="sde-dpmsolver++"), 6),
                   (SamplerConfig("euler", timestep_spacing="trailing"), 5), (SamplerConfig("euler_ancestral"), 8),
                   (SamplerConfig("heun"), 4), (SamplerConfig("unipc", solver_order=3), 7)]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler,steps", ORACLE_SAMPLERS, ids=lambda v: getattr(v, "sampler", v))
def test_samplers_with_an_oracle_return_the_data(sampler, steps, prediction):
    """A denoiser that knows x0 makes every step of every sampler land on x0's path (each prediction is
    x0, so what a multistep method extrapolates is constant): the result is x0. The oracle reads the
    noise level of a fractional timestep as the Euler samplers do, by interpolating sigma."""
    timesteps = 1000
    sigmas = np.sqrt(1 / np.cumprod(1 - diffusion.beta_schedule("linear", timesteps)) - 1)
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 1), minval=-0.9, maxval=0.9)

    def oracle(x_t, t):
        sigma = jnp.interp(t, jnp.arange(timesteps, dtype=jnp.float32), jnp.asarray(sigmas, jnp.float32))
        abar = (1 / (1 + sigma**2))[:, None, None, None]
        noise = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
        return noise if prediction == "epsilon" else jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0

    plan = samplers.make_plan(sampler, steps, "linear", timesteps, prediction)
    x_T = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    out = jax.jit(lambda plan, x, k: samplers.run(oracle, plan, x, k if plan.stochastic else None))(
        plan, x_T, jax.random.PRNGKey(3))
    np.testing.assert_allclose(out, x0, atol=1e-4)


def test_sampling_steps_out_of_range():
    with pytest.raises(ValueError, match=r"sampling_steps must be in 1..1000 \(the model's timesteps\), got 0"):
        diffusion.sampling_timesteps(1000, 0)


def test_uint8_pixels_round_clip_and_map_nonfinite_values():
    images = np.array([-1.0, -0.999, 0.0, 1.0, 1.5, -7.0, np.nan, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(diffusion.to_uint8(images), [0, 0, 128, 255, 255, 0, 0, 255, 0])
    pixels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(diffusion.to_uint8(diffusion.from_uint8(pixels)), pixels)  # a round trip
