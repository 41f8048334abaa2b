"""The command lines: `python train.py`, `sample.py` and `evaluate.py` (or, installed, `unet-flax-train`,
`unet-flax-sample` and `unet-flax-evaluate`), each a `main(argv)` around the library."""
