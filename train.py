"""Train the diffusion U-Net: `python train.py --help`. The command line is unet_flax/scripts/train.py;
the training loop, callable from Python, is unet_flax/train_loop.py."""
import sys

from unet_flax.scripts.train import main

if __name__ == "__main__":
    sys.exit(main())
