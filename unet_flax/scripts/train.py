"""Train the diffusion U-Net.

    python train.py                          # the digits demo on this machine's devices
    python train.py --preset cifar10 --data /path/to/cifar-10-batches-py --parallel jit

Every field of the config is a flag (`python train.py --help`). A workdir that holds checkpoints
is resumed from its latest one, with the config saved there as the defaults (unless --preset):
`python train.py --workdir W --steps N` trains on. The last line printed is a JSON summary of the run.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import jax

from unet_flax import job, supervisor, train_loop
from unet_flax.checkpoint import saved_config
from unet_flax.cli import build_train_parser, given_fields, run_command
from unet_flax.config import PRESETS, TrainConfig, UNetConfig, resolve_config
from unet_flax.errors import DataError, SaveError, TrainingError
from unet_flax.runtime import use_compilation_cache


def run(args: argparse.Namespace) -> dict:
    given = given_fields(args, TrainConfig, UNetConfig)
    if given.get("distributed"):  # first: which process this is decides how the saved config is read
        job.join_job(given.get("coordinator_address"), given.get("num_processes"), given.get("process_id"))
    saved = saved_config(given.get("workdir", PRESETS["digits"].workdir)) if args.preset is None else None
    config = resolve_config(given, args.preset, saved, jax.default_backend())
    return train_loop.train(config)


def main(argv: list[str] | None = None) -> int:
    args = build_train_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    given = given_fields(args, TrainConfig, UNetConfig)
    if given.get("distributed") and not supervisor.follow_supervisor():  # before JAX's backends start
        workdir = given.get("workdir") or PRESETS[args.preset or "digits"].workdir
        return supervisor.supervise("unet_flax.scripts.train",
                                    sys.argv[1:] if argv is None else argv, workdir, given.get("coordinator_address"))
    use_compilation_cache()
    try:
        code = run_command(run, args, (TrainingError, SaveError, DataError))
    except BaseException:
        if jax.distributed.is_initialized():  # the peers are stopping: no shutdown barrier to wait in
            traceback.print_exc()
            job.end_failed_job(1)
        raise
    if code and jax.distributed.is_initialized():
        job.end_failed_job(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
