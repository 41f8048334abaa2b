"""Sample from a trained U-Net: a PNG grid, and optionally the raw images as .npz.

    python sample.py                                    # runs/digits, latest checkpoint, EMA weights
    python sample.py --labels 3,3,7 --guidance-scale 3  # class-conditional: these digits
    python sample.py --sampler ddpm --num-samples 64 --npz samples.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from unet_flax.checkpoint import load_params
from unet_flax.diffusion import TIMESTEP_SPACINGS
from unet_flax.cli import UsageError, run_command, use_xla_cpu_convolutions
from unet_flax.train_config import TrainConfig
from unet_flax.sampling import for_this_backend, guidance_scale_for, rows_per_class, sample_images
from unet_flax.visualize import save_grid


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/digits", help="the training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw parameters, not the EMA")
    parser.add_argument("--out", default=None, help="PNG grid path (default: WORKDIR/samples_sample.png)")
    parser.add_argument("--npz", default=None, help="also write uint8 NHWC `images` (+ `labels`) here")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                        help="ddpm: ancestral over every training step; ddim: --sampling-steps, --eta")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default="linspace",
                        help="DDIM's timesteps: evenly from T-1 to 0, or diffusers' leading or trailing")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the training config's)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class labels, cycled to --num-samples (default: every class, a row each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def sample_labels(args, num_classes: int | None) -> np.ndarray | None:
    if num_classes is None:
        if args.labels is not None:
            raise UsageError("--labels given, but this model is unconditional (trained without --class-conditional)")
        return None
    if args.labels is None:  # every class in turn, one row of the grid each
        return rows_per_class(num_classes, args.num_samples)[0]
    try:
        asked = [int(v) for v in args.labels.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    bad = [v for v in asked if not 0 <= v < num_classes]
    if bad or not asked:
        raise UsageError(f"label {bad[0] if bad else args.labels!r} out of range: this model has classes "
                         f"0..{num_classes - 1}")
    return np.resize(np.asarray(asked, np.int32), args.num_samples)


def run(args) -> dict:
    for name in ("num_samples", "batch_size", "sampling_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    params, config_dict, step = load_params(args.workdir, args.step, ema=not args.no_ema)
    config = TrainConfig.from_dict(config_dict)
    model = for_this_backend(config.model)
    labels = sample_labels(args, model.num_classes)
    num_steps, eta = (config.timesteps, 1.0) if args.sampler == "ddpm" else (args.sampling_steps, args.eta)
    if num_steps > config.timesteps:
        raise UsageError(f"--sampling-steps {num_steps} exceeds the model's {config.timesteps} timesteps")
    guidance = guidance_scale_for(config, args.guidance_scale)

    config = dataclasses.replace(config, model=model)
    images = sample_images(params, config, args.num_samples, labels, num_steps, eta, guidance, args.seed,
                           args.batch_size, progress=True, timestep_spacing=args.timestep_spacing)

    out_path = Path(args.out) if args.out else Path(args.workdir) / "samples_sample.png"
    columns = None
    if labels is not None and args.labels is None:
        columns = rows_per_class(model.num_classes, args.num_samples)[1]
    save_grid(images, out_path, columns)
    result = {"step": step, "num_samples": len(images), "sampler": args.sampler, "sampling_steps": num_steps,
              "eta": eta, "timestep_spacing": args.timestep_spacing,
              "guidance_scale": guidance if labels is not None else None, "ema": not args.no_ema,
              "seed": args.seed, "out": str(out_path)}
    if args.npz:
        arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
        np.savez(args.npz, **arrays)
        result["npz"] = args.npz
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    use_xla_cpu_convolutions()
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
