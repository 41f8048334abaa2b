"""Weight conversion: bit-exact both ways, and errors that name the key and both shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import randomize_

from unet_flax import UNet, UNetConfig
from unet_flax import reference as ref
from unet_flax.torch_format import flax_to_torch, torch_to_flax

CONFIG = UNetConfig(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), image_size=8, num_heads=2, num_groups=4,
                    num_classes=3, context_dim=5)


def flax_init(config=CONFIG, seed=0):
    x = jnp.zeros((1, 8, 8, config.in_channels))
    return UNet(config).init(jax.random.key(seed), x, jnp.zeros(1), jnp.zeros(1, int), jnp.zeros((1, 2, 5)))["params"]


@pytest.fixture(scope="module")
def target():
    return flax_init()


def test_torch_flax_torch_is_bit_exact(target):
    state_dict = randomize_(ref.UNet(CONFIG), seed=3).state_dict()
    back = flax_to_torch(torch_to_flax(state_dict, target))
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_become_float32_params(target, dtype, tmp_path):
    """A state_dict saved in half precision, as a .pt or as safetensors: float32 params holding exactly
    the half-precision values (the optimiser state built from them is float32 too)."""
    from safetensors.torch import save_file

    from unet_flax.diffusers_format import read_safetensors

    half = {k: v.to(dtype) for k, v in randomize_(ref.UNet(CONFIG), seed=4).state_dict().items()}
    save_file(half, tmp_path / "half.safetensors")
    for loaded in (half, read_safetensors(tmp_path / "half.safetensors")):
        params = torch_to_flax(loaded, target)
        for key, value in flax_to_torch(params).items():
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, half[key].float().numpy(), err_msg=key)


def test_flax_torch_flax_is_bit_exact(target):
    back = torch_to_flax(flax_to_torch(target), target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(target))


def test_flax_weights_load_strictly_into_the_reference(target):
    model = ref.load_numpy_state_dict(ref.UNet(CONFIG), flax_to_torch({"params": target}))
    np.testing.assert_array_equal(model.conv_in.weight.detach().numpy(),
                                  np.asarray(target["conv_in"]["kernel"]).transpose(3, 2, 0, 1))


def test_every_block_converts_on_its_own():
    block = randomize_(ref.ResidualBlock(8, 12, 6, num_groups=4), seed=0)
    params = torch_to_flax(block.state_dict())
    assert set(params) == {"norm1", "conv1", "time_mlp", "norm2", "conv2", "skip_connection"}
    assert params["time_mlp"]["layers_1"]["kernel"].shape == (6, 24)
    assert params["conv1"]["kernel"].shape == (3, 3, 8, 12)


def test_unknown_key(target):
    state_dict = ref.UNet(CONFIG).state_dict()
    state_dict["mid_block1.extra.weight"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"unknown key 'mid_block1\.extra\.weight' with shape \(4, 2\)"):
        torch_to_flax(state_dict, target)


def test_missing_key(target):
    state_dict = ref.UNet(CONFIG).state_dict()
    del state_dict["up_blocks.1.resnet.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing key 'up_blocks\.1\.resnet\.conv2\.weight'.*\(16, 16, 3, 3\)"):
        torch_to_flax(state_dict, target)


def test_wrong_shape(target):
    state_dict = ref.UNet(CONFIG).state_dict()
    state_dict["conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    with pytest.raises(ValueError,
                       match=r"'conv_in\.weight' has shape \(8, 4, 3, 3\), the model expects \(8, 3, 3, 3\)"):
        torch_to_flax(state_dict, target)


def test_another_configs_weights_are_refused(target):
    other = UNetConfig(**{**CONFIG.to_dict(), "base_channels": 12})
    with pytest.raises(ValueError, match=r"has shape .* the model expects"):
        torch_to_flax(ref.UNet(other).state_dict(), target)


def test_buffers_and_odd_tensors_are_named():
    with pytest.raises(ValueError, match=r"'norm\.running_mean'"):
        torch_to_flax({"norm.running_mean": torch.zeros(3)})
