"""`SamplerConfig`: which sampler, and its settings, named as the matching diffusers scheduler names them.

A run records one (`TrainConfig.sampler`: DDIM, or the scheduler of an imported pipeline); sample.py
and evaluate.py take it, or another from their flags.
"""
from __future__ import annotations

import dataclasses

from ..diffusion import TIMESTEP_SPACINGS
from ..errors import ConfigError
from .fields import check_choices, check_range, setting

# Each sampler, and the diffusers scheduler it equals.
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm_solver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
}
SAMPLERS = tuple(SCHEDULERS)
MULTISTEP = ("dpm_solver", "unipc")
SIGMA_SAMPLERS = ("dpm_solver", "euler", "heun", "unipc")  # those that step in sigma and take Karras'
MAX_SOLVER_ORDER = 3
# The samplers that read each setting (any sampler takes a setting at its default).
READ_BY = {
    "eta": ("ddim",),
    "timestep_spacing": tuple(s for s in SAMPLERS if s != "ddpm"),
    "steps_offset": ("dpm_solver", "euler", "euler_ancestral", "heun", "unipc"),
    "use_karras_sigmas": SIGMA_SAMPLERS,
    "solver_order": MULTISTEP,
    "algorithm_type": ("dpm_solver",),
    "solver_type": ("dpm_solver",),
    "lower_order_final": MULTISTEP,
    "final_sigmas_type": ("dpm_solver", "euler", "unipc"),
    "euler_at_final": ("dpm_solver",),
    "disable_corrector": ("unipc",),
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """A sampler and its settings (diffusers' defaults and names; see READ_BY for which reads which)."""

    # ddim: sampling_steps, eta; ddpm: ancestral over every training step; the others: diffusers' schedulers
    sampler: str = setting("ddim", choices=SAMPLERS)
    eta: float = 0.0  # DDIM's fresh noise per step: 0 deterministic, 1 DDPM's variance
    # which timesteps: evenly from T-1 to 0, or diffusers' leading or trailing
    timestep_spacing: str = setting("linspace", choices=TIMESTEP_SPACINGS)
    steps_offset: int = 0  # added to "leading" timesteps (Stable Diffusion's 1)
    use_karras_sigmas: bool = False  # Karras et al.'s noise levels instead of the timesteps' own
    solver_order: int = 2  # DPM-Solver++ and UniPC: how many past predictions a step extrapolates from
    algorithm_type: str = setting("dpmsolver++", choices=("dpmsolver++", "sde-dpmsolver++"))
    solver_type: str = setting("midpoint", choices=("midpoint", "heun"))  # DPM-Solver++'s second-order step
    lower_order_final: bool = True  # first/second order for the last steps of runs under 15 steps
    final_sigmas_type: str = setting("zero", choices=("zero", "sigma_min"))  # the noise level of the last step
    euler_at_final: bool = False  # DPM-Solver++: a first-order last step
    disable_corrector: tuple[int, ...] = ()  # UniPC: steps whose corrector is skipped

    def __post_init__(self) -> None:
        object.__setattr__(self, "disable_corrector", tuple(int(step) for step in self.disable_corrector))
        check_choices(self)
        check_range("eta", self.eta, 0)
        check_range("steps_offset", self.steps_offset, 0, integer=True)
        check_range("solver_order", self.solver_order, 1, MAX_SOLVER_ORDER, integer=True)
        for step in self.disable_corrector:
            check_range("disable_corrector", step, 0, integer=True)
        for name, readers in READ_BY.items():
            value = getattr(self, name)
            if self.sampler not in readers and value != _default(name):
                raise ConfigError(f"{name} = {value!r} does not apply to sampler {self.sampler!r}: it is read by "
                                  f"{', '.join(readers)}")
        if self.sampler == "unipc" and not self.lower_order_final and self.final_sigmas_type == "zero":
            raise ConfigError("unipc with lower_order_final false and final_sigmas_type 'zero' divides by zero in its "
                              "last step (as diffusers' does): keep lower_order_final, or use final_sigmas_type "
                              "'sigma_min'")

    @classmethod
    def from_dict(cls, fields: dict) -> SamplerConfig:
        unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown SamplerConfig fields: {', '.join(unknown)}")
        return cls(**fields)


def _default(name: str):
    return next(field.default for field in dataclasses.fields(SamplerConfig) if field.name == name)
