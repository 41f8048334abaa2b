"""What the command lines share: one line for a user's mistake, flags generated from the config
dataclasses (each field that declares itself a flag; `--preset` choosing train.py's defaults), and
XLA:CPU's convolutions."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import mmap
import os
import pkgutil
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .train_config import PRESETS
from .unet_config import ConfigError, choices_of, is_flag


class UsageError(ValueError):
    """A bad flag or flag combination: one line on stderr, exit code 2."""


def run_command(action: Callable[[argparse.Namespace], dict], args: argparse.Namespace,
                failures: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError),
                usage_errors: tuple[type[Exception], ...] = (UsageError, ConfigError)) -> int:
    """Run `action(args)` and print its result as one JSON line (exit 0).

    The user's mistakes print `error: ...` on stderr in one line (the traceback only under --debug):
    `usage_errors` exit 2, `failures` (missing files, bad data, a run that cannot go on) exit 1.
    Anything else is a fault of the program and propagates with its traceback (exit 1)."""
    use_xla_cpu_convolutions()  # before the action starts JAX's backends
    try:
        result = action(args)
    except (*failures, *usage_errors) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, failures) else 2
    print(json.dumps(result))
    return 0


# -- flags generated from the config dataclasses ---------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_for(annotation: Any):
    """An argparse `type` for a field's annotation: int, float, str, tuples of ints, optionals."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
    inner = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if typing.get_origin(inner) is tuple:
        base = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
    else:
        base = inner

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def add_config_flags(group, defaults: Any, skip: frozenset[str] = frozenset()) -> None:
    """A flag for each field of the dataclass instance `defaults` that declares itself one (see
    unet_config.setting), but those named in `skip`. A flag left out is absent from the parsed
    arguments (see given_fields)."""
    hints = typing.get_type_hints(type(defaults))
    for field in dataclasses.fields(defaults):
        if not is_flag(field) or field.name in skip:
            continue
        default = getattr(defaults, field.name)
        if hints[field.name] is bool:
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"(default: {default})")
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            choices = choices_of(field)
            group.add_argument(_flag(field.name), type=_parser_for(hints[field.name]), choices=choices,
                               default=argparse.SUPPRESS, metavar="{" + ",".join(choices) + "}" if choices
                               else field.name.upper(), help=f"(default: {shown})")


def given_fields(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The fields of the dataclasses `classes` that the command line gave, by name."""
    names = {field.name for cls in classes for field in dataclasses.fields(cls)}
    return {name: value for name, value in vars(args).items() if name in names}


def build_train_parser(description: str) -> argparse.ArgumentParser:
    """train.py's flags: every TrainConfig and UNetConfig field the data does not decide, and --preset."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the defaults every other flag overrides (shown below: digits). Without it, a "
                             "workdir that holds checkpoints gives the config it was saved with; others digits")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_config_flags(parser.add_argument_group("training"), PRESETS["digits"])
    add_config_flags(parser.add_argument_group("model"), PRESETS["digits"].model)
    return parser


# -- XLA:CPU --------------------------------------------------------------------------------------

YNNPACK_OPTION = "xla_cpu_experimental_ynn_fusion_type"
ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu")


def use_xla_cpu_convolutions() -> None:
    """Keep XLA:CPU's own convolutions instead of YNNPACK's, before JAX starts its CPU backend.

    XLA hands convolutions to YNNPACK by default, which runs each of this U-Net's small ones on a
    single core; XLA's own use every core: the digits train step goes from 278 to 197 ms on 2 cores
    (docs/benchmarks.md). Set only where JAX will compute on the CPU and the installed jaxlib knows
    the option (XLA aborts at start-up on a flag it does not know); a user's XLA_FLAGS naming it wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNNPACK_OPTION in flags or not cpu_is_the_backend() or not jaxlib_knows_flag(YNNPACK_OPTION):
        return
    os.environ["XLA_FLAGS"] = f"{flags} --{YNNPACK_OPTION}=".strip()


def cpu_is_the_backend() -> bool:
    """Whether JAX will compute on the CPU, decided without starting it: JAX_PLATFORMS names the CPU
    first, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    plugins = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins
        plugins |= {module.name for module in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        plugins.add("tpu")
    return not any(platform in name for name in plugins for platform in ACCELERATOR_PLATFORMS)


@functools.cache
def jaxlib_knows_flag(name: str) -> bool:
    """Whether the installed jaxlib's XLA defines the flag `name`: its name is in XLA's library."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = name.encode()
    libraries = Path(next(iter(spec.submodule_search_locations))).glob("*.so*")
    for library in sorted(path for path in libraries if path.stat().st_size):
        with open(library, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) >= 0:
                return True
    return False
