"""Sample from a trained U-Net: a PNG grid, and optionally the raw images as .npz.

    python sample.py                                    # runs/digits, latest checkpoint, EMA weights
    python sample.py --labels 3,3,7 --guidance-scale 3  # class-conditional: these digits
    python sample.py --sampler ddpm --num-samples 64 --npz samples.npz
    python sample.py --sampler dpm_solver --sampling-steps 10 --use-karras-sigmas
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from unet_flax.checkpoint import load_config
from unet_flax.cli import build_sampling_parser, run_command, sampling_config
from unet_flax.config import SamplingConfig
from unet_flax.sampling import sample_from_checkpoint
from unet_flax.visualize import save_grid


def run(args: argparse.Namespace) -> dict:
    run_sampler = load_config(args.workdir, getattr(args, "step", None)).sampler
    samples = sample_from_checkpoint(args.workdir, sampling_config(args, SamplingConfig(), run_sampler), progress=True)
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
    parser = build_sampling_parser(__doc__.split("\n\n")[0], SamplingConfig())
    parser.add_argument("--out", default=None, help="PNG grid path (default: WORKDIR/samples_sample.png)")
    parser.add_argument("--npz", default=None, help="also write uint8 NHWC `images` (+ `labels`) here")
    args = parser.parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
