"""diffusers' UNet2DModel folders <-> (UNetConfig, Flax params), with no diffusers installed.

A folder written by `UNet2DModel.save_pretrained` holds config.json and
diffusion_pytorch_model.safetensors (older ones a .bin, big ones shards and an index, `variant`
ones diffusion_pytorch_model.fp16.safetensors and the like). A pipeline's folder (model_index.json)
holds the U-Net in unet/ and, in scheduler/scheduler_config.json, the noise schedule, the
prediction it was trained with and the scheduler it samples with (read by diffusers_scheduler.py);
`pipeline_to_diffusers` writes one (a DDPMPipeline). The two networks are the same up to names and layout:

  diffusers                                   unet_flax
  down_blocks.{l}.resnets.{j}                 down_blocks_{l * num_res_blocks + j}/resnet
  down_blocks.{l}.attentions.{j}              down_blocks_{...}/attn  (to_q, to_k, to_v fused in to_qkv)
  down_blocks.{l}.downsamplers.0.conv         downsamples_{l}/conv
  mid_block.resnets.0, attentions.0           mid_block1/resnet, mid_block1/attn
  mid_block.resnets.1                         mid_block2/resnet
  up_blocks.{i}.resnets.{j}, attentions.{j}   up_blocks_{i * (num_res_blocks + 1) + j}/...
  up_blocks.{i}.upsamplers.0.conv             upsamples_{i}/conv
  time_embedding.linear_{1,2}                 time_embed/mlp/layers_{0,2}
  class_embedding, conv_norm_out              label_embedding, norm_out

One table of these pairs, built from the UNetConfig, serves both directions; every leaf transform
is a permutation or a split/concatenation, so a round trip is bit-exact.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import SamplerConfig, UNetConfig
from .config.unet_config import GROUP_NORM_EPSILON
from .diffusers_scheduler import SAMPLER_OF, sampler_from_diffusers, schedule_from_diffusers
from .errors import ConfigError, ConversionError
from .weights import Params, flatten, float32_array, load_torch_state_dict, read_json, unwrap

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
# What diffusers looks for, in its order: one file, or shards listed by an index.
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_NAME + ".index.json", BIN_NAME, BIN_NAME + ".index.json")
# diffusion_pytorch_model.fp16.safetensors, its shards (.fp16-00001-of-00002) and index (.index.fp16.json)
VARIANT_FILE = re.compile(r"^diffusion_pytorch_model(?:\.(?:safetensors|bin)\.index)?\.([^.-]+)(?:-\d+-of-\d+)?"
                          r"\.(?:safetensors|bin|json)$")
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# The diffusers release whose UNet2DModel this module reads and writes, as the tests check.
DIFFUSERS_VERSION = "0.42.1"
# Written by export: the last class embedding is unet_flax's null label (diffusers ignores keys with "_").
NULL_LABEL_KEY = "_unet_flax_null_label"

# UNet2DModel's arguments and defaults (diffusers 0.42): what a config.json that omits a key means.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": GROUP_NORM_EPSILON, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# Settings that must have one value, because the U-Net has no other.
FIXED = {"time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D",),
         "downsample_type": ("conv",), "upsample_type": ("conv",), "act_fn": ("silu", "swish"),
         "class_embed_type": (None,), "resnet_time_scale_shift": ("default", "scale_shift"),
         "downsample_padding": (0, 1)}
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Names of the attention weights before diffusers 0.14, which diffusers still renames on load.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# -- config ---------------------------------------------------------------------------------------

def unet_config_from_diffusers(fields: Mapping[str, Any]) -> UNetConfig:
    """UNet2DModel's config.json -> the UNetConfig of the same network; refuses, naming the field and
    its value, what the U-Net cannot express."""
    class_name = fields.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ConfigError(f"_class_name {class_name!r}: only diffusers' UNet2DModel converts")
    unknown = sorted(k for k in fields if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise ConfigError(f"config field {unknown[0]} = {fields[unknown[0]]!r} is not a UNet2DModel "
                          f"argument unet_flax knows (diffusers {DIFFUSERS_VERSION})")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in fields.items() if not k.startswith("_")}}
    for name, allowed in FIXED.items():
        if c[name] not in allowed:
            raise ConfigError(f"{name} = {c[name]!r} cannot be expressed: unet_flax supports {allowed}")
    channels = list(c["block_out_channels"]) if isinstance(c["block_out_channels"], (list, tuple)) else []
    if not channels or not all(isinstance(ch, int) and ch > 0 for ch in channels):
        raise ConfigError(f"block_out_channels = {c['block_out_channels']!r}: must be a non-empty list of "
                          f"positive channel counts")
    base, levels = channels[0], len(channels)
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise ConfigError(f"time_embedding_dim = {c['time_embedding_dim']} cannot be expressed: unet_flax's "
                          f"is 4 x block_out_channels[0] = {4 * base}")
    bad = [ch for ch in channels if ch % base]
    if bad:
        raise ConfigError(f"block_out_channels = {channels} cannot be expressed: each must be a multiple "
                          f"of the first ({base}), {bad[0]} is not")
    if c["norm_num_groups"] is None:
        raise ConfigError("norm_num_groups = None cannot be expressed: unet_flax needs one group count")
    down = [_block_attention(name, DOWN_BLOCKS, "down_block_types") for name in c["down_block_types"]]
    up = [_block_attention(name, UP_BLOCKS, "up_block_types") for name in c["up_block_types"]]
    if not len(down) == len(up) == levels:
        raise ConfigError(f"down_block_types, up_block_types and block_out_channels have lengths "
                          f"{len(down)}, {len(up)}, {levels}: they must be equal")
    if up != down[::-1]:
        raise ConfigError(f"up_block_types = {list(c['up_block_types'])} cannot be expressed: attention in the "
                          f"decoder must mirror down_block_types = {list(c['down_block_types'])}")
    image_size = _image_size(c["sample_size"], 2 ** (levels - 1))
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    groups = c["attn_norm_num_groups"]
    if groups not in (None, c["norm_num_groups"]):
        raise ConfigError(f"attn_norm_num_groups = {groups} cannot be expressed: unet_flax's GroupNorms "
                          f"all have norm_num_groups = {c['norm_num_groups']} groups")
    # Labels from diffusers have no null label, unless unet_flax wrote the model (its last class).
    num_classes, null_label = c["num_class_embeds"], bool(fields.get(NULL_LABEL_KEY, False))
    if num_classes is None:
        null_label = UNetConfig.null_label  # the default: without labels it means nothing
    elif null_label:
        num_classes -= 1
    head_dim = c["attention_head_dim"]
    return UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], base_channels=base,
        channel_mults=tuple(ch // base for ch in channels), num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(image_size // 2**level for level in range(levels) if down[level]),
        image_size=image_size, num_heads=1, head_dim=head_dim, num_groups=c["norm_num_groups"],
        dropout=float(c["dropout"]), num_classes=num_classes, null_label=null_label,
        time_conditioning="scale_shift" if scale_shift else "additive", norm_eps=float(c["norm_eps"]),
        timestep_embedding_order="cos_sin" if c["flip_sin_to_cos"] else "sin_cos",
        timestep_frequency_shift=float(c["freq_shift"]), mid_attention=bool(c["add_attention"]),
        mid_attention_norm=groups is not None or not scale_shift,
        downsample_padding="symmetric" if c["downsample_padding"] == 1 else "bottom_right",
        center_input=bool(c["center_input_sample"]), mid_block_scale_factor=float(c["mid_block_scale_factor"]))


def _block_attention(name: str, known: dict[str, bool], field: str) -> bool:
    stripped = name[len("UNetRes"):] if name.startswith("UNetRes") else name  # diffusers strips it too
    if stripped not in known:
        raise ConfigError(f"{field} contains {name!r}, which cannot be expressed: unet_flax supports "
                          f"{', '.join(known)}")
    return known[stripped]


def _image_size(sample_size: Any, factor: int) -> int:
    sizes = sample_size if isinstance(sample_size, (list, tuple)) else [sample_size]
    if len(set(sizes)) != 1 or not isinstance(sizes[0], int) or sizes[0] < 1 or sizes[0] % factor:
        raise ConfigError(f"sample_size = {sample_size!r} cannot be expressed: unet_flax needs one square size "
                          f"divisible by 2**(levels - 1) = {factor}")
    return sizes[0]


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The config.json of the UNet2DModel that is this network; refuses, saying why, a network that
    UNet2DModel cannot state."""
    if config.context_dim is not None:
        raise ConfigError(f"context_dim = {config.context_dim}: UNet2DModel has no cross-attention")
    if config.channel_mults[0] != 1:
        raise ConfigError(f"channel_mults[0] = {config.channel_mults[0]}: UNet2DModel's first level has "
                          f"the channels of conv_in, so the first multiplier must be 1")
    scale_shift = config.time_conditioning == "scale_shift"
    if config.mid_attention and not config.mid_attention_norm and not scale_shift:
        raise ConfigError("mid_attention_norm = False with additive time conditioning: UNet2DModel always "
                          "gives that attention a GroupNorm")
    levels = range(config.num_levels)
    attention = [config.level_has_attention(level) for level in levels]
    fields = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.image_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "center_input_sample": config.center_input, "time_embedding_type": "positional",
        "time_embedding_dim": None, "freq_shift": _number(config.timestep_frequency_shift),
        "flip_sin_to_cos": config.timestep_embedding_order == "cos_sin",
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": [config.base_channels * m for m in config.channel_mults],
        "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": _number(config.mid_block_scale_factor),
        "downsample_padding": 1 if config.downsample_padding == "symmetric" else 0,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": config.dropout, "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(config), "norm_num_groups": config.num_groups,
        "attn_norm_num_groups": config.num_groups if scale_shift and config.mid_attention_norm else None,
        "norm_eps": config.norm_eps, "resnet_time_scale_shift": "scale_shift" if scale_shift else "default",
        "add_attention": config.mid_attention, "class_embed_type": None,
        "num_class_embeds": config.num_label_embeddings or None, "num_train_timesteps": None,
    }
    if config.num_classes is not None and config.null_label:
        fields[NULL_LABEL_KEY] = True
    return fields


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _attention_head_dim(config: UNetConfig) -> int | None:
    """UNet2DModel sizes every attention by one head size (None: a single head of all channels)."""
    if config.head_dim is not None:
        return config.head_dim
    if config.num_heads == 1:
        return None
    channels = config.attended_channels()
    if len(channels) > 1:
        raise ConfigError(f"num_heads = {config.num_heads} over attention blocks of {sorted(channels)} channels: "
                          f"UNet2DModel states one head size for all of them (train with head_dim instead)")
    return channels.pop() // config.num_heads if channels else None


# -- weights --------------------------------------------------------------------------------------

def module_pairs(config: UNetConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(diffusers module, Flax module path, kind) for every module with weights, in network order."""
    yield "conv_in", ("conv_in",), "conv"
    yield "time_embedding.linear_1", ("time_embed", "mlp", "layers_0"), "linear"
    yield "time_embedding.linear_2", ("time_embed", "mlp", "layers_2"), "linear"
    if config.num_classes is not None:
        yield "class_embedding", ("label_embedding",), "embedding"
    encoder, decoder = config.block_plan()
    index = 0
    for level, blocks in enumerate(encoder):
        for j, spec in enumerate(blocks):
            yield from _block_pairs(f"down_blocks.{level}", j, f"down_blocks_{index}", spec.in_channels,
                                    spec.out_channels, spec.attention, True)
            index += 1
        if level < config.num_levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv", (f"downsamples_{level}", "conv"), "conv"
    channels = encoder[-1][-1].out_channels
    yield from _resnet_pairs("mid_block.resnets.0", ("mid_block1", "resnet"), channels, channels)
    if config.mid_attention:
        yield from _attention_pairs("mid_block.attentions.0", ("mid_block1", "attn"), config.mid_attention_norm)
    yield from _resnet_pairs("mid_block.resnets.1", ("mid_block2", "resnet"), channels, channels)
    index = 0
    for i, blocks in enumerate(decoder):
        for j, spec in enumerate(blocks):
            yield from _block_pairs(f"up_blocks.{i}", j, f"up_blocks_{index}", spec.in_channels,
                                    spec.out_channels, spec.attention, True)
            index += 1
        if i < config.num_levels - 1:
            yield f"up_blocks.{i}.upsamplers.0.conv", (f"upsamples_{i}", "conv"), "conv"
    yield "conv_norm_out", ("norm_out",), "norm"
    yield "conv_out", ("conv_out",), "conv"


def _block_pairs(prefix: str, j: int, name: str, in_channels: int, out_channels: int, attention: bool,
                 attention_norm: bool) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield from _resnet_pairs(f"{prefix}.resnets.{j}", (name, "resnet"), in_channels, out_channels)
    if attention:
        yield from _attention_pairs(f"{prefix}.attentions.{j}", (name, "attn"), attention_norm)


def _resnet_pairs(prefix: str, path: tuple[str, ...], in_channels: int, out_channels: int):
    yield f"{prefix}.norm1", (*path, "norm1"), "norm"
    yield f"{prefix}.conv1", (*path, "conv1"), "conv"
    yield f"{prefix}.time_emb_proj", (*path, "time_mlp", "layers_1"), "linear"
    yield f"{prefix}.norm2", (*path, "norm2"), "norm"
    yield f"{prefix}.conv2", (*path, "conv2"), "conv"
    if in_channels != out_channels:
        yield f"{prefix}.conv_shortcut", (*path, "skip_connection"), "conv"


def _attention_pairs(prefix: str, path: tuple[str, ...], normalize: bool):
    if normalize:
        yield f"{prefix}.group_norm", (*path, "norm"), "norm"
    yield prefix, (*path, "to_qkv"), "qkv"
    yield f"{prefix}.to_out.0", (*path, "to_out"), "linear_1x1"


# The diffusers names under a module of each kind.
KIND_KEYS = {"conv": ("weight", "bias"), "linear": ("weight", "bias"), "linear_1x1": ("weight", "bias"),
             "norm": ("weight", "bias"), "embedding": ("weight",),
             "qkv": ("to_q.weight", "to_k.weight", "to_v.weight", "to_q.bias", "to_k.bias", "to_v.bias")}


def _to_flax(kind: str, w: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A module's diffusers arrays (in KIND_KEYS order) -> its Flax leaves."""
    if kind == "conv":  # Conv2d (out, in, kh, kw) -> Conv (kh, kw, in, out)
        return {"kernel": w[0].transpose(2, 3, 1, 0), "bias": w[1]}
    if kind == "linear":  # Linear (out, in) -> Dense (in, out)
        return {"kernel": w[0].T, "bias": w[1]}
    if kind == "linear_1x1":  # Linear (out, in) -> 1x1 Conv (1, 1, in, out)
        return {"kernel": w[0].T[None, None], "bias": w[1]}
    if kind == "norm":
        return {"scale": w[0], "bias": w[1]}
    if kind == "embedding":
        return {"embedding": w[0]}
    # q, k and v side by side on the output axis: the order AttentionBlock splits to_qkv in.
    return {"kernel": np.concatenate([m.T for m in w[:3]], axis=1)[None, None], "bias": np.concatenate(w[3:])}


def _to_diffusers(kind: str, leaves: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The inverse of _to_flax."""
    if kind == "conv":
        return [leaves["kernel"].transpose(3, 2, 0, 1), leaves["bias"]]
    if kind == "linear":
        return [leaves["kernel"].T, leaves["bias"]]
    if kind == "linear_1x1":
        return [leaves["kernel"][0, 0].T, leaves["bias"]]
    if kind == "norm":
        return [leaves["scale"], leaves["bias"]]
    if kind == "embedding":
        return [leaves["embedding"]]
    kernel, bias = leaves["kernel"][0, 0], leaves["bias"]
    return [m.T for m in np.split(kernel, 3, axis=1)] + list(np.split(bias, 3))


def rename_legacy_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """query/key/value/proj_attn (diffusers before 0.14) -> to_q/to_k/to_v/to_out.0."""
    renamed = {}
    for key, value in state_dict.items():
        *path, name, leaf = key.split(".")
        if name in LEGACY_ATTENTION_NAMES and "attentions" in path:
            key = ".".join([*path, LEGACY_ATTENTION_NAMES[name], leaf])
        renamed[key] = value
    return renamed


def params_from_diffusers(config: UNetConfig, state_dict: Mapping[str, Any],
                          expected: Mapping[str, Any] | None = None) -> Params:
    """UNet2DModel's state_dict (numpy or torch arrays) -> the Flax params tree of `config`'s UNet.

    Every key is used once: an unknown, a missing or (with `expected`, the Flax params or their
    jax.eval_shape) a wrongly shaped one raises ConversionError naming the diffusers key."""
    arrays = rename_legacy_keys({key: float32_array(value) for key, value in state_dict.items()})
    flat_expected = flatten(unwrap(expected)) if expected is not None else None
    params: Params = {}
    for module, path, kind in module_pairs(config):
        keys = [f"{module}.{name}" for name in KIND_KEYS[kind]]
        missing = [key for key in keys if key not in arrays]
        if missing:
            raise ConversionError(f"missing key {missing[0]!r} in the diffusers weights")
        values = [arrays.pop(key) for key in keys]
        node = params
        for name in path:
            node = node.setdefault(name, {})
        for leaf, value in _to_flax(kind, values).items():
            if flat_expected is not None and value.shape != tuple(flat_expected[(*path, leaf)].shape):
                want = _to_diffusers(kind, {name: np.zeros(flat_expected[(*path, name)].shape, np.float32)
                                            for name in _to_flax(kind, values)})
                raise ConversionError(f"{module} has shapes {[v.shape for v in values]}, the config expects "
                                      f"{[w.shape for w in want]}")
            node[leaf] = np.ascontiguousarray(value)
    if arrays:
        key = sorted(arrays)[0]
        raise ConversionError(f"unknown key {key!r} with shape {arrays[key].shape}: the config's UNet2DModel "
                              f"has no such weight")
    return params


def params_to_diffusers(config: UNetConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Flax params tree -> UNet2DModel's state_dict as numpy arrays (diffusers' current names)."""
    params = unwrap(params)
    state_dict = {}
    for module, path, kind in module_pairs(config):
        node = params
        for name in path:
            node = node[name]
        leaves = {name: np.asarray(value, np.float32) for name, value in node.items()}
        for name, value in zip(KIND_KEYS[kind], _to_diffusers(kind, leaves)):
            state_dict[f"{module}.{name}"] = np.ascontiguousarray(value)
    return state_dict


# -- folders --------------------------------------------------------------------------------------

def with_variant(name: str, variant: str | None) -> str:
    """diffusers' file name of a weights `variant`: 'fp16' goes before the last suffix."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def read_state_dict(folder: Path, variant: str | None = None) -> dict[str, np.ndarray]:
    """The weights of a save_pretrained folder as float32: safetensors or the .bin of older diffusers
    (through torch.load(weights_only=True)), one file or the shards its index lists."""
    for base_name in WEIGHT_NAMES:
        name = with_variant(base_name, variant)
        if (folder / name).exists():
            if not base_name.endswith(".index.json"):
                return read_weights_file(folder / name)
            shards = sorted(set(read_json(folder / name, "weights index").get("weight_map", {}).values()))
            return {key: value for shard in shards for key, value in read_weights_file(folder / shard).items()}
    wanted = ", ".join(with_variant(name, variant) for name in WEIGHT_NAMES)
    variants = sorted({m.group(1) for path in folder.iterdir() if (m := VARIANT_FILE.match(path.name))} - {variant})
    hint = f"; it holds the variants {', '.join(variants)} (--variant)" if variants else ""
    raise FileNotFoundError(f"{folder} has none of {wanted}{hint}")


def read_weights_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return {key: float32_array(value) for key, value in load_torch_state_dict(path).items()}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    # Through JAX's arrays: numpy alone has no bfloat16.
    from safetensors.flax import load_file

    return {key: float32_array(value) for key, value in load_file(path).items()}


def model_folders(folder: Path) -> tuple[Path, Path | None]:
    """(the UNet2DModel folder, the pipeline's scheduler_config.json or None) of `folder`: a pipeline's
    folder, its unet/ subfolder, or a lone UNet2DModel folder."""
    if (folder / PIPELINE_INDEX).is_file():
        pipeline = folder
        folder = folder / "unet"
    elif folder.name == "unet" and (folder.parent / PIPELINE_INDEX).is_file():
        pipeline = folder.parent
    else:
        return folder, None
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_NAME} does not exist: the pipeline {pipeline} has no UNet2DModel "
                                f"in unet/")
    scheduler = pipeline / "scheduler" / SCHEDULER_CONFIG
    return folder, scheduler if scheduler.is_file() else None


def from_diffusers(folder: str | Path, variant: str | None = None) -> tuple[UNetConfig, Params]:
    """(UNetConfig, Flax params) from a folder that `UNet2DModel.save_pretrained` wrote, or from the
    unet/ of a pipeline's folder."""
    from .model import param_shapes

    folder, _ = model_folders(Path(folder))
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_NAME} does not exist: {folder} is not a folder that "
                                f"UNet2DModel.save_pretrained wrote")
    config = unet_config_from_diffusers(read_json(folder / CONFIG_NAME, "diffusers config"))
    expected = param_shapes(config)
    return config, params_from_diffusers(config, read_state_dict(folder, variant), expected)


def scheduler_of(folder: str | Path) -> tuple[dict[str, Any], SamplerConfig] | None:
    """The training settings a pipeline's scheduler gives (diffusers_scheduler.schedule_from_diffusers),
    and the sampler equal to it; None for a UNet2DModel folder that is not in a pipeline."""
    _, scheduler = model_folders(Path(folder))
    if scheduler is None:
        return None
    fields = read_json(scheduler, "scheduler config")
    return schedule_from_diffusers(fields), sampler_from_diffusers(fields)


def to_diffusers(config: UNetConfig, params: Mapping[str, Any], folder: str | Path) -> Path:
    """Write `folder` (config.json, diffusion_pytorch_model.safetensors) for UNet2DModel.from_pretrained.
    Every check runs first; an existing non-empty folder is refused, nothing written."""
    folder = Path(folder)
    fields = unet_config_to_diffusers(config)
    state_dict = params_to_diffusers(config, params)
    refuse_used_folder(folder)
    _write_unet(folder, fields, state_dict)
    return folder


# The samplers DDPMPipeline runs as unet_flax does: it neither scales the model's input nor the initial
# noise (the Euler schedulers need both), and passes step() a generator (UniPC's takes none).
PIPELINE_SAMPLERS = ("ddpm", "ddim", "dpm_solver")


def pipeline_to_diffusers(config: UNetConfig, params: Mapping[str, Any], scheduler: Mapping[str, Any],
                          folder: str | Path) -> Path:
    """Write a DDPMPipeline's `folder` (model_index.json, unet/, scheduler/) that
    DiffusionPipeline.from_pretrained loads and runs: the U-Net and the scheduler config
    (diffusers_scheduler.scheduler_to_diffusers). Refused, before anything is written, for class-
    conditional models (DDPMPipeline passes no labels) and schedulers it would run otherwise."""
    folder = Path(folder)
    if config.num_classes is not None:
        raise ConfigError("a class-conditional model cannot be a DDPMPipeline (it passes no class labels): export "
                          "the U-Net alone (without --pipeline)")
    class_name = scheduler["_class_name"]
    sampler = SAMPLER_OF[class_name]
    if sampler not in PIPELINE_SAMPLERS:
        raise ConfigError(f"sampler {sampler} cannot be a DDPMPipeline's scheduler: DDPMPipeline runs "
                          f"{class_name} otherwise than unet_flax (it neither scales the model input nor the initial "
                          f"noise, and passes a generator); choose --sampler {', '.join(PIPELINE_SAMPLERS)}")
    fields = unet_config_to_diffusers(config)
    state_dict = params_to_diffusers(config, params)
    refuse_used_folder(folder)
    _write_unet(folder / "unet", fields, state_dict)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / SCHEDULER_CONFIG).write_text(
        json.dumps({**scheduler, "_diffusers_version": DIFFUSERS_VERSION}, indent=2) + "\n")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", class_name], "unet": ["diffusers", "UNet2DModel"]}
    (folder / PIPELINE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def refuse_used_folder(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose another --out (nothing was written)")


def _write_unet(folder: Path, fields: dict[str, Any], state_dict: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")
