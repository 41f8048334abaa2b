"""Weights and their configs as plain numpy and JSON, for the converters (unet_flax.torch_format,
unet_flax.diffusers_format): params trees as flat paths and back, any framework's arrays as float32,
PyTorch files refused in one line, config files read with errors that say where."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ConversionError

Params = dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept `variables` ({'params': ...}) as well as the params tree itself."""
    return params["params"] if set(params) == {"params"} else params


def float32_array(value: Any) -> np.ndarray:
    """A weight as float32 numpy, whatever it was stored as (float16 and bfloat16 included: the params
    and the optimiser state are float32; `dtype` only sets the computation)."""
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch; numpy has no bfloat16
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, np.float32)


def load_torch_state_dict(path: Any) -> dict[str, Any]:
    """A PyTorch file of named tensors (a state_dict, or diffusers' .bin), read with
    torch.load(weights_only=True), which runs no code from the file. Anything else, one ConversionError
    naming the file and what is wrong; a missing file stays FileNotFoundError."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle's errors, torch's RuntimeError, a truncated zip ...
        raise ConversionError(f"{path} is not a file of tensors that loads without running code "
                              f"(torch.load with weights_only=True: {_first_reason(error)})") from None
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state_dict (parameter names -> tensors)")
    others = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise ConversionError(f"{path} is not a state_dict: {', '.join(others[:4])}{' ...' if len(others) > 4 else ''} "
                              "hold no tensors (a training checkpoint? pass its model's state_dict)")
    return dict(loaded)


def _first_reason(error: Exception) -> str:
    """The part of torch.load's several-paragraph refusal that says why: its unpickler's own error."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__
def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, or a ConfigError naming the file and where it stops being JSON."""
    try:
        fields = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}, "
                          f"column {error.colno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{what} {path} holds a JSON {type(fields).__name__}, not an object of fields")
    return fields

