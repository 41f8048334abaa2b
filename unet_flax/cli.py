"""What every command line of the project does with a user's mistake: one line, no traceback."""
from __future__ import annotations

import argparse
import json
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
