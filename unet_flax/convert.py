"""Weights between the PyTorch reference (a state_dict, NCHW) and the Flax model (a params tree, NHWC).

Names follow one rule both ways, which the two model files keep to:
  torch `a.b.weight`                     <-> flax ('a', 'b', 'kernel' | 'scale' | 'embedding')
  torch `blocks.3.conv1.weight`          <-> flax ('blocks_3', 'conv1', ...)     (nn.ModuleList / list)
  torch `time_mlp.1.weight`              <-> flax ('time_mlp', 'layers_1', ...)  (nn.Sequential, both sides)
An index directly before `weight`/`bias` is a Sequential's layer; any other index is a list entry.
Every transpose is a permutation, so the round trip is bit-exact.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .diffusers_format import from_diffusers, schedule_of, to_diffusers
from .train_config import PRESETS, TrainConfig
from .unet_config import ConfigError, ConversionError, UNetConfig, read_json
from .weights import Params, float32_array, flatten, load_torch_state_dict, unflatten, unwrap

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
            raise ConversionError(f"key {flax_path_to_torch_key(path)!r} has shape {_torch_shape(path, flat[path].shape)}, "
                             f"the model expects {_torch_shape(path, tuple(expected[path].shape))}")


# -- command line: orbax checkpoint <-> PyTorch state_dict file ----------------------------------

def export_checkpoint(workdir: str, out: str, step: int | None = None, ema: bool = True) -> dict:
    """An orbax checkpoint -> a PyTorch state_dict file for reference.UNet, and its config as JSON beside it."""
    import json

    import torch

    from .checkpoint import load_params

    params, config, step = load_params(workdir, step, ema)
    out_path = Path(out)
    if out_path.exists():
        raise FileExistsError(f"{out_path} exists; choose another --out (nothing was written)")
    state_dict = {key: torch.from_numpy(np.array(value)) for key, value in flax_to_torch(params).items()}
    torch.save(state_dict, out_path)
    config_path = out_path.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"step": step, "ema": ema, "state_dict": str(out_path), "config": str(config_path)}


def import_state_dict(state_dict_path: str, config_path: str, workdir: str) -> dict:
    """A PyTorch reference state_dict -> an orbax checkpoint at step 0 that sample.py and train.py resume.

    The config is the JSON `export` writes (a whole training config), or a bare UNetConfig, which
    takes the digits preset's training settings."""
    from .training import param_shapes

    fields = read_json(config_path, "--config")
    config = TrainConfig.from_dict(fields) if "model" in fields else dataclasses.replace(
        PRESETS["digits"], model=UNetConfig.from_dict(fields))
    config = dataclasses.replace(config, workdir=workdir)
    state_dict = load_torch_state_dict(state_dict_path)
    _refuse_used_workdir(workdir)
    # Every check (keys, shapes) before the workdir is created: a bad file leaves nothing behind.
    target = param_shapes(config.model)
    return write_checkpoint(config, torch_to_flax(state_dict, target))


def import_diffusers(model_dir: str, workdir: str, variant: str | None = None) -> dict:
    """A UNet2DModel folder, or a pipeline's folder, -> an orbax checkpoint at step 0 with the cifar10
    preset's optimisation (DDPM's) for fine-tuning: train.py and sample.py take it from there. A
    pipeline's scheduler gives the noise schedule, its length and the prediction; else DDPM's."""
    schedule = schedule_of(model_dir) or {}
    model, params = from_diffusers(model_dir, variant)
    conditional = model.num_classes is not None
    # Without a null label there is nothing to drop labels to, nor to guide against.
    guidance = {} if model.null_label else {"label_dropout": 0.0, "guidance_scale": 1.0}
    base = PRESETS["cifar10"]
    sampling_steps = min(base.sampling_steps, schedule.get("timesteps", base.timesteps))
    config = dataclasses.replace(base, model=model, workdir=workdir, data=None, class_conditional=conditional,
                                 hflip=False, sampling_steps=sampling_steps, **guidance, **schedule)
    _refuse_used_workdir(workdir)
    return {**write_checkpoint(config, params), "model": str(model_dir), "noise_schedule": config.noise_schedule,
            "timesteps": config.timesteps, "prediction": config.prediction}


def _refuse_used_workdir(workdir: str) -> None:
    checkpoints = Path(workdir) / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new --workdir")


def write_checkpoint(config: TrainConfig, params: Any) -> dict:
    """Step 0 of `config.workdir` (a TrainConfig's): these weights as params and EMA, a fresh optimizer."""
    import jax

    from .checkpoint import Checkpoints
    from .training import train_state_from_params

    state = train_state_from_params(config, jax.tree_util.tree_map(np.asarray, params))
    _, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    checkpoints = Checkpoints(config.workdir)
    try:
        checkpoints.save(0, {"train_state": state, "rng": step_rng}, {"next_index": 0}, config.to_dict())
        checkpoints.wait()
    finally:
        checkpoints.close()
    return {"workdir": config.workdir, "step": 0,
            "parameters": int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))}


def export_diffusers(workdir: str, out: str, step: int | None = None, ema: bool = True) -> dict:
    """An orbax checkpoint -> a folder that diffusers' `UNet2DModel.from_pretrained` loads."""
    from .checkpoint import load_params

    params, config, step = load_params(workdir, step, ema)
    to_diffusers(UNetConfig.from_dict(config["model"]), params, out)
    return {"step": step, "ema": ema, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import UsageError, run_command

    parser = argparse.ArgumentParser(prog="python -m unet_flax.convert",
                                     description="Move U-Net weights between orbax checkpoints, the PyTorch "
                                                 "reference and diffusers' UNet2DModel.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="orbax checkpoint -> PyTorch state_dict (+ config .json)")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="the .pt file to write; its config goes beside it as .json")
    export.add_argument("--step", type=int, default=None)
    export.add_argument("--no-ema", action="store_true")
    imp = commands.add_parser("import", help="PyTorch state_dict -> orbax checkpoint (step 0)")
    imp.add_argument("--state-dict", required=True)
    imp.add_argument("--config", required=True, help="the .json export wrote, or a UNetConfig as JSON")
    imp.add_argument("--workdir", required=True)
    imp_diffusers = commands.add_parser("import-diffusers",
                                        help="diffusers UNet2DModel folder -> orbax checkpoint (step 0)")
    imp_diffusers.add_argument("--model", required=True, help="a folder UNet2DModel.save_pretrained wrote, or a "
                                                              "pipeline's (its unet/ and scheduler/)")
    imp_diffusers.add_argument("--variant", default=None, help="the weights variant to read, e.g. fp16 "
                                                               "(diffusion_pytorch_model.fp16.safetensors)")
    imp_diffusers.add_argument("--workdir", required=True)
    exp_diffusers = commands.add_parser("export-diffusers",
                                        help="orbax checkpoint -> diffusers UNet2DModel folder")
    exp_diffusers.add_argument("--workdir", required=True)
    exp_diffusers.add_argument("--out", required=True, help="a new folder for UNet2DModel.from_pretrained")
    exp_diffusers.add_argument("--step", type=int, default=None)
    exp_diffusers.add_argument("--no-ema", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def convert(args):
        if args.command == "export":
            return export_checkpoint(args.workdir, args.out, args.step, not args.no_ema)
        if args.command == "export-diffusers":
            return export_diffusers(args.workdir, args.out, args.step, not args.no_ema)
        if args.command == "import-diffusers":
            return import_diffusers(args.model, args.workdir, args.variant)
        return import_state_dict(args.state_dict, args.config, args.workdir)
    # A .pt file torch refuses is a ConversionError naming the file (weights.load_torch_state_dict).
    return run_command(convert, args, (FileNotFoundError, FileExistsError, RuntimeError),
                       (UsageError, ConfigError, ConversionError))


if __name__ == "__main__":
    raise SystemExit(main())
