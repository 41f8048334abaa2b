"""The training configuration: `TrainConfig`, a frozen dataclass holding the `UNetConfig`, and its presets.

`unet_flax.cli` turns every field into a command-line flag.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .unet_config import MODEL_CHOICES, ConfigError, UNetConfig

LR_SCHEDULES = ("constant", "cosine")
PARALLEL = ("pmap", "jit")
CHOICES = {"lr_schedule": LR_SCHEDULES, "parallel": PARALLEL, "noise_schedule": ("linear", "cosine"),
           "prediction": ("epsilon", "v"), **MODEL_CHOICES}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: UNetConfig = UNetConfig()
    # data
    workdir: str = "runs/digits"
    data: str | None = None  # None: scikit-learn's digits; a folder of images, an .npz, or CIFAR-10 batches
    class_conditional: bool = False  # num_classes from the data's labels; trained with label dropout for CFG
    label_dropout: float = 0.1
    hflip: bool = False
    data_workers: int | None = None  # grain processes decoding images; None: one per core, none for in-memory data
    skip_bad_images: bool = False  # pass over unreadable images (counted in metrics.jsonl) instead of stopping
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # global, over all devices and hosts
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    ema_decay: float = 0.999
    skip_nonfinite: bool = False  # skip steps with a NaN/inf loss or gradient instead of stopping
    # diffusion
    noise_schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "epsilon"
    min_snr_gamma: float | None = None
    # sampling during training
    sample_every: int = 0  # 0: only at the end
    num_samples: int = 100
    sampling_steps: int = 50
    guidance_scale: float = 2.0
    # running
    parallel: str = "pmap"
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    resume: bool = True
    distributed: bool = False  # jax.distributed.initialize(); its flags or the cluster's environment
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "timesteps", "num_samples", "sampling_steps", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.data_workers is not None and self.data_workers < 0:
            raise ConfigError(f"data_workers must be >= 0 or None, got {self.data_workers}")
        for name in ("warmup_steps", "save_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, allowed in CHOICES.items():
            if hasattr(self, name) and getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("label_dropout", "ema_decay", "adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "adam_eps"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be positive or None, got {self.min_snr_gamma}")
        if self.model.out_channels != self.model.in_channels:
            raise ConfigError(f"model out_channels {self.model.out_channels} differs from in_channels "
                              f"{self.model.in_channels}: diffusion predicts noise shaped like its input")
        if self.class_conditional and not self.model.null_label:
            for name, neutral in (("label_dropout", 0.0), ("guidance_scale", 1.0)):
                if getattr(self, name) != neutral:
                    raise ConfigError(f"{name} {getattr(self, name)} needs the null label, and the model has "
                                      f"null_label=False: set {name} to {neutral}")
        if self.sampling_steps > self.timesteps:
            raise ConfigError(f"sampling_steps {self.sampling_steps} exceeds timesteps {self.timesteps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        fields = dict(fields)
        return cls(model=UNetConfig.from_dict(fields.pop("model")), **fields)


PRESETS: dict[str, TrainConfig] = {
    # The CPU demo: 16x16 digits, class-conditional, a few minutes on 2 cores.
    "digits": TrainConfig(
        model=UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                         attention_resolutions=(8, 4), image_size=16, num_heads=4, num_groups=8),
        workdir="runs/digits", class_conditional=True, steps=1500, batch_size=64, lr=2e-3,
        lr_schedule="cosine", warmup_steps=100, ema_decay=0.995, save_every=500, guidance_scale=1.5),
    # The DDPM CIFAR-10 U-Net (Ho et al. 2020) and its optimisation.
    "cifar10": TrainConfig(
        model=UNetConfig(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), image_size=32, num_heads=8, num_groups=32, dropout=0.1),
        workdir="runs/cifar10", hflip=True, steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000,
        grad_clip=1.0, ema_decay=0.9999, save_every=5000, sample_every=20_000, num_samples=64),
}
