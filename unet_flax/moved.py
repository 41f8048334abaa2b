"""Module paths of earlier releases, kept working for one more minor release.

Each old module is a file of a few lines that forwards its names (`forward`) and, where it was a command
(`python -m unet_flax.convert ...`), its command line (`run_moved_command`), warning with a
`DeprecationWarning` that names the new path. The tables here are the one record of what moved.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3.0"

# Old module -> {name it exported: the module that has it now}.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "unet_flax.convert": {
        "torch_to_flax": "unet_flax.torch_format",
        "flax_to_torch": "unet_flax.torch_format",
        "torch_key_to_flax_path": "unet_flax.torch_format",
        "flax_path_to_torch_key": "unet_flax.torch_format",
        "from_diffusers": "unet_flax.diffusers_format",
        "to_diffusers": "unet_flax.diffusers_format",
        "pipeline_to_diffusers": "unet_flax.diffusers_format",
        "export_checkpoint": "unet_flax.scripts.convert",
        "import_state_dict": "unet_flax.scripts.convert",
        "import_diffusers": "unet_flax.scripts.convert",
        "export_diffusers": "unet_flax.scripts.convert",
        "main": "unet_flax.scripts.convert",
    },
    "unet_flax.trainer": {"train": "unet_flax.train_loop"},
    "unet_flax.train_config": {name: "unet_flax.config" for name in
                               ("TrainConfig", "PRESETS", "resolve_config", "fit_to_data")},
}

# Old `python -m` command -> (the command now, the old command's first word that the new one drops).
MOVED_COMMANDS: dict[str, tuple[str, str | None]] = {
    "unet_flax.convert": ("unet_flax.scripts.convert", None),
    "unet_flax.input_pipeline": ("unet_flax.scripts.pack", "pack"),
    "unet_flax.evaluation": ("unet_flax.scripts.train_classifier", None),
}


def forward(old: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of the old module `old`: each name read warns and is the new one."""
    moved = MOVED_NAMES[old]

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} has moved to {moved[name]}.{name}; {old} will be removed in unet_flax "
                      f"{REMOVED_IN}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    def __dir__() -> list[str]:
        return sorted(moved)
    return __getattr__, __dir__


def run_moved_command(old: str, argv: list[str] | None = None) -> int:
    """`python -m OLD ARGS`: warns, then runs the command that replaced it with the same arguments."""
    new, dropped_word = MOVED_COMMANDS[old]
    argv = sys.argv[1:] if argv is None else argv
    if dropped_word is not None and argv[:1] == [dropped_word]:
        argv = argv[1:]
    warnings.warn(f"python -m {old} has moved to python -m {new}; the old command will be removed in unet_flax "
                  f"{REMOVED_IN}", DeprecationWarning, stacklevel=2)
    return importlib.import_module(new).main(argv)
