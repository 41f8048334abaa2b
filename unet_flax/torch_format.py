"""Weights between the PyTorch reference (a state_dict, NCHW) and the Flax model (a params tree, NHWC).

Names follow one rule both ways, which the two model files keep to:
  torch `a.b.weight`                     <-> flax ('a', 'b', 'kernel' | 'scale' | 'embedding')
  torch `blocks.3.conv1.weight`          <-> flax ('blocks_3', 'conv1', ...)     (nn.ModuleList / list)
  torch `time_mlp.1.weight`              <-> flax ('time_mlp', 'layers_1', ...)  (nn.Sequential, both sides)
An index directly before `weight`/`bias` is a Sequential's layer; any other index is a list entry.
Every transpose is a permutation, so the round trip is bit-exact.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ConversionError
from .weights import Params, flatten, float32_array, unflatten, unwrap

# nn.Embedding weights are (num_embeddings, dim) on both sides: the one 2-D weight not transposed.
EMBEDDING_MODULES = frozenset({"label_embedding"})

_LIST_ENTRY = re.compile(r"^(.+)_(\d+)$")
_SEQUENTIAL_LAYER = re.compile(r"^layers_(\d+)$")



def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """The Flax path of a state_dict entry, leaf name included (the leaf still depends on the array)."""
    *modules, leaf = key.split(".")
    path: list[str] = []
    for i, name in enumerate(modules):
        if not name.isdigit():
            path.append(name)
        elif i == len(modules) - 1:
            path.append(f"layers_{name}")
        elif path:
            path[-1] = f"{path[-1]}_{name}"
        else:
            raise ConversionError(f"state_dict key {key!r} starts with an index; strip the wrapper's prefix first")
    return (*path, leaf)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    *modules, leaf = path
    parts: list[str] = []
    for name in modules:
        if m := _SEQUENTIAL_LAYER.match(name):
            parts.append(m.group(1))
        elif m := _LIST_ENTRY.match(name):
            parts.extend(m.groups())
        else:
            parts.append(name)
    torch_leaf = "bias" if leaf == "bias" else "weight"
    return ".".join([*parts, torch_leaf])


def _flax_leaf(key: str, module: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias" and array.ndim == 1:
        return "bias", array
    if leaf == "weight":
        if array.ndim == 4:  # Conv2d (out, in, kh, kw) -> Conv (kh, kw, in, out)
            return "kernel", array.transpose(2, 3, 1, 0)
        if array.ndim == 2 and module in EMBEDDING_MODULES:
            return "embedding", array
        if array.ndim == 2:  # Linear (out, in) -> Dense (in, out)
            return "kernel", array.T
        if array.ndim == 1:  # GroupNorm
            return "scale", array
    raise ConversionError(f"state_dict key {key!r} with shape {array.shape} is not a weight or bias this model has")


def _torch_leaf(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] in ("bias", "scale", "embedding"):
        return array
    raise ConversionError(f"Flax parameter {'/'.join(path)} with shape {array.shape} has no PyTorch counterpart")


def torch_to_flax(state_dict: Mapping[str, Any], target: Mapping[str, Any] | None = None) -> Params:
    """A PyTorch reference state_dict -> the Flax params tree (nested dicts of numpy arrays).

    With `target` (the Flax params, or `jax.eval_shape` of them), every key and shape is checked
    against it: an unknown key, a missing key or a wrong shape raises ValueError naming the key.
    """
    flat = {}
    for key, value in state_dict.items():
        array = float32_array(value)
        *path, _ = torch_key_to_flax_path(key)
        leaf, converted = _flax_leaf(key, path[-1] if path else "", array)
        flat[(*path, leaf)] = np.ascontiguousarray(converted)
    if target is not None:
        _check_against(flat, flatten(unwrap(target)))
    return unflatten(flat)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Flax params tree -> {state_dict key: numpy array} for the PyTorch reference.

    Load it with `reference.load_numpy_state_dict(module, arrays)` (a strict load_state_dict).
    """
    return {
        flax_path_to_torch_key(path): np.ascontiguousarray(_torch_leaf(path, float32_array(value)))
        for path, value in flatten(unwrap(params)).items()
    }


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax parameter, for error messages in the user's terms."""
    if path[-1] == "kernel":
        return tuple(flax_shape[i] for i in ((3, 2, 0, 1) if len(flax_shape) == 4 else (1, 0)))
    return tuple(flax_shape)


def _check_against(flat: Mapping[tuple[str, ...], np.ndarray], expected: Mapping[tuple[str, ...], Any]) -> None:
    unknown = sorted(flat.keys() - expected.keys())
    if unknown:
        path = unknown[0]
        raise ConversionError(f"unknown key {flax_path_to_torch_key(path)!r} with shape "
                         f"{_torch_shape(path, flat[path].shape)}: the Flax model has no {'/'.join(path)}")
    missing = sorted(expected.keys() - flat.keys())
    if missing:
        path = missing[0]
        raise ConversionError(f"missing key {flax_path_to_torch_key(path)!r}: the model expects shape "
                         f"{_torch_shape(path, tuple(expected[path].shape))}")
    for path in sorted(flat):
        if flat[path].shape != tuple(expected[path].shape):
            given, wanted = _torch_shape(path, flat[path].shape), _torch_shape(path, tuple(expected[path].shape))
            raise ConversionError(f"key {flax_path_to_torch_key(path)!r} has shape {given}, the model expects {wanted}")
