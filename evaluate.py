"""Measure a digits model's sample quality: Frechet distance to held-out digits, and class agreement.

    python evaluate.py --workdir runs/digits --json runs/digits/eval.json

`fd` is the Frechet distance between the features (from a digit classifier trained here on the
training split, see unet_flax/evaluation.py) of generated samples and of the 450 held-out real
digits; `fd_real_floor` is the same distance from the 1,347 real training digits, what a perfect
generator would score. `class_agreement` is the share of samples the classifier reads as the digit
asked for (class-conditional models; null otherwise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from unet_flax import evaluation
from unet_flax.checkpoint import load_params
from unet_flax.diffusion import TIMESTEP_SPACINGS
from unet_flax.cli import UsageError, run_command, use_xla_cpu_convolutions
from unet_flax.train_config import TrainConfig
from unet_flax.sampling import for_this_backend, guidance_scale_for, rows_per_class, sample_images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/digits")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--num-samples", type=int, default=1347, help="as many as the real training split")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default="linspace",
                        help="DDIM's timesteps: evenly from T-1 to 0, or diffusers' leading or trailing")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the training config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def evaluate(args) -> dict:
    if args.num_samples < 2 or args.batch_size < 1 or args.sampling_steps < 1:
        raise UsageError("--num-samples must be >= 2, --batch-size and --sampling-steps >= 1")
    params, config_dict, step = load_params(args.workdir, args.step)
    config = TrainConfig.from_dict(config_dict)
    if config.data is not None or config.model.in_channels != 1:
        raise UsageError(f"evaluate.py measures models of the digits data; {args.workdir} was trained on "
                         f"{config.data!r}")
    config = dataclasses.replace(config, model=for_this_backend(config.model))
    image_size = config.model.image_size
    guidance = guidance_scale_for(config, args.guidance_scale)
    num_classes = config.model.num_classes
    labels = None if num_classes is None else rows_per_class(num_classes, args.num_samples)[0]

    classifier = evaluation.classifier_params(image_size)
    train, held_out = evaluation.digits_split(image_size)
    train_features, _ = evaluation.features_and_predictions(classifier, train.images)
    held_out_features, held_out_predictions = evaluation.features_and_predictions(classifier, held_out.images)
    samples = sample_images(params, config, args.num_samples, labels, args.sampling_steps, args.eta, guidance,
                            args.seed, args.batch_size, progress=True, timestep_spacing=args.timestep_spacing)
    sample_features, sample_predictions = evaluation.features_and_predictions(classifier, samples)

    fd = evaluation.frechet_distance(sample_features, held_out_features)
    floor = evaluation.frechet_distance(train_features, held_out_features)
    result = {
        "fd": round(fd, 4), "fd_real_floor": round(floor, 4), "fd_ratio": round(fd / floor, 3),
        "class_agreement": None if labels is None else float(np.mean(sample_predictions == labels)),
        "classifier_held_out_accuracy": float(np.mean(held_out_predictions == held_out.labels)),
        "settings": {"workdir": args.workdir, "step": step, "num_samples": args.num_samples, "sampler": "ddim",
                     "sampling_steps": args.sampling_steps, "timestep_spacing": args.timestep_spacing, "eta": args.eta,
                     "guidance_scale": None if labels is None else guidance, "seed": args.seed, "ema": True},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    use_xla_cpu_convolutions()
    return run_command(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
