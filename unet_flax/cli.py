"""What every command line of the project shares: XLA:CPU tuning, and one line for a user's mistake."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable


def run_command(action: Callable[[argparse.Namespace], dict], args: argparse.Namespace,
                failures: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError)) -> int:
    """Run `action(args)` and print its result as one JSON line (exit 0). A ValueError is a usage error
    (exit 2) and one of `failures` a failure (exit 1): either prints `error: ...` on stderr, with the
    traceback only under --debug."""
    try:
        result = action(args)
    except (ValueError, *failures) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, failures) else 2
    print(json.dumps(result))
    return 0


YNNPACK_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def use_xla_cpu_convolutions() -> None:
    """Keep XLA:CPU's own convolutions instead of YNNPACK's, before JAX starts its CPU backend.

    XLA hands convolutions to YNNPACK by default, which runs each of this U-Net's small ones on a
    single core; XLA's own use every core: the digits train step goes from 278 to 197 ms on 2 cores
    (docs/benchmarks.md). GPUs and TPUs are unaffected; a user's XLA_FLAGS naming the option wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNNPACK_OPTION not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{YNNPACK_OPTION}=".strip()
