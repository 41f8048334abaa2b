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

from unet_flax.cli import add_config_flags, given_fields, run_command
from unet_flax.sampling import SamplingConfig, sample_from_checkpoint
from unet_flax.visualize import save_grid


def sampling_parser(description: str, defaults: SamplingConfig) -> argparse.ArgumentParser:
    """--workdir, --debug and a flag for each SamplingConfig field (defaults shown: `defaults`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/digits", help="the training run's workdir")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_config_flags(parser.add_argument_group("sampling"), defaults)
    return parser


def sampling_config(args: argparse.Namespace, defaults: SamplingConfig) -> SamplingConfig:
    return dataclasses.replace(defaults, **given_fields(args, SamplingConfig))


def run(args: argparse.Namespace) -> dict:
    samples = sample_from_checkpoint(args.workdir, sampling_config(args, SamplingConfig()), progress=True)
    out_path = Path(args.out) if args.out else Path(args.workdir) / "samples_sample.png"
    save_grid(samples.images, out_path, samples.columns)
    result = {**samples.settings, "out": str(out_path)}
    if args.npz:
        arrays = {"images": samples.images}
        if samples.labels is not None:
            arrays["labels"] = samples.labels
        np.savez(args.npz, **arrays)
        result["npz"] = args.npz
    return result


def main(argv: list[str] | None = None) -> int:
    parser = sampling_parser(__doc__.split("\n\n")[0], SamplingConfig())
    parser.add_argument("--out", default=None, help="PNG grid path (default: WORKDIR/samples_sample.png)")
    parser.add_argument("--npz", default=None, help="also write uint8 NHWC `images` (+ `labels`) here")
    args = parser.parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
