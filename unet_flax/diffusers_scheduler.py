"""diffusers' scheduler configs (a pipeline's scheduler/scheduler_config.json) <-> unet_flax's noise
schedule, prediction and sampler, with no diffusers installed.

Each sampler equals one scheduler class (SCHEDULERS); the settings they share have the same names
(SamplerConfig's). A scheduler setting that would make diffusers sample otherwise than the project
can is refused in one line naming it; so is a scheduler class the project has no sampler for.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import SamplerConfig
from .config.sampler_config import READ_BY, SCHEDULERS
from .diffusion import DDPM_BETAS
from .errors import ConfigError

# diffusers' names -> unet_flax's: the schedules and predictions both have.
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")
SAMPLER_OF = {scheduler: sampler for sampler, scheduler in SCHEDULERS.items()}
# Settings of each class that the project's sampler does not vary, and the value it follows.
_NO_OTHER_SIGMAS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
FIXED_SETTINGS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {"variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                      "thresholding": False, "steps_offset": 0},
    "DDIMScheduler": {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "thresholding": False,
                      "steps_offset": 0},
    "DPMSolverMultistepScheduler": {**_NO_OTHER_SIGMAS, "thresholding": False, "use_lu_lambdas": False,
                                    "use_flow_sigmas": False, "lambda_min_clipped": -math.inf, "variance_type": None,
                                    "use_dynamic_shifting": False},
    "EulerDiscreteScheduler": {**_NO_OTHER_SIGMAS, "interpolation_type": "linear", "timestep_type": "discrete",
                               "sigma_min": None, "sigma_max": None},
    "EulerAncestralDiscreteScheduler": {},
    "HeunDiscreteScheduler": {**_NO_OTHER_SIGMAS, "clip_sample": False, "clip_sample_range": 1.0},
    "UniPCMultistepScheduler": {**_NO_OTHER_SIGMAS, "thresholding": False, "predict_x0": True, "solver_type": "bh2",
                                "solver_p": None, "use_flow_sigmas": False, "use_dynamic_shifting": False,
                                "sigma_min": None, "sigma_max": None, "shift_terminal": None},
}
# Read by diffusers only where a fixed setting above has another value (thresholding's, flow sigmas').
UNREAD_SETTINGS = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")
# diffusers' defaults where they are not SamplerConfig's: what a config that omits the key means.
CLASS_DEFAULTS = {"DDPMScheduler": {"timestep_spacing": "leading"}, "DDIMScheduler": {"timestep_spacing": "leading"}}


def schedule_from_diffusers(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler_config.json -> the training settings of the same diffusion: {'noise_schedule',
    'timesteps', 'prediction'}; refuses, naming the field and its value, a schedule unet_flax computes
    differently."""
    timesteps = fields.get("num_train_timesteps", 1000)
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
        raise ConfigError(f"scheduler num_train_timesteps = {timesteps!r}: must be a positive integer")
    for name in ("trained_betas", "rescale_betas_zero_snr"):
        if fields.get(name):
            raise ConfigError(f"scheduler {name} = {fields[name]!r} cannot be expressed: unet_flax computes "
                              f"its betas from beta_schedule {tuple(BETA_SCHEDULES)}")
    beta_schedule = fields.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"scheduler beta_schedule = {beta_schedule!r} cannot be expressed: unet_flax supports "
                          f"{tuple(BETA_SCHEDULES)}")
    if beta_schedule == "linear":
        expected = linear_betas(timesteps)
        given = (fields.get("beta_start", DDPM_BETAS[0]), fields.get("beta_end", DDPM_BETAS[1]))
        if not np.allclose(given, expected, rtol=1e-6, atol=0):
            raise ConfigError(f"scheduler beta_start, beta_end = {given[0]}, {given[1]} with num_train_timesteps = "
                              f"{timesteps} cannot be expressed: unet_flax's linear betas run from "
                              f"{expected[0]:g} to {expected[1]:g} (DDPM's, scaled by 1000 / timesteps)")
    prediction = fields.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler prediction_type = {prediction!r} cannot be expressed: unet_flax supports "
                          f"{tuple(PREDICTION_TYPES)}")
    return {"noise_schedule": BETA_SCHEDULES[beta_schedule], "timesteps": timesteps,
            "prediction": PREDICTION_TYPES[prediction]}


def linear_betas(timesteps: int) -> tuple[float, float]:
    """beta_start and beta_end of unet_flax's linear schedule of this length."""
    return tuple(beta * 1000 / timesteps for beta in DDPM_BETAS)


def sampler_from_diffusers(fields: Mapping[str, Any]) -> SamplerConfig:
    """The sampler equal to a scheduler_config.json's class with its settings; refuses, in one line
    naming it, a class without one or a setting the sampler cannot follow."""
    class_name = fields.get("_class_name")
    if class_name not in SAMPLER_OF:
        raise ConfigError(f"scheduler {class_name} cannot be expressed: unet_flax's samplers equal "
                          f"{', '.join(SAMPLER_OF)}")
    sampler = SAMPLER_OF[class_name]
    fixed = FIXED_SETTINGS[class_name]
    settings = dict(CLASS_DEFAULTS.get(class_name, {}))
    for key, value in fields.items():
        if key.startswith("_") or key in SCHEDULE_KEYS or key in UNREAD_SETTINGS:
            continue
        if key in fixed:
            if value != fixed[key]:
                raise ConfigError(f"scheduler {class_name} {key} = {value!r} cannot be expressed: unet_flax's "
                                  f"{sampler} follows {key} = {fixed[key]!r}")
        elif key in READ_BY:
            settings[key] = value
        else:
            raise ConfigError(f"scheduler {class_name} setting {key} = {value!r} is unknown to unet_flax")
    # A setting the sampler does not read (DDPM's spacing: it visits every timestep) is left out.
    return SamplerConfig(sampler, **{key: value for key, value in settings.items() if sampler in READ_BY[key]})


def scheduler_to_diffusers(sampler: SamplerConfig, noise_schedule: str, timesteps: int,
                           prediction: str) -> dict[str, Any]:
    """The scheduler_config.json of the scheduler class `sampler` equals, for a model trained with this
    schedule and prediction."""
    class_name = SCHEDULERS[sampler.sampler]
    schedule = {"num_train_timesteps": timesteps, "beta_schedule": _diffusers_name(BETA_SCHEDULES, noise_schedule),
                "prediction_type": _diffusers_name(PREDICTION_TYPES, prediction)}
    if noise_schedule == "linear":
        schedule["beta_start"], schedule["beta_end"] = linear_betas(timesteps)
    settings = {key: value for key, value in dataclasses.asdict(sampler).items()
                if key in READ_BY and sampler.sampler in READ_BY[key] and key != "eta"}  # eta: DDIMPipeline's argument
    if "disable_corrector" in settings:
        settings["disable_corrector"] = list(settings["disable_corrector"])
    return {"_class_name": class_name, **schedule, **settings, **FIXED_SETTINGS[class_name]}


def _diffusers_name(names: Mapping[str, str], ours: str) -> str:
    return next(theirs for theirs, value in names.items() if value == ours)
