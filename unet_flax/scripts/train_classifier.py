"""Retrain the digit classifier evaluate.py measures with, and write its weights where the package ships them.

    python -m unet_flax.scripts.train_classifier            # 16x16, about 100 s on 2 CPU cores

Deterministic on a given machine: the shipped weights are what this wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.serialization

from unet_flax import evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=16, help="the digits' size the classifier reads")
    args = parser.parse_args(argv)
    path = Path(str(evaluation.SHIPPED).format(size=args.image_size))
    path.write_bytes(flax.serialization.to_bytes(evaluation.train_classifier(args.image_size)))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
