"""`SamplingConfig`: what to sample from a trained model and how (sample.py's and evaluate.py's flags)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .fields import check_range, setting
from .sampler_config import SamplerConfig

if TYPE_CHECKING:
    from .train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What to sample from a trained model, and how (sample.py's and evaluate.py's flags)."""

    num_samples: int = 100
    # the sampler and its settings; None: the run's (TrainConfig.sampler). A name: that sampler, diffusers' defaults
    sampler: SamplerConfig | str | None = setting(None, flag=False)
    sampling_steps: int = 50  # DDPM's are the model's timesteps
    guidance_scale: float | None = None  # classifier-free guidance; None: the training config's
    labels: tuple[int, ...] | None = None  # class labels, cycled to num_samples; None: every class, a row each
    seed: int = 0
    batch_size: int = 100
    step: int | None = None  # the checkpoint's; None: the latest
    ema: bool = True  # the EMA weights, else the raw parameters

    def __post_init__(self) -> None:
        if isinstance(self.sampler, str):
            object.__setattr__(self, "sampler", SamplerConfig(self.sampler))
        if self.labels is not None:  # lists from JSON or Python: stored as a tuple, so the config stays hashable
            object.__setattr__(self, "labels", tuple(int(label) for label in self.labels))
            if not self.labels:
                raise ConfigError("labels is empty: name at least one class, or leave labels out for every class")
        for name in ("num_samples", "sampling_steps", "batch_size"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("guidance_scale", self.guidance_scale, optional=True)
        check_range("seed", self.seed, integer=True)
        check_range("step", self.step, 0, integer=True, optional=True)

    @classmethod
    def during_training(cls, config: TrainConfig) -> SamplingConfig:
        """train.py's grids: the config's samples, steps, sampler and guidance, in one batch, from seed + 1."""
        return cls(num_samples=config.num_samples, sampler=config.sampler, sampling_steps=config.sampling_steps,
                   guidance_scale=config.guidance_scale, seed=config.seed + 1, batch_size=config.num_samples)
