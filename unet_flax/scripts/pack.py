"""Pack an image folder, an .npz or a CIFAR-10 folder into ArrayRecord shards that train.py --data reads.

    python -m unet_flax.scripts.pack ~/data/ffhq --out ~/data/ffhq64 --image-size 64

(`unet-flax-pack` once installed.) Every image is decoded, resized and centre-cropped once, here, by
several processes: training then reads examples ready to use.
"""
from __future__ import annotations

import argparse
import sys

from unet_flax import input_pipeline
from unet_flax.cli import add_debug_flag, run_command
from unet_flax.errors import DataError, UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet_flax.scripts.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="what train.py --data accepts")
    parser.add_argument("--out", required=True, help="a new or empty folder for the shards")
    parser.add_argument("--image-size", type=int, required=True, help="images are resized and centre-cropped to it")
    parser.add_argument("--examples-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def run(args: argparse.Namespace) -> dict:
        for name in ("image_size", "examples_per_shard", "workers"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        return input_pipeline.pack(args.source, args.out, args.image_size, args.examples_per_shard, args.workers)
    return run_command(run, args, (FileNotFoundError, FileExistsError, DataError))


if __name__ == "__main__":
    sys.exit(main())
