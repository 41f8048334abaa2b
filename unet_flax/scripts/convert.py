"""Move U-Net weights between orbax checkpoints, the PyTorch reference and diffusers' UNet2DModel.

    python -m unet_flax.scripts.convert export --workdir runs/digits --out digits.pt     # + digits.json
    python -m unet_flax.scripts.convert import --state-dict digits.pt --config digits.json --workdir runs/imported
    python -m unet_flax.scripts.convert import-diffusers --model ddpm-cifar10-32 --workdir runs/ddpm
    python -m unet_flax.scripts.convert export-diffusers --workdir runs/ddpm --out ddpm-finetuned
    python -m unet_flax.scripts.convert export-diffusers --workdir runs/ddpm --out ddpm-pipeline --pipeline \
        --sampler dpm_solver --use-karras-sigmas

(`unet-flax-convert` once installed.) Imports write a step-0 checkpoint that train.py resumes and
sample.py reads; exports read the EMA weights unless --no-ema.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from unet_flax.checkpoint import load_config, load_params, refuse_used_workdir, write_initial_checkpoint
from unet_flax.cli import add_debug_flag, add_sampler_flags, given_fields, run_command, sampler_from_flags
from unet_flax.config import PRESETS, SamplerConfig, TrainConfig, UNetConfig
from unet_flax.diffusers_format import from_diffusers, pipeline_to_diffusers, scheduler_of, to_diffusers
from unet_flax.diffusers_scheduler import scheduler_to_diffusers
from unet_flax.errors import ConfigError, ConversionError, UsageError
from unet_flax.model import param_shapes
from unet_flax.samplers import make_plan
from unet_flax.torch_format import flax_to_torch, torch_to_flax
from unet_flax.weights import load_torch_state_dict, read_json


def export_checkpoint(workdir: str, out: str, step: int | None = None, ema: bool = True) -> dict:
    """An orbax checkpoint -> a PyTorch state_dict file for reference.UNet, and its config as JSON beside it."""
    import torch

    params, config, step = load_params(workdir, step, ema)
    out_path = Path(out)
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; choose another --out (nothing was written)")
    state_dict = {key: torch.from_numpy(np.array(value)) for key, value in flax_to_torch(params).items()}
    torch.save(state_dict, out_path)
    config_path = out_path.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"step": step, "ema": ema, "state_dict": str(out_path), "config": str(config_path)}


def import_state_dict(state_dict_path: str, config_path: str, workdir: str) -> dict:
    """A PyTorch reference state_dict -> an orbax checkpoint at step 0 that sample.py and train.py resume.

    The config is the JSON `export` writes (a whole training config), or a bare UNetConfig, which
    takes the digits preset's training settings."""
    fields = read_json(config_path, "--config")
    config = TrainConfig.from_dict(fields) if "model" in fields else dataclasses.replace(
        PRESETS["digits"], model=UNetConfig.from_dict(fields))
    config = dataclasses.replace(config, workdir=workdir)
    state_dict = load_torch_state_dict(state_dict_path)
    refuse_used_workdir(workdir)
    # Every check (keys, shapes) before the workdir is created: a bad file leaves nothing behind.
    target = param_shapes(config.model)
    return write_initial_checkpoint(config, torch_to_flax(state_dict, target))


def import_diffusers(model_dir: str, workdir: str, variant: str | None = None) -> dict:
    """A UNet2DModel folder, or a pipeline's folder, -> an orbax checkpoint at step 0 with the cifar10
    preset's optimisation (DDPM's) for fine-tuning: train.py and sample.py take it from there. A
    pipeline's scheduler gives the noise schedule, its length, the prediction and the run's sampler;
    else DDPM's schedule and DDIM."""
    schedule, sampler = scheduler_of(model_dir) or ({}, SamplerConfig())
    model, params = from_diffusers(model_dir, variant)
    conditional = model.num_classes is not None
    # Without a null label there is nothing to drop labels to, nor to guide against.
    guidance = {} if model.null_label else {"label_dropout": 0.0, "guidance_scale": 1.0}
    base = PRESETS["cifar10"]
    sampling_steps = min(base.sampling_steps, schedule.get("timesteps", base.timesteps))
    config = dataclasses.replace(base, model=model, workdir=workdir, data=None, class_conditional=conditional,
                                 hflip=False, sampling_steps=sampling_steps, sampler=sampler, **guidance, **schedule)
    make_plan(sampler, sampling_steps, config.noise_schedule, config.timesteps, config.prediction)
    refuse_used_workdir(workdir)
    return {**write_initial_checkpoint(config, params), "model": str(model_dir),
            "noise_schedule": config.noise_schedule,
            "timesteps": config.timesteps, "prediction": config.prediction, "sampler": dataclasses.asdict(sampler)}


def export_diffusers(workdir: str, out: str, step: int | None = None, ema: bool = True,
                     pipeline: SamplerConfig | None = None) -> dict:
    """An orbax checkpoint -> a folder that diffusers' `UNet2DModel.from_pretrained` loads, or with
    `pipeline` (the sampler) a DDPMPipeline's folder for `DiffusionPipeline.from_pretrained`."""
    params, fields, step = load_params(workdir, step, ema)
    config = TrainConfig.from_dict(fields)
    if pipeline is None:
        to_diffusers(config.model, params, out)
        return {"step": step, "ema": ema, "out": str(out)}
    scheduler = scheduler_to_diffusers(pipeline, config.noise_schedule, config.timesteps, config.prediction)
    pipeline_to_diffusers(config.model, params, scheduler, out)
    return {"step": step, "ema": ema, "out": str(out), "pipeline": "DDPMPipeline",
            "scheduler": scheduler["_class_name"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet_flax.scripts.convert",
                                     description="Move U-Net weights between orbax checkpoints, the PyTorch "
                                                 "reference and diffusers' UNet2DModel.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="orbax checkpoint -> PyTorch state_dict (+ config .json)")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="the .pt file to write; its config goes beside it as .json")
    export.add_argument("--step", type=int, default=None)
    export.add_argument("--no-ema", action="store_true")
    imp = commands.add_parser("import", help="PyTorch state_dict -> orbax checkpoint (step 0)")
    imp.add_argument("--state-dict", required=True)
    imp.add_argument("--config", required=True, help="the .json export wrote, or a UNetConfig as JSON")
    imp.add_argument("--workdir", required=True)
    imp_diffusers = commands.add_parser("import-diffusers",
                                        help="diffusers UNet2DModel folder -> orbax checkpoint (step 0)")
    imp_diffusers.add_argument("--model", required=True, help="a folder UNet2DModel.save_pretrained wrote, or a "
                                                              "pipeline's (its unet/ and scheduler/)")
    imp_diffusers.add_argument("--variant", default=None, help="the weights variant to read, e.g. fp16 "
                                                               "(diffusion_pytorch_model.fp16.safetensors)")
    imp_diffusers.add_argument("--workdir", required=True)
    exp_diffusers = commands.add_parser("export-diffusers",
                                        help="orbax checkpoint -> diffusers UNet2DModel folder")
    exp_diffusers.add_argument("--workdir", required=True)
    exp_diffusers.add_argument("--out", required=True, help="a new folder for UNet2DModel.from_pretrained")
    exp_diffusers.add_argument("--step", type=int, default=None)
    exp_diffusers.add_argument("--no-ema", action="store_true")
    exp_diffusers.add_argument("--pipeline", action="store_true",
                               help="a DDPMPipeline's folder (model_index.json, unet/, scheduler/) with the run's "
                                    "sampler as its scheduler, or the one the sampler flags name")
    add_sampler_flags(exp_diffusers)
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def convert(args):
        if args.command == "export":
            return export_checkpoint(args.workdir, args.out, args.step, not args.no_ema)
        if args.command == "export-diffusers":
            if not args.pipeline and given_fields(args, SamplerConfig):
                raise UsageError(f"--{next(iter(given_fields(args, SamplerConfig))).replace('_', '-')} chooses the "
                                 f"scheduler of a pipeline: add --pipeline (a lone UNet2DModel has none)")
            sampler = sampler_from_flags(args, load_config(args.workdir, args.step).sampler) if args.pipeline else None
            return export_diffusers(args.workdir, args.out, args.step, not args.no_ema, sampler)
        if args.command == "import-diffusers":
            return import_diffusers(args.model, args.workdir, args.variant)
        return import_state_dict(args.state_dict, args.config, args.workdir)
    # A .pt file torch refuses is a ConversionError naming the file (weights.load_torch_state_dict).
    return run_command(convert, args, (FileNotFoundError, FileExistsError, RuntimeError),
                       (UsageError, ConfigError, ConversionError))


if __name__ == "__main__":
    sys.exit(main())
