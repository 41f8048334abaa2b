"""diffusers' UNet2DModel and DDIMScheduler, installed for real, against unet_flax: folders that
save_pretrained writes, imported (forward, gradients), exported (from_pretrained), round trips,
refusals, the command lines, and DDIM's timestep spacings."""
import copy
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from commands import assert_bit_identical, run_main
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from parity import randomize_, rel_error, to_nchw, to_nhwc

from unet_flax import UNet, UNetConfig, diffusion, samplers
from unet_flax.checkpoint import load_params
from unet_flax.config import SamplerConfig
from unet_flax.diffusers_format import (
    LEGACY_ATTENTION_NAMES,
    NULL_LABEL_KEY,
    from_diffusers,
    params_from_diffusers,
    params_to_diffusers,
    to_diffusers,
    unet_config_from_diffusers,
)
from unet_flax.errors import ConfigError, ConversionError

# What google/ddpm-cifar10-32 and the 256x256 DDPM models (cat, church, bedroom, celebahq) set.
DDPM_FLAGS = dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None)
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

MODELS = {
    # google/ddpm-cifar10-32 at full size: 35.7M parameters, attention at 16x16.
    "ddpm-cifar10-32": (dict(sample_size=32, block_out_channels=[128, 256, 256, 256],
                             down_block_types=[DOWN, ATTN_DOWN, DOWN, DOWN], up_block_types=[UP, UP, ATTN_UP, UP],
                             **DDPM_FLAGS), (32, 24)),
    # The 256x256 DDPM layout (six levels, attention at the fifth) at an eighth of the width.
    "ddpm-256-layout": (dict(sample_size=256, block_out_channels=[16, 16, 32, 32, 64, 64], norm_num_groups=8,
                             down_block_types=[DOWN] * 4 + [ATTN_DOWN, DOWN], up_block_types=[UP, ATTN_UP] + [UP] * 4,
                             **DDPM_FLAGS), (64, 32)),
    # Class labels, scale-shift time conditioning, heads of 8 channels (2, 4 and 6 of them), a middle
    # attention without its GroupNorm and a scaled middle, centred input, [cos, sin].
    "class-scale-shift": (dict(sample_size=16, in_channels=2, out_channels=3, block_out_channels=[16, 32, 48],
                               down_block_types=[DOWN, ATTN_DOWN, ATTN_DOWN], up_block_types=[ATTN_UP, ATTN_UP, UP],
                               layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                               resnet_time_scale_shift="scale_shift", num_class_embeds=5, mid_block_scale_factor=1.4,
                               center_input_sample=True), (12, 20)),
    # Scale-shift with the middle attention's GroupNorm (attn_norm_num_groups), attention at the top
    # level, "UNetRes"-prefixed names, a shifted [cos, sin] embedding.
    "scale-shift-mid-norm": (dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                  layers_per_block=2,
                                  down_block_types=["UNetResAttnDownBlock2D", DOWN], up_block_types=[UP, ATTN_UP],
                                  attention_head_dim=4, norm_num_groups=4, attn_norm_num_groups=4, freq_shift=2,
                                  resnet_time_scale_shift="scale_shift", norm_eps=1e-4), (6, 10)),
    # No middle attention at all.
    "no-mid-attention": (dict(sample_size=8, in_channels=1, out_channels=2, block_out_channels=[8, 8],
                              down_block_types=[ATTN_DOWN, ATTN_DOWN], up_block_types=[ATTN_UP, ATTN_UP],
                              layers_per_block=1, norm_num_groups=2, add_attention=False, **DDPM_FLAGS), (4, 6)),
}


# Weights normal(0, 0.1), GroupNorm scales 1 + normal(0, 0.1). At the blocks' 0.2, a scale-shift
# network with several 8-channel heads is so ill-conditioned that diffusers' own float32 output is
# up to 4.5e-5 from its float64 one: the 1e-5 bound would measure that, not the conversion.
WEIGHT_STD = 0.1


@functools.cache
def saved_model(name: str, tmp_root: str):
    """A randomly initialised UNet2DModel (weights and GroupNorm scales non-default), written by
    save_pretrained, and its import."""
    kwargs, size = MODELS[name]
    torch_model = randomize_(UNet2DModel(**kwargs), seed=3, std=WEIGHT_STD).eval()
    folder = f"{tmp_root}/{name}"
    torch_model.save_pretrained(folder)
    config, params = from_diffusers(folder)
    return torch_model, folder, config, params, size


def make_inputs(torch_model: UNet2DModel, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, torch_model.config.in_channels, *size, generator=generator)
    t = torch.tensor([0, 421, 999])
    classes = torch_model.config.num_class_embeds
    y = None if classes is None else torch.tensor([0, classes - 1, 2])
    return x, t, y


def flax_forward(config, params, x, t, y):
    return to_nchw(jax.jit(UNet(config).apply)({"params": params}, to_nhwc(x), t.numpy(),
                                                None if y is None else y.numpy()))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("diffusers"))


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request, tmp_root):
    return (request.param, *saved_model(request.param, tmp_root))


def test_import_forward(model_case, record_error):
    name, torch_model, _, config, params, size = model_case
    x, t, y = make_inputs(torch_model, size)
    with torch.no_grad():
        expected = torch_model(x, t, y).sample.numpy()
    error = rel_error(flax_forward(config, params, x, t, y), expected)
    record_error(f"diffusers {name}", "forward", error)
    assert error <= 1e-5


# Gradients for the full-size DDPM, the six-level layout and the variant that takes the most paths
# (labels, scale-shift, centred input, scaled middle); the forward checks above already pin every
# weight's place, and test_unet_parity checks gradients of every variant against the reference.
GRADIENT_MODELS = ["ddpm-cifar10-32", "ddpm-256-layout", "class-scale-shift"]


@pytest.mark.parametrize("name", GRADIENT_MODELS)
def test_import_gradients(name, tmp_root, record_error):
    """Gradients of <output, cotangent> for the input and every weight; the torch gradients go
    through the same converter as the weights."""
    torch_model, _, config, params, size = saved_model(name, tmp_root)
    x, t, y = make_inputs(torch_model, size, seed=1)
    x.requires_grad_(True)
    torch_model.zero_grad()
    out = torch_model(x, t, y).sample
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * cotangent).sum().backward()
    expected = params_from_diffusers(config, {k: p.grad for k, p in torch_model.named_parameters()})

    def loss(params, x):
        out = UNet(config).apply({"params": params}, x, t.numpy(), None if y is None else y.numpy())
        return jnp.sum(out * to_nhwc(cotangent))

    param_grads, x_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, to_nhwc(x.detach()))
    input_error = rel_error(to_nchw(x_grad), x.grad.numpy())
    record_error(f"diffusers {name}", "grad inputs", input_error)
    assert input_error <= 1e-4
    expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    actual = dict(jax.tree_util.tree_leaves_with_path(param_grads))
    assert actual.keys() == expected.keys()
    worst = max((rel_error(g, expected[p]), jax.tree_util.keystr(p)) for p, g in actual.items())
    record_error(f"diffusers {name}", "grad params", worst[0])
    assert worst[0] <= 1e-4, worst


def test_diffusers_flax_diffusers_is_bit_exact(model_case):
    _, torch_model, _, config, params, _ = model_case
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    back = params_to_diffusers(config, params)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


# unet_flax's own configurations, trained here and handed to diffusers.
EXPORTS = {
    # Class-conditional with the null label (kept as one more class embedding), 2 heads of 12.
    "class-null-label": UNetConfig(in_channels=3, base_channels=12, channel_mults=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(8,), image_size=16, num_heads=2, num_groups=4,
                                   num_classes=4),
    # Heads sized by head_dim at two resolutions, additive time conditioning, the DDPM flags.
    "ddpm-head-dim": UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2, 3), num_res_blocks=2,
                                attention_resolutions=(8, 4), image_size=16, head_dim=4, num_groups=4,
                                time_conditioning="additive", norm_eps=1e-6, timestep_embedding_order="sin_cos",
                                timestep_frequency_shift=1.0, downsample_padding="bottom_right"),
    # Scale-shift without the middle attention's GroupNorm, a scaled middle, centred input.
    "scale-shift-no-mid-norm": UNetConfig(in_channels=2, base_channels=8, channel_mults=(1, 1), num_res_blocks=1,
                                          attention_resolutions=(4,), image_size=8, head_dim=2, num_groups=2,
                                          mid_attention_norm=False, mid_block_scale_factor=2 ** 0.5,
                                          center_input=True),
}


def random_params(config: UNetConfig, seed: int):
    """Params of the config's shapes drawn as randomize_ draws torch weights (GroupNorm scales 1 + noise)."""
    shapes = jax.eval_shape(UNet(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, config.in_channels)),
                            jnp.zeros((1,), jnp.int32),
                            None if config.num_classes is None else jnp.zeros((1,), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (path[-1].key == "scale") + WEIGHT_STD * rng.standard_normal(leaf.shape, np.float32),
        shapes)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_diffusers(name, tmp_path, record_error):
    config = EXPORTS[name]
    params = random_params(config, seed=5)
    folder = to_diffusers(config, params, tmp_path / "out")
    torch_model = UNet2DModel.from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, config.in_channels, 8, 12, generator=generator)
    t = torch.tensor([17, 980])
    y = None if config.num_classes is None else torch.tensor([3, 0])
    with torch.no_grad():
        expected = torch_model(x, t, y).sample.numpy()
    error = rel_error(flax_forward(config, params, x, t, y), expected)
    record_error(f"diffusers export {name}", "forward", error)
    assert error <= 1e-5
    # Back again: the same network and bit-identical weights.
    imported, imported_params = from_diffusers(folder)
    assert_bit_identical(imported_params, jax.device_get(params))
    channels = sorted(config.attended_channels())
    assert [imported.attention_heads(c) for c in channels] == [config.attention_heads(c) for c in channels]
    assert dataclasses.replace(imported, num_heads=config.num_heads, head_dim=config.head_dim) == config


def test_null_label_travels_as_one_more_class(tmp_path):
    config = EXPORTS["class-null-label"]
    to_diffusers(config, random_params(config, 0), tmp_path / "out")
    fields = json.loads((tmp_path / "out" / "config.json").read_text())
    assert fields["num_class_embeds"] == config.num_classes + 1 and fields[NULL_LABEL_KEY] is True
    # A diffusers model with labels and no such key has no null label.
    del fields[NULL_LABEL_KEY]
    imported = unet_config_from_diffusers(fields)
    assert imported.num_classes == config.num_classes + 1 and not imported.null_label


def test_legacy_bin_and_sharded_folders_import_the_same(tmp_root, tmp_path):
    """A .bin with the attention names of diffusers before 0.14, and a sharded safetensors folder."""
    torch_model, folder, config, params, _ = saved_model("class-scale-shift", tmp_root)
    legacy = {}
    for key, value in torch_model.state_dict().items():
        for new, old in {v: k for k, v in LEGACY_ATTENTION_NAMES.items()}.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".query." in key for key in legacy) and any(".proj_attn." in key for key in legacy)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(Path(folder, "config.json").read_text())
    torch.save(legacy, tmp_path / "bin" / "diffusion_pytorch_model.bin")
    _, bin_params = from_diffusers(tmp_path / "bin")
    assert_bit_identical(bin_params, params)

    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _, sharded_params = from_diffusers(tmp_path / "sharded")
    assert_bit_identical(sharded_params, params)


BASE_FIELDS = {"sample_size": 16, "block_out_channels": [16, 32], "down_block_types": [DOWN, ATTN_DOWN],
               "up_block_types": [ATTN_UP, UP], "norm_num_groups": 8}


# Each a config diffusers builds (but for the last three), with what the refusal says.
@pytest.mark.parametrize("change,message", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type = 'fourier' cannot be expressed"),
    ({"down_block_types": [DOWN, "SkipDownBlock2D"]}, "down_block_types contains 'SkipDownBlock2D'"),
    ({"up_block_types": [UP, ATTN_UP]}, r"up_block_types = \['UpBlock2D', 'AttnUpBlock2D'\] cannot be expressed"),
    ({"block_out_channels": [16, 24]}, r"block_out_channels = \[16, 24\] cannot be expressed"),
    ({"attn_norm_num_groups": 4}, "attn_norm_num_groups = 4 cannot be expressed"),
    ({"mid_block_type": None}, "mid_block_type = None cannot be expressed"),
    ({"upsample_type": "resnet"}, "upsample_type = 'resnet' cannot be expressed"),
    ({"class_embed_type": "timestep"}, "class_embed_type = 'timestep' cannot be expressed"),
    ({"act_fn": "mish"}, "act_fn = 'mish' cannot be expressed"),
    ({"time_embedding_dim": 100}, "time_embedding_dim = 100 cannot be expressed"),
    ({"sample_size": [16, 32]}, r"sample_size = \[16, 32\] cannot be expressed"),
    ({"block_out_channels": [16, 32, 32]}, "lengths 2, 2, 3"),
    ({"cross_attention_dim": 8}, "config field cross_attention_dim = 8 is not a UNet2DModel argument"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name 'UNet2DConditionModel'"),
])
def test_inexpressible_configs_are_refused_naming_the_field(change, message):
    fields = {**BASE_FIELDS, **change}
    if not {"cross_attention_dim", "_class_name"} & change.keys() and "lengths" not in message:
        UNet2DModel(**fields)  # a configuration diffusers itself accepts
    with pytest.raises(ConfigError, match=message):
        unet_config_from_diffusers(fields)


def test_weights_that_do_not_fit_are_refused_naming_the_key(tmp_root):
    torch_model, _, config, _, _ = saved_model("no-mid-attention", tmp_root)
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    expected = jax.eval_shape(UNet(config).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    with pytest.raises(ConversionError, match=r"missing key 'conv_out.bias'"):
        params_from_diffusers(config, {k: v for k, v in state_dict.items() if k != "conv_out.bias"}, expected)
    with pytest.raises(ConversionError, match=r"unknown key 'mid_block.attentions.0.to_q.weight' with shape \(8, 8\)"):
        params_from_diffusers(config, {**state_dict, "mid_block.attentions.0.to_q.weight": np.zeros((8, 8))}, expected)
    wrong = {**state_dict, "conv_in.weight": np.zeros((8, 2, 3, 3), np.float32)}
    with pytest.raises(ConversionError, match=r"conv_in has shapes \[\(8, 2, 3, 3\), \(8,\)\], the config expects "
                                              r"\[\(8, 1, 3, 3\), \(8,\)\]"):
        params_from_diffusers(config, wrong, expected)


@pytest.mark.parametrize("change,message", [
    (dict(context_dim=4), "context_dim = 4: UNet2DModel has no cross-attention"),
    (dict(channel_mults=(2, 2)), r"channel_mults\[0\] = 2"),
    (dict(num_heads=2, attention_resolutions=(8, 4)), r"num_heads = 2 over attention blocks of \[8, 16\] channels"),
    (dict(time_conditioning="additive", mid_attention_norm=False), "mid_attention_norm = False with additive"),
])
def test_export_refuses_what_diffusers_cannot_state_and_writes_nothing(change, message, tmp_path):
    config = UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(8,), image_size=8, num_heads=1, num_groups=4)
    config = dataclasses.replace(config, **change)
    with pytest.raises(ConfigError, match=message):
        to_diffusers(config, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_convert(*args):
    return run_main("unet_flax.scripts.convert", *args)


def test_command_lines_import_sample_fine_tune_export(tmp_root, tmp_path):
    """import-diffusers -> sample.py -> train.py (just --workdir and the run's own flags) ->
    export-diffusers -> UNet2DModel.from_pretrained gives the trained EMA network's outputs."""
    _, folder, config, _, _ = saved_model("scale-shift-mid-norm", tmp_root)
    workdir, out = tmp_path / "run", tmp_path / "exported"
    result = run_convert("import-diffusers", "--model", folder, "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["step"] == 0
    again = run_convert("import-diffusers", "--model", folder, "--workdir", workdir)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: {workdir} already holds checkpoints; import into a new --workdir"]

    sample = run_main("sample.py", "--workdir", workdir, "--num-samples", "3", "--sampling-steps", "2",
                      "--timestep-spacing", "trailing", check=True)
    assert json.loads(sample.stdout.splitlines()[-1])["timestep_spacing"] == "trailing"
    train = run_main("train.py", "--workdir", workdir, "--steps", "2", "--batch-size", "4", "--log-every", "1",
                     "--warmup-steps", "1", "--num-samples", "2", "--sampling-steps", "1", check=True)
    assert json.loads(train.stdout.splitlines()[-1])["resumed_from"] == 0

    result = run_convert("export-diffusers", "--workdir", workdir, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"step": 2, "ema": True, "out": str(out)}
    ema_params, _, _ = load_params(workdir)
    x = torch.randn(2, 1, 8, 6, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = UNet2DModel.from_pretrained(out).eval()(x, t).sample.numpy()
    assert rel_error(flax_forward(config, ema_params, x, t, None), expected) <= 1e-5
    assert not np.array_equal(jax.device_get(ema_params["conv_in"]["kernel"]),
                              saved_model("scale-shift-mid-norm", tmp_root)[3]["conv_in"]["kernel"])

    refused = run_convert("export-diffusers", "--workdir", workdir, "--out", out)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"error: {out} exists and is not an empty folder; choose another --out (nothing was written)"]


def test_a_pipeline_folder_brings_its_scheduler(tmp_root, tmp_path):
    """A DDPMPipeline saved by diffusers, its DDPMScheduler cosine, 100 steps, v-prediction: imported from
    the pipeline's folder or from its unet/, the run has the U-Net's weights, that schedule (the very
    alphas_cumprod of diffusers) and that prediction (diffusers' velocity as the training target)."""
    torch_model, _, config, params, _ = saved_model("scale-shift-mid-norm", tmp_root)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction")
    DDPMPipeline(unet=torch_model, scheduler=scheduler).save_pretrained(tmp_path / "pipeline")
    for model in (tmp_path / "pipeline", tmp_path / "pipeline" / "unet"):
        workdir = tmp_path / f"run_{model.name}"
        result = run_convert("import-diffusers", "--model", model, "--workdir", workdir)
        assert result.returncode == 0, result.stderr[-2000:]
        imported = json.loads(result.stdout)
        assert (imported["noise_schedule"], imported["timesteps"], imported["prediction"]) == ("cosine", 100, "v")
        ema_params, saved, _ = load_params(workdir)
        assert (saved["noise_schedule"], saved["timesteps"], saved["prediction"]) == ("cosine", 100, "v")
        assert saved["sampling_steps"] <= 100
        assert_bit_identical(ema_params, params)

    schedule = diffusion.make_schedule("cosine", 100)
    assert rel_error(schedule.alphas_cumprod, scheduler.alphas_cumprod.numpy()) <= 1e-6
    generator = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(3, 1, 8, 6, generator=generator), torch.randn(3, 1, 8, 6, generator=generator)
    t = torch.tensor([0, 41, 99])
    target = diffusion.training_target(schedule, to_nhwc(x0), t.numpy(), to_nhwc(noise), saved["prediction"])
    assert rel_error(to_nchw(target), scheduler.get_velocity(x0, noise, t).numpy()) <= 1e-6


def test_fp16_variant_in_sharded_bin_files(tmp_root, tmp_path):
    """save_pretrained(variant="fp16") of a half-precision U-Net in .bin shards: without --variant the
    import says which variants the folder holds and writes nothing; with it, float32 params equal to
    the fp16 weights."""
    torch_model, _, config, _, _ = saved_model("scale-shift-mid-norm", tmp_root)
    half = copy.deepcopy(torch_model).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=False, max_shard_size="20KB")
    assert len(list((tmp_path / "fp16").glob("diffusion_pytorch_model.fp16-*.bin"))) > 1
    workdir = tmp_path / "run"
    refused = run_convert("import-diffusers", "--model", tmp_path / "fp16", "--workdir", workdir)
    assert refused.returncode == 1 and not workdir.exists()
    assert refused.stderr.strip().splitlines()[-1].endswith("; it holds the variants fp16 (--variant)")
    result = run_convert("import-diffusers", "--model", tmp_path / "fp16", "--variant", "fp16", "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    ema_params, _, _ = load_params(workdir)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(ema_params)} == {np.dtype(np.float32)}
    expected = params_from_diffusers(config, {k: v.float() for k, v in half.state_dict().items()})
    assert_bit_identical(ema_params, expected)


@pytest.mark.parametrize("scheduler,message", [
    (dict(beta_schedule="scaled_linear"), "scheduler beta_schedule = 'scaled_linear' cannot be expressed: unet_flax "
                                          "supports ('linear', 'squaredcos_cap_v2')"),
    (dict(num_train_timesteps=500), "scheduler beta_start, beta_end = 0.0001, 0.02 with num_train_timesteps = 500 "
                                    "cannot be expressed: unet_flax's linear betas run from 0.0002 to 0.04 (DDPM's, "
                                    "scaled by 1000 / timesteps)"),
    (dict(prediction_type="sample"), "scheduler prediction_type = 'sample' cannot be expressed: unet_flax supports "
                                     "('epsilon', 'v_prediction')"),
    (dict(rescale_betas_zero_snr=True), "scheduler rescale_betas_zero_snr = True cannot be expressed: unet_flax "
                                        "computes its betas from beta_schedule ('linear', 'squaredcos_cap_v2')"),
], ids=["scaled_linear", "linear of 500 steps", "sample prediction", "zero-SNR"])
def test_schedulers_it_cannot_follow_are_refused_in_one_line(scheduler, message, tmp_root, tmp_path):
    torch_model, _, _, _, _ = saved_model("no-mid-attention", tmp_root)
    DDPMPipeline(unet=torch_model, scheduler=DDPMScheduler(**scheduler)).save_pretrained(tmp_path / "pipeline")
    result = run_convert("import-diffusers", "--model", tmp_path / "pipeline", "--workdir", tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_command_line_refuses_what_it_cannot_train_in_one_line(tmp_root, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE_FIELDS, "time_embedding_type": "fourier"}))
    _, two_outputs, _, _, _ = saved_model("no-mid-attention", tmp_root)  # 1 channel in, 2 out
    for model, message in [
            (folder, "time_embedding_type = 'fourier' cannot be expressed: unet_flax supports ('positional',)"),
            (two_outputs, "model out_channels 2 differs from in_channels 1: diffusion predicts noise shaped "
                          "like its input")]:
        result = run_convert("import-diffusers", "--model", model, "--workdir", tmp_path / "run")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {message}"]
        assert not (tmp_path / "run").exists()


# -- DDIM against diffusers' DDIMScheduler ----------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("timesteps,num_steps", [(1000, 50), (1000, 7), (1000, 1000), (100, 3), (10, 4)])
def test_timesteps_are_ddim_schedulers(spacing, timesteps, num_steps):
    scheduler = DDIMScheduler(num_train_timesteps=timesteps, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    steps, previous = diffusion.sampling_timesteps(timesteps, num_steps, spacing)
    np.testing.assert_array_equal(steps, scheduler.timesteps.numpy())
    if spacing != "linspace":  # linspace steps to the next timestep in the list, diffusers to t - T // n
        np.testing.assert_array_equal(previous, np.maximum(steps - timesteps // num_steps, -1))


def test_unknown_timestep_spacing():
    with pytest.raises(ValueError, match="timestep spacing must be one of .* got 'even'"):
        diffusion.sampling_timesteps(1000, 10, "even")


@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 7)])
def test_ddim_matches_diffusers_scheduler(spacing, num_steps, tmp_root, record_error):
    """From the same x_T with the same network (an imported U-Net, its outputs handed to torch):
    diffusers' loop of DDIMScheduler.step (clip_sample, set_alpha_to_one, the clipped model output,
    the same float32 alphas_cumprod) against the DDIM sampler. The network is shared so that the
    samplers alone are compared: with each framework's own network, 7 steps of this random one turn
    diffusers' float32 rounding alone into 8e-5 (against its float64 run)."""
    _, _, config, params, _ = saved_model("ddpm-256-layout", tmp_root)
    model = UNet(config)
    denoise = jax.jit(lambda x_t, t: model.apply({"params": params}, x_t, t))
    schedule = diffusion.make_schedule("linear", 1000)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing=spacing)
    scheduler.alphas_cumprod = torch.tensor(np.asarray(schedule.alphas_cumprod))
    scheduler.set_timesteps(num_steps)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    x = x_T
    for t in scheduler.timesteps:
        output = torch.from_numpy(to_nchw(denoise(to_nhwc(x), np.full(2, int(t)))).copy())
        x = scheduler.step(output, t, x, eta=0.0, use_clipped_model_output=True).prev_sample

    plan = samplers.make_plan(SamplerConfig("ddim", timestep_spacing=spacing), num_steps, "linear", 1000, "epsilon")
    ours = jax.jit(lambda x: samplers.run(denoise, plan, x))(to_nhwc(x_T))
    error = rel_error(to_nchw(ours), x.numpy())
    record_error(f"DDIM {spacing} vs DDIMScheduler", "samples", error)
    assert error <= 1e-4
