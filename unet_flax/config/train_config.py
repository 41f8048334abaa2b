"""The training configuration: `TrainConfig`, a frozen dataclass holding the `UNetConfig`, its presets,
and how a command line's flags, a preset, a saved config and the data become one config.

`unet_flax.cli` turns each field that is a flag (most are) into a command-line flag.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..diffusion import PREDICTIONS, SCHEDULES, check_sampling_steps
from ..errors import ConfigError
from .fields import FREE, PER_PROCESS, check_choices, check_range, fields_resumed, setting
from .sampler_config import SamplerConfig
from .unet_config import UNetConfig, compute_dtype

LR_SCHEDULES = ("constant", "cosine")
PARALLEL = ("pmap", "jit", "fsdp")
WEIGHT_COPIES = ("auto", "on", "off")
MESH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Each field says (see `setting`) whether it is a command-line
    flag, its allowed values, and whether a resumed run may change it."""

    model: UNetConfig = setting(UNetConfig(), flag=False)  # its fields are flags of their own
    # data
    workdir: str = setting("runs/digits", resume=FREE)
    data: str | None = None  # None: scikit-learn's digits; a folder of images, an .npz, or CIFAR-10 batches
    class_conditional: bool = False  # num_classes from the data's labels; trained with label dropout for CFG
    label_dropout: float = 0.1
    hflip: bool = False
    # grain processes decoding images; None: one per core, none for in-memory data
    data_workers: int | None = setting(None, resume=FREE)
    # pass over unreadable images (counted in metrics.jsonl) instead of stopping
    skip_bad_images: bool = setting(False, resume=FREE)
    # optimisation
    steps: int = setting(1000, resume=FREE)
    batch_size: int = 64  # global, over all devices and hosts
    lr: float = setting(1e-3, resume=FREE)
    lr_schedule: str = setting("constant", resume=FREE, choices=LR_SCHEDULES)
    warmup_steps: int = setting(100, resume=FREE)
    weight_decay: float = setting(0.0, resume=FREE)
    adam_b1: float = setting(0.9, resume=FREE)
    adam_b2: float = setting(0.999, resume=FREE)
    adam_eps: float = setting(1e-8, resume=FREE)
    grad_clip: float = setting(1.0, resume=FREE)  # global-norm clipping; 0 turns it off
    ema_decay: float = setting(0.999, resume=FREE)
    # skip steps with a NaN/inf loss or gradient instead of stopping
    skip_nonfinite: bool = setting(False, resume=FREE)
    # diffusion
    noise_schedule: str = setting("linear", choices=SCHEDULES)
    timesteps: int = 1000
    prediction: str = setting("epsilon", choices=PREDICTIONS)
    min_snr_gamma: float | None = setting(None, resume=FREE)
    # sampling during training
    sample_every: int = setting(0, resume=FREE)  # 0: only at the end
    num_samples: int = setting(100, resume=FREE)
    sampling_steps: int = setting(50, resume=FREE)
    guidance_scale: float = setting(2.0, resume=FREE)
    # the run's sampler (its grids; sample.py's default): DDIM, or an imported pipeline's scheduler
    sampler: SamplerConfig = setting(SamplerConfig(), resume=FREE, flag=False)
    # running
    # pmap, jit: data-parallel, every device holding the whole state; fsdp: jit over a 2-D mesh (data, fsdp),
    # parameters, their AdamW moments and the EMA split over fsdp
    parallel: str = setting("pmap", resume=FREE, choices=PARALLEL)
    mesh: str | None = setting(None, resume=FREE)  # fsdp's: 'data=N,fsdp=M' (a size may be left out); None: all fsdp
    # a copy of the weights in the compute dtype kept in the train state, never saved (train_step.keeps_weight_copy);
    # 'auto': on a GPU, where the cast of each weight every step is a kernel of its own
    weight_copy: str = setting("auto", resume=FREE, choices=WEIGHT_COPIES)
    seed: int = 0
    save_every: int = setting(500, resume=FREE)
    keep_checkpoints: int = setting(3, resume=FREE)
    log_every: int = setting(50, resume=FREE)
    resume: bool = setting(True, resume=FREE)
    # jax.distributed.initialize(); its flags or the cluster's environment
    distributed: bool = setting(False, resume=PER_PROCESS)
    coordinator_address: str | None = setting(None, resume=PER_PROCESS)
    num_processes: int | None = setting(None, resume=PER_PROCESS)
    process_id: int | None = setting(None, resume=PER_PROCESS)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "timesteps", "num_samples", "log_every", "keep_checkpoints"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("data_workers", self.data_workers, 0, integer=True, optional=True)
        for name in ("warmup_steps", "save_every", "sample_every"):
            check_range(name, getattr(self, name), 0, integer=True)
        check_range("seed", self.seed, integer=True)
        check_choices(self)
        for name in ("label_dropout", "ema_decay", "adam_b1", "adam_b2"):
            check_range(name, getattr(self, name), 0, 1, high_open=True)
        check_range("lr", self.lr, 0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            check_range(name, getattr(self, name), 0)
        check_range("adam_eps", self.adam_eps, 0)
        check_range("min_snr_gamma", self.min_snr_gamma, 0, low_open=True, optional=True)
        check_range("guidance_scale", self.guidance_scale)
        if self.model.out_channels != self.model.in_channels:
            raise ConfigError(f"model out_channels {self.model.out_channels} differs from in_channels "
                              f"{self.model.in_channels}: diffusion predicts noise shaped like its input")
        if self.class_conditional:
            self.model.require_null_label("label_dropout", self.label_dropout, 0.0)
            self.model.require_null_label("guidance_scale", self.guidance_scale, 1.0)
        check_sampling_steps(self.sampling_steps, self.timesteps)
        if self.mesh is not None:
            mesh_sizes(self.mesh)
            if self.parallel != "fsdp":
                raise ConfigError(f"mesh {self.mesh} is fsdp's: pass --parallel fsdp (or leave --parallel out), "
                                  f"got parallel {self.parallel!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TrainConfig:
        fields = dict(fields)
        sampler = SamplerConfig.from_dict(fields.pop("sampler", {}))  # configs saved before it: DDIM
        return cls(model=UNetConfig.from_dict(fields.pop("model")), sampler=sampler, **fields)


PRESETS: dict[str, TrainConfig] = {
    # The CPU demo: 16x16 digits, class-conditional, a few minutes on 2 cores.
    "digits": TrainConfig(
        model=UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                         attention_resolutions=(8, 4), image_size=16, num_heads=4, num_groups=8),
        class_conditional=True, steps=1500, batch_size=64, lr=2e-3,
        lr_schedule="cosine", warmup_steps=100, ema_decay=0.995, save_every=500, guidance_scale=1.5),
    # The DDPM CIFAR-10 U-Net (Ho et al. 2020) and its optimisation.
    "cifar10": TrainConfig(
        model=UNetConfig(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                         attention_resolutions=(16,), image_size=32, num_heads=8, num_groups=32, dropout=0.1),
        workdir="runs/cifar10", hflip=True, steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000,
        grad_clip=1.0, ema_decay=0.9999, save_every=5000, sample_every=20_000, num_samples=64),
    # ADM's 256x256 U-Net (Dhariwal & Nichol 2021): 501M parameters here (its resampling blocks are
    # convolutions, not residual blocks), larger than one device holds with AdamW and EMA: FSDP over every
    # device, each block recomputed in the backward pass.
    "adm256": TrainConfig(
        model=UNetConfig(in_channels=3, base_channels=256, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                         attention_resolutions=(32, 16, 8), image_size=256, head_dim=64, num_groups=32,
                         dropout=0.1, remat=True),
        workdir="runs/adm256", hflip=True, steps=1_980_000, batch_size=256, lr=1e-4, warmup_steps=0,
        grad_clip=1.0, ema_decay=0.9999, save_every=10_000, sample_every=100_000, num_samples=16,
        parallel="fsdp"),
}


def mesh_sizes(text: str) -> dict[str, int]:
    """`--mesh` as axis sizes: 'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; ConfigError naming the text."""
    sizes = {}
    for part in text.split(","):
        name, _, size = (piece.strip() for piece in part.partition("="))
        if name not in MESH_AXES or name in sizes or not size.isdigit() or int(size) < 1:
            raise ConfigError(f"mesh must be like data=2,fsdp=4 (axes {' and '.join(MESH_AXES)}, each once, sizes "
                              f"positive integers), got {text!r}")
        sizes[name] = int(size)
    return sizes


def resolve_config(overrides: dict[str, Any], preset: str | None = None, saved: dict[str, Any] | None = None,
                   backend: str = "cpu") -> TrainConfig:
    """The config a command line asks for: the defaults (`preset`'s; without one the `saved` config of
    the checkpoints being resumed, all but its PER_PROCESS fields; else the digits preset's) with
    `overrides` (field name -> value, the model's fields among them) applied. The model's dtype,
    unless overridden, is the backend's: bfloat16 compute on GPU and TPU, float32 on the CPU."""
    if preset is None and saved is not None:
        base = TrainConfig.from_dict(saved)
        base = dataclasses.replace(base, **{name: getattr(PRESETS["digits"], name)
                                            for name in fields_resumed(TrainConfig, PER_PROCESS)})
    else:
        base = PRESETS[preset or "digits"]
    overrides = dict(overrides)
    if overrides.get("mesh") is not None:
        overrides.setdefault("parallel", "fsdp")  # a mesh names fsdp's axes
    overrides.setdefault("dtype", compute_dtype(backend))
    model_names = {f.name for f in dataclasses.fields(UNetConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    unknown = sorted(overrides.keys() - model_names - train_names)
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
    model = dataclasses.replace(base.model, **{k: v for k, v in overrides.items() if k in model_names})
    return dataclasses.replace(base, model=model, **{k: v for k, v in overrides.items() if k in train_names})


def fit_to_data(config: TrainConfig, channels: int, num_classes: int | None, source: str) -> TrainConfig:
    """What the data decides: the model's input and output channels, and its classes (with
    class_conditional, which needs labelled data)."""
    if config.class_conditional and num_classes is None:
        raise ConfigError(f"class_conditional needs labels, and {source} has none")
    model = dataclasses.replace(config.model, in_channels=channels, out_channels=channels,
                                num_classes=num_classes if config.class_conditional else None)
    return dataclasses.replace(config, model=model)
