"""What the command lines share: one line for a user's mistake, and the flags: generated from the config
dataclasses (each field that declares itself a flag; `--preset` choosing train.py's defaults), `--debug`,
and the parsers train.py, sample.py and evaluate.py build from them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from .config import PRESETS, SamplerConfig, SamplingConfig
from .config.fields import choices_of, is_flag
from .errors import ConfigError, UsageError
from .runtime import use_xla_cpu_convolutions


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
    optional = (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                and type(None) in typing.get_args(annotation))
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
    add_debug_flag(parser)
    add_config_flags(parser.add_argument_group("training"), PRESETS["digits"])
    add_config_flags(parser.add_argument_group("model"), PRESETS["digits"].model)
    return parser


def build_sampling_parser(description: str, defaults: SamplingConfig) -> argparse.ArgumentParser:
    """sample.py's and evaluate.py's flags: --workdir, --debug, each SamplingConfig field (defaults shown:
    `defaults`) and each SamplerConfig field (shown: DDIM's; without any, the run's sampler)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default=PRESETS["digits"].workdir, help="the training run's workdir")
    add_debug_flag(parser)
    add_config_flags(parser.add_argument_group("sampling"), defaults)
    add_sampler_flags(parser)
    return parser


def sampling_config(args: argparse.Namespace, defaults: SamplingConfig, run_sampler: SamplerConfig) -> SamplingConfig:
    """`defaults` with the SamplingConfig fields the command line gave, and its sampler (sampler_from_flags)."""
    sampling_flags = {name: value for name, value in given_fields(args, SamplingConfig).items() if name != "sampler"}
    return dataclasses.replace(defaults, sampler=sampler_from_flags(args, run_sampler), **sampling_flags)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each SamplerConfig field (shown: DDIM's defaults)."""
    add_config_flags(parser.add_argument_group("sampler (without these flags: the run's own, see TrainConfig.sampler)"),
                     SamplerConfig())


def sampler_from_flags(args: argparse.Namespace, run_sampler: SamplerConfig) -> SamplerConfig:
    """The run's sampler (`run_sampler`) with the sampler flags given, or, where --sampler names another,
    that one's defaults with them."""
    flags = given_fields(args, SamplerConfig)
    name = flags.get("sampler", run_sampler.sampler)
    base = run_sampler if name == run_sampler.sampler else SamplerConfig(name)
    return dataclasses.replace(base, **flags)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug: run_command shows a user's mistake with its traceback instead of one line."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
