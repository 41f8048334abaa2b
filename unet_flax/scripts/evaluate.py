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
import json
import sys
from pathlib import Path

from unet_flax import evaluation
from unet_flax.checkpoint import load_config
from unet_flax.cli import build_sampling_parser, run_command, sampling_config
from unet_flax.config import SamplingConfig
from unet_flax.errors import UsageError
from unet_flax.sampling import sample_from_checkpoint

# As many samples as the real training split, in larger batches than sample.py's.
DEFAULTS = SamplingConfig(num_samples=1347, batch_size=250)


def evaluate(args: argparse.Namespace) -> dict:
    config = load_config(args.workdir, getattr(args, "step", None))  # a model of other data is refused at once
    sampling = sampling_config(args, DEFAULTS, config.sampler)
    evaluation.check_sample_count(sampling.num_samples)
    if config.data is not None or config.model.in_channels != 1:
        raise UsageError(f"evaluate.py measures models of the digits data; {args.workdir} was trained on "
                         f"{config.data!r}")
    samples = sample_from_checkpoint(args.workdir, sampling, progress=True)
    result = {**evaluation.sample_quality(samples.images, samples.labels), "settings": samples.settings}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_sampling_parser(__doc__.split("\n\n")[0], DEFAULTS)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    return run_command(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
