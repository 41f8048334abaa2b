"""Sample from a trained U-Net: `python sample.py --help`. The command line is
unet_flax/scripts/sample.py."""
import sys

from unet_flax.scripts.sample import main

if __name__ == "__main__":
    sys.exit(main())
