"""The field framework every config uses: what a field declares (a flag or not, its allowed values, what
a resumed run may change) and the checks of values, one line naming the field for each mistake."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import ConfigError

# What may change when a run resumes from a checkpoint: FIXED fields define the network, or which
# batches and noise the remaining steps see; FREE ones may change (learning rate, steps, logging,
# dtype, the driver); PER_PROCESS ones say how this process joins a job, never read from a saved config.
FIXED, FREE, PER_PROCESS = "fixed", "free", "per_process"


def setting(default: Any, *, resume: str = FIXED, choices: tuple[str, ...] | None = None,
            flag: bool = True) -> Any:
    """A config field with what the command line and resuming need to know of it: whether it is a
    flag (not when the data decides it), its allowed values, and its resume policy."""
    return dataclasses.field(default=default, metadata={"resume": resume, "choices": choices, "flag": flag})


def choices_of(field: dataclasses.Field) -> tuple[str, ...] | None:
    return field.metadata.get("choices")


def is_flag(field: dataclasses.Field) -> bool:
    return field.metadata.get("flag", True)


def fields_resumed(cls: type, policy: str) -> tuple[str, ...]:
    """The names of `cls`'s fields with this resume policy (a field that declares none is FIXED)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume", FIXED) == policy)


def check_choices(config: Any) -> None:
    for field in dataclasses.fields(config):
        allowed = choices_of(field)
        if allowed is not None and getattr(config, field.name) not in allowed:
            raise ConfigError(f"{field.name} must be one of {allowed}, got {getattr(config, field.name)!r}")


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False,
                optional: bool = False) -> None:
    """`value` is a finite number (an integer where `integer`; None allowed where `optional`) within
    [low, high], open at an end where asked: else one ConfigError naming the field and the value. Every
    numeric check of every config goes through here, so inf and NaN, which pass a comparison written
    the wrong way round, never reach a run."""
    if value is None and optional:
        return
    or_none = " or None" if optional else ""
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number{or_none}, got {value!r}")
    if integer and not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer{or_none}, got {value!r}")
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if not (above and below):
        raise ConfigError(f"{name} must be {_range_text(low, high, low_open, high_open, integer)}{or_none}, "
                          f"got {value!r}")


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool, integer: bool) -> str:
    if high is None and (low, low_open) in ((0, True), (1, False)):
        return "a positive integer" if integer else "positive"
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
