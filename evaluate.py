"""Measure a digits model's sample quality: `python evaluate.py --help`. The command line is
unet_flax/scripts/evaluate.py."""
import sys

from unet_flax.scripts.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
