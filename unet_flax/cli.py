"""What the command lines share: one line for a user's mistake, the training flags generated from
`TrainConfig` (every field a flag, `--preset` choosing the defaults), and XLA:CPU's convolutions."""
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

from .train_config import CHOICES, PRESETS, TrainConfig
from .unet_config import ConfigError, UNetConfig


class UsageError(ValueError):
    """A bad flag or flag combination: one line on stderr, exit code 2."""


def run_command(action: Callable[[argparse.Namespace], dict], args: argparse.Namespace,
                failures: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError),
                usage_errors: tuple[type[Exception], ...] = (UsageError, ConfigError)) -> int:
    """Run `action(args)` and print its result as one JSON line (exit 0).

    The user's mistakes print `error: ...` on stderr in one line (the traceback only under --debug):
    `usage_errors` exit 2, `failures` (missing files, bad data, a run that cannot go on) exit 1.
    Anything else is a fault of the program and propagates with its traceback (exit 1)."""
    try:
        result = action(args)
    except (*failures, *usage_errors) as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, failures) else 2
    print(json.dumps(result))
    return 0


# -- the training command line, generated from TrainConfig -----------------------------------------

# Set by train.py from the data (channels; labels with --class-conditional), not by flags; and
# train.py has no conditioning context to give a cross-attention model.
NOT_FLAGS = {"model", "in_channels", "num_classes", "context_dim"}


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


def _add_fields(group, cls, defaults) -> list[str]:
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        if field.name in NOT_FLAGS:
            continue
        names.append(field.name)
        default = getattr(defaults, field.name)
        if hints[field.name] is bool:
            group.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"(default: {default})")
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            choices = CHOICES.get(field.name)
            group.add_argument(_flag(field.name), type=_parser_for(hints[field.name]), choices=choices,
                               default=argparse.SUPPRESS, metavar="{" + ",".join(choices) + "}" if choices
                               else field.name.upper(), help=f"(default: {shown})")
    return names


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the defaults every other flag overrides (shown below: digits). Without it, a "
                             "workdir that holds checkpoints gives the config it was saved with; others digits")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_fields(parser.add_argument_group("training"), TrainConfig, PRESETS["digits"])
    _add_fields(parser.add_argument_group("model"), UNetConfig, PRESETS["digits"].model)
    return parser


# How this process joins a job: never taken from a saved config, which holds process 0's.
PER_PROCESS_FIELDS = ("distributed", "coordinator_address", "num_processes", "process_id")


def config_from_args(args: argparse.Namespace, saved: dict | None = None) -> TrainConfig:
    """The defaults with every flag given on the command line applied over them: --preset's; without
    it `saved` (the config of the checkpoints being resumed), so a run goes on with just --workdir;
    else the digits preset's."""
    if args.preset is None and saved is not None:
        base = TrainConfig.from_dict(saved)
        base = dataclasses.replace(base, **{name: getattr(PRESETS["digits"], name) for name in PER_PROCESS_FIELDS})
    else:
        base = PRESETS[args.preset or "digits"]
    given = vars(args)
    model_names = {f.name for f in dataclasses.fields(UNetConfig)}
    model = dataclasses.replace(base.model, **{k: v for k, v in given.items() if k in model_names})
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return dataclasses.replace(base, model=model, **{k: v for k, v in given.items() if k in train_names})


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
