"""The samplers against diffusers' schedulers, installed for real: each driven by the same denoiser from the
same x_T (and, for the stochastic ones, the noise diffusers draws, handed to both), over whole runs, both
predictions, odd step counts and one step; scheduler configs in and out; pipelines in and out."""
import dataclasses
import json

import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_solver_module
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from commands import run_main
from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
from parity import randomize_, to_nhwc

from unet_flax import diffusion, samplers
from unet_flax.checkpoint import load_params
from unet_flax.config import SamplerConfig
from unet_flax.config.sampler_config import SCHEDULERS
from unet_flax.diffusers_format import from_diffusers
from unet_flax.diffusers_scheduler import sampler_from_diffusers, scheduler_to_diffusers
from unet_flax.errors import ConfigError
from unet_flax.model import UNet
from unet_flax.sampling import guided_denoiser

# diffusers' schedulers under numpy 2 warn of their own np.array(tensor) calls.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The data: per channel N(mean, 0.5^2). The denoiser is that distribution's exact one (the posterior
# mean of x0 and of the noise) plus a bounded term that depends on x and t, so that a wrong input
# scaling or timestep shows; it reads a fractional timestep's noise level by interpolating sigma.
MEANS, DATA_STD = (0.3, -0.2, 0.1), 0.5


def denoiser(x, t, *, timesteps: int, noise_schedule: str, prediction: str, xp):
    """The same function in torch (xp=torch) and JAX (xp=jnp), on (B, C, H, W) arrays."""
    sigmas = np.sqrt(1 / np.cumprod(1 - diffusion.beta_schedule(noise_schedule, timesteps)) - 1)
    if xp is torch:
        sigma = torch.from_numpy(np.interp(t.numpy(), np.arange(timesteps), sigmas).astype(np.float32))
        means = torch.tensor(MEANS)
    else:
        sigma = jnp.interp(t, jnp.arange(timesteps, dtype=jnp.float32), jnp.asarray(sigmas, jnp.float32))
        means = jnp.asarray(MEANS)
    abar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
    mean, t = means.reshape(1, -1, 1, 1), t.reshape(-1, 1, 1, 1)
    wiggle = 0.05 * xp.tanh(x) * xp.sin(t / 37.0)
    spread = abar * DATA_STD**2 + 1 - abar
    noise = (x - xp.sqrt(abar) * mean) * xp.sqrt(1 - abar) / spread + wiggle
    x0 = mean + xp.sqrt(abar) * DATA_STD**2 * (x - xp.sqrt(abar) * mean) / spread - wiggle
    return noise if prediction == "epsilon" else xp.sqrt(abar) * noise - xp.sqrt(1 - abar) * x0


def diffusers_scheduler(sampler: SamplerConfig, noise_schedule: str, timesteps: int, prediction: str):
    """diffusers' scheduler from the config unet_flax exports, its alphas_cumprod the model's (float64,
    rounded to float32: diffusers' own, a float32 cumulative product, is up to 6e-5 from it at the
    end of the linear schedule, and moves one Euler step from sigma_max by 1.3e-4 of max|x|)."""
    fields = scheduler_to_diffusers(sampler, noise_schedule, timesteps, prediction)
    scheduler = getattr(diffusers, fields["_class_name"]).from_config(fields)
    scheduler.alphas_cumprod = torch.from_numpy(
        np.cumprod(1 - diffusion.beta_schedule(noise_schedule, timesteps)).astype(np.float32))
    return scheduler


def diffusers_run(scheduler, num_steps: int, x_T: torch.Tensor, model) -> tuple[np.ndarray, float]:
    """diffusers' sampling loop, as its Stable Diffusion pipelines run it: the sample, and max|x| over
    the run (the scale of its float32 rounding: the Euler samplers start at sigma_max, 157 here)."""
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    x = x_T * scheduler.init_noise_sigma
    largest = float(x.abs().max())
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(x, t), t.to(torch.float32).expand(x.shape[0]))
        takes_generator = "generator" in scheduler.step.__code__.co_varnames
        x = scheduler.step(output, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
        largest = max(largest, float(x.abs().max()))
    return x.numpy(), largest


@pytest.fixture
def drawn_noise(monkeypatch):
    """The noise diffusers' stochastic schedulers draw, recorded as they draw it."""
    drawn = []
    for module in (dpm_solver_module, euler_ancestral_module):
        def recording(*args, _draw=module.randn_tensor, **kwargs):
            noise = _draw(*args, **kwargs)
            drawn.append(noise.numpy().copy())
            return noise
        monkeypatch.setattr(module, "randn_tensor", recording)
    return drawn


SETTINGS = [
    SamplerConfig("dpm_solver"),  # DPM-Solver++(2M)
    SamplerConfig("dpm_solver", solver_order=3, timestep_spacing="trailing", final_sigmas_type="sigma_min"),
    SamplerConfig("dpm_solver", solver_order=1),
    SamplerConfig("dpm_solver", algorithm_type="sde-dpmsolver++"),  # DPM++ 2M SDE
    SamplerConfig("dpm_solver", use_karras_sigmas=True, solver_type="heun"),
    SamplerConfig("dpm_solver", solver_order=3, lower_order_final=False, euler_at_final=True,
                  algorithm_type="sde-dpmsolver++", timestep_spacing="leading", steps_offset=1),
    SamplerConfig("euler"),
    SamplerConfig("euler", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    SamplerConfig("euler_ancestral", timestep_spacing="leading"),
    SamplerConfig("euler_ancestral", timestep_spacing="trailing"),
    SamplerConfig("heun"),
    SamplerConfig("heun", use_karras_sigmas=True, timestep_spacing="trailing"),
    SamplerConfig("unipc"),
    SamplerConfig("unipc", solver_order=3, use_karras_sigmas=True),
    SamplerConfig("unipc", solver_order=1, timestep_spacing="leading", final_sigmas_type="sigma_min"),
    SamplerConfig("unipc", disable_corrector=(0, 2), lower_order_final=False, final_sigmas_type="sigma_min"),
]
# One step from T-1 (with "linspace" it is from t = 0, whose sigma diffusers computes in float32 from
# 1 - abar ~ 1e-4: 3e-4 of it, all of the one step's change), 7 and 20 steps.
STEP_COUNTS = [(1, "trailing"), (7, None), (20, None)]
# The cosine schedule ends at abar ~ 1e-8 (sigma ~ 1e4), where diffusers' float32 Euler steps lose 1e-3:
# linear for both.
SCHEDULES = {"epsilon": ("linear", 1000), "v": ("linear", 1000)}


def setting_id(sampler: SamplerConfig) -> str:
    changed = [f"{f.name}={getattr(sampler, f.name)}" for f in dataclasses.fields(sampler)
               if f.name != "sampler" and getattr(sampler, f.name) != f.default]
    return "-".join([sampler.sampler, *changed])


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("num_steps,spacing", STEP_COUNTS, ids=lambda v: str(v))
@pytest.mark.parametrize("sampler", SETTINGS, ids=setting_id)
def test_sampler_equals_diffusers_scheduler(sampler, num_steps, spacing, prediction, drawn_noise, record_error):
    """Whole runs: the samples within 1e-4 of max|x| over diffusers' run (float32 both sides)."""
    if spacing is not None and sampler.timestep_spacing == "linspace":
        sampler = dataclasses.replace(sampler, timestep_spacing=spacing)
    noise_schedule, timesteps = SCHEDULES[prediction]
    model = dict(timesteps=timesteps, noise_schedule=noise_schedule, prediction=prediction)
    x_T = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(num_steps))
    expected, largest = diffusers_run(diffusers_scheduler(sampler, noise_schedule, timesteps, prediction), num_steps,
                                      x_T, lambda x, t: denoiser(x, t, xp=torch, **model))

    plan = samplers.make_plan(sampler, num_steps, noise_schedule, timesteps, prediction)
    # diffusers also draws where the noise is scaled by 0 (a one-step SDE run): the plan then draws none.
    assert len(drawn_noise) == (plan.evaluations if plan.stochastic else len(drawn_noise))
    noise = jnp.asarray(np.stack(drawn_noise)) if plan.stochastic else None
    run = jax.jit(lambda plan, x, noise: samplers.run(lambda x, t: denoiser(x, t, xp=jnp, **model), plan, x,
                                                      noise=noise))
    ours = np.asarray(run(plan, jnp.asarray(x_T.numpy()), noise))
    error = np.abs(ours - expected).max() / largest
    record_error(f"{sampler.sampler} vs {SCHEDULERS[sampler.sampler]}", "samples", error)
    assert error <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_equals_ddpm_scheduler(prediction, monkeypatch, record_error):
    """DDPM over all 100 timesteps against DDPMScheduler (clipped x0, the posterior's variance), with the
    noise it draws (none at t = 0, where the plan's is scaled by 0)."""
    drawn = []

    def recording(*args, _draw=ddpm_module.randn_tensor, **kwargs):
        drawn.append(_draw(*args, **kwargs).numpy().copy())
        return torch.from_numpy(drawn[-1])
    monkeypatch.setattr(ddpm_module, "randn_tensor", recording)
    model = dict(timesteps=100, noise_schedule="linear", prediction=prediction)
    x_T = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    expected, largest = diffusers_run(diffusers_scheduler(SamplerConfig("ddpm"), "linear", 100, prediction), 100, x_T,
                                      lambda x, t: denoiser(x, t, xp=torch, **model))
    plan = samplers.make_plan(SamplerConfig("ddpm"), 100, "linear", 100, prediction)
    noise = jnp.asarray(np.stack(drawn + [np.zeros_like(drawn[0])]))
    ours = samplers.run(lambda x, t: denoiser(x, t, xp=jnp, **model), plan, jnp.asarray(x_T.numpy()), noise=noise)
    error = np.abs(np.asarray(ours) - expected).max() / largest
    record_error("ddpm vs DDPMScheduler", "samples", error)
    assert error <= 1e-4


@pytest.mark.parametrize("sampler", SETTINGS + [SamplerConfig("ddim", timestep_spacing="trailing"),
                                                SamplerConfig("ddpm")],
                         ids=setting_id)
def test_scheduler_configs_round_trip(sampler):
    fields = json.loads(json.dumps(scheduler_to_diffusers(sampler, "linear", 1000, "v")))
    assert sampler_from_diffusers(fields) == sampler
    scheduler = getattr(diffusers, fields["_class_name"]).from_config(fields)  # diffusers takes every key
    assert sampler_from_diffusers(dict(scheduler.config)) == sampler


def test_diffusers_defaults_are_read_as_diffusers_means_them():
    """A DDIMScheduler saved without timestep_spacing is diffusers' "leading", not SamplerConfig's default."""
    assert sampler_from_diffusers({"_class_name": "DDIMScheduler"}) == SamplerConfig("ddim", timestep_spacing="leading")
    defaults = dict(diffusers.DPMSolverMultistepScheduler().config, _class_name="DPMSolverMultistepScheduler")
    assert sampler_from_diffusers(defaults) == SamplerConfig("dpm_solver")


NO_SAMPLER = ("cannot be expressed: unet_flax's samplers equal DDIMScheduler, DDPMScheduler, "
              "DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, "
              "HeunDiscreteScheduler, UniPCMultistepScheduler")


@pytest.mark.parametrize("scheduler,message", [
    ((diffusers.PNDMScheduler, {}), f"scheduler PNDMScheduler {NO_SAMPLER}"),
    ((diffusers.LMSDiscreteScheduler, {}), f"scheduler LMSDiscreteScheduler {NO_SAMPLER}"),
    ((diffusers.DPMSolverMultistepScheduler, dict(thresholding=True)),
     "scheduler DPMSolverMultistepScheduler thresholding = True cannot be expressed: unet_flax's dpm_solver follows "
     "thresholding = False"),
    ((diffusers.DPMSolverMultistepScheduler, dict(use_lu_lambdas=True)),
     "scheduler DPMSolverMultistepScheduler use_lu_lambdas = True cannot be expressed: unet_flax's dpm_solver follows "
     "use_lu_lambdas = False"),
    ((diffusers.EulerDiscreteScheduler, dict(interpolation_type="log_linear")),
     "scheduler EulerDiscreteScheduler interpolation_type = 'log_linear' cannot be expressed: "
     "unet_flax's euler follows interpolation_type = 'linear'"),
    ((diffusers.UniPCMultistepScheduler, dict(solver_type="bh1")),
     "scheduler UniPCMultistepScheduler solver_type = 'bh1' cannot be expressed: unet_flax's unipc follows solver_type "
     "= 'bh2'"),
    ((diffusers.DDIMScheduler, dict(steps_offset=1)),
     "scheduler DDIMScheduler steps_offset = 1 cannot be expressed: unet_flax's ddim follows steps_offset = 0"),
    ((diffusers.DDPMScheduler, dict(variance_type="fixed_large")),
     "scheduler DDPMScheduler variance_type = 'fixed_large' cannot be expressed: unet_flax's ddpm follows "
     "variance_type = 'fixed_small'"),
    ((diffusers.DPMSolverMultistepScheduler, dict(solver_order=4)), "solver_order must be in [1, 3], got 4"),
], ids=["PNDM", "LMS", "thresholding", "lu-lambdas", "log-linear", "bh1", "ddim-offset", "fixed-large", "order-4"])
def test_schedulers_that_cannot_be_expressed_are_refused_naming_the_setting(scheduler, message):
    scheduler_class, settings = scheduler
    with pytest.raises(ConfigError) as refused:
        sampler_from_diffusers(dict(scheduler_class(**settings).config, _class_name=scheduler_class.__name__))
    assert str(refused.value) == message


def test_settings_a_sampler_does_not_read_are_refused():
    with pytest.raises(ConfigError, match=r"^use_karras_sigmas = True does not apply to sampler 'ddim': it is read by "
                                          r"dpm_solver, euler, heun, unipc$"):
        SamplerConfig("ddim", use_karras_sigmas=True)
    with pytest.raises(ConfigError,
                       match=r"^sampling_steps 10 gives dpm_solver \(linspace spacing\) two steps at the same "
                                          r"noise level over the model's 10 timesteps: use fewer steps$"):
        samplers.make_plan(SamplerConfig("dpm_solver"), 10, "linear", 10, "epsilon")


# -- pipelines in and out ---------------------------------------------------------------------------

def small_unet() -> UNet2DModel:
    return randomize_(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                  layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                  down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                  up_block_types=["AttnUpBlock2D", "UpBlock2D"]), seed=5, std=0.1).eval()


def test_a_pipeline_round_trip_samples_as_diffusers_does(tmp_path):
    """A DDPMPipeline with a DPM-Solver++ scheduler (Karras sigmas, v-prediction) is imported: the run's
    sampler is that scheduler. sample.py samples with it; export-diffusers --pipeline writes a folder that
    DiffusionPipeline.from_pretrained loads, whose images equal the project's sampler's from the same x_T."""
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2,
                                                      prediction_type="v_prediction", use_karras_sigmas=True)
    DDPMPipeline(unet=small_unet(), scheduler=scheduler).save_pretrained(tmp_path / "pipeline")
    workdir = tmp_path / "run"
    imported = run_main("unet_flax.scripts.convert", "import-diffusers", "--model", tmp_path / "pipeline",
                        "--workdir", workdir, check=True)
    expected_sampler = SamplerConfig("dpm_solver", use_karras_sigmas=True)
    assert SamplerConfig(**json.loads(imported.stdout)["sampler"]) == expected_sampler
    sampled = run_main("sample.py", "--workdir", workdir, "--num-samples", "2", "--sampling-steps", "5", check=True)
    report = json.loads(sampled.stdout.splitlines()[-1])
    assert (report["sampler"], report["use_karras_sigmas"], report["solver_order"]) == ("dpm_solver", True, 2)
    other = run_main("sample.py", "--workdir", workdir, "--num-samples", "2", "--sampling-steps", "5",
                     "--sampler", "heun", check=True)
    assert json.loads(other.stdout.splitlines()[-1])["use_karras_sigmas"] is False  # heun's defaults

    out = tmp_path / "exported"
    exported = run_main("unet_flax.scripts.convert", "export-diffusers", "--workdir", workdir, "--out", out,
                        "--pipeline", "--solver-order", "3", check=True)
    assert json.loads(exported.stdout)["scheduler"] == "DPMSolverMultistepScheduler"
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert type(pipeline) is DDPMPipeline
    assert sampler_from_diffusers(dict(pipeline.scheduler.config)) == dataclasses.replace(expected_sampler,
                                                                                          solver_order=3)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=6,
                      output_type="np").images

    config, params = from_diffusers(out)
    ema_params, _, _ = load_params(workdir)
    plan = samplers.make_plan(dataclasses.replace(expected_sampler, solver_order=3), 6, "linear", 100, "v")
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = samplers.run(guided_denoiser(UNet(config), ema_params, None, 1.0), plan, to_nhwc(x_T))
    np.testing.assert_allclose(np.clip(np.asarray(ours) / 2 + 0.5, 0, 1), images, atol=2e-4)


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "euler"], "sampler euler cannot be a DDPMPipeline's scheduler"),
    (["--use-karras-sigmas"], "use_karras_sigmas = True does not apply to sampler 'ddim'"),
])
def test_pipelines_diffusers_would_run_otherwise_are_refused(flags, message, tmp_path):
    small_unet().save_pretrained(tmp_path / "unet")
    workdir = tmp_path / "run"
    run_main("unet_flax.scripts.convert", "import-diffusers", "--model", tmp_path / "unet", "--workdir", workdir,
             check=True)
    refused = run_main("unet_flax.scripts.convert", "export-diffusers", "--workdir", workdir, "--out",
                       tmp_path / "out", "--pipeline", *flags)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[0].startswith(f"error: {message}")
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
