"""Weights as plain numpy, for the converters (unet_flax.convert, unet_flax.diffusers_format): params
trees as flat paths and back, and any framework's arrays as float32."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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
