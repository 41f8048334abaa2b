"""Each Flax block against the PyTorch reference (the user's seed code): forward and gradients.

float32, highest matmul precision on both sides, non-default random weights, batch 3 and
non-square odd-sized maps. Forward: max|flax - torch| / max|torch| <= 1e-5; gradients with
respect to every input and every parameter <= 1e-4.
"""
import zlib

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from parity import flax_params, randomize_, rel_error, to_nchw, to_nhwc, torch_grads_as_flax

import unet_flax as uf
from unet_flax import model
from unet_flax import reference as ref

# The parity suite also runs with JAX on the GPU (`pytest --gpu`), against the same CPU reference.
pytestmark = pytest.mark.gpu

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


def _flax_layout(x: torch.Tensor) -> np.ndarray:
    return to_nhwc(x) if x.ndim == 4 else x.numpy()


def _torch_layout(x) -> np.ndarray:
    return to_nchw(x) if np.ndim(x) == 4 else np.asarray(x)


def assert_parity(name, torch_module, flax_module, inputs, record_error, seed=0, float64_reference=False):
    """Forward of both on the same inputs, then one vector-Jacobian product with the same cotangent.

    With `float64_reference` the torch side runs in float64 on the same float32 inputs: the exact
    answer, for inputs so ill-conditioned that float32 implementations differ among themselves.
    """
    torch_module = randomize_(torch_module, seed).eval()
    flax_inputs = [_flax_layout(x) for x in inputs]
    params = flax_params(torch_module, flax_module, *flax_inputs)
    if float64_reference:
        torch_module = torch_module.double()
        inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    torch_inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]

    expected = torch_module(*torch_inputs)
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1)).to(expected.dtype)
    (expected * cotangent).sum().backward()

    differentiable = [i for i, x in enumerate(inputs) if x.is_floating_point()]

    def forward(params, *float_inputs):
        args = list(flax_inputs)
        for i, x in zip(differentiable, float_inputs):
            args[i] = x
        return flax_module.apply({"params": params}, *args)

    actual, vjp = jax.vjp(forward, params, *[flax_inputs[i] for i in differentiable])
    chex.assert_shape(actual, _flax_layout(expected.detach()).shape)
    chex.assert_type(actual, np.float32)
    param_grads, *input_grads = vjp(_flax_layout(cotangent).astype(np.float32))

    error = rel_error(_torch_layout(actual), expected.detach().numpy())
    record_error(name, "forward", error)
    assert error <= FORWARD_TOL, f"{name} forward: {error:.2e}"

    for i, grad in zip(differentiable, input_grads):
        error = rel_error(_torch_layout(grad), torch_inputs[i].grad.numpy())
        record_error(name, "grad inputs", error)
        assert error <= GRAD_TOL, f"{name} d/d(input {i}): {error:.2e}"

    expected_grads = torch_grads_as_flax(torch_module)
    flat_actual = dict(jax.tree_util.tree_leaves_with_path(param_grads))
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    assert flat_actual.keys() == flat_expected.keys()
    for path, grad in flat_actual.items():
        error = rel_error(grad, flat_expected[path])
        record_error(name, "grad params", error)
        assert error <= GRAD_TOL, f"{name} d/d{jax.tree_util.keystr(path)}: {error:.2e}"


def images(channels, height=5, width=7, batch=3, seed=0, mean=0.0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(batch, channels, height, width, generator=generator)


@pytest.mark.parametrize("in_channels,out_channels,num_groups,time_emb_dim", [
    (12, 20, 4, 9),     # channel change: 1x1 skip conv, time modulation
    (16, 16, 8, None),  # identity skip, no time embedding
    (6, 9, 3, 5),       # odd channel counts
])
def test_residual_block(in_channels, out_channels, num_groups, time_emb_dim, record_error):
    inputs = [images(in_channels)]
    if time_emb_dim is not None:
        inputs.append(torch.randn(3, time_emb_dim, generator=torch.Generator().manual_seed(7)))
    assert_parity("ResidualBlock",
                  ref.ResidualBlock(in_channels, out_channels, time_emb_dim, num_groups=num_groups),
                  uf.ResidualBlock(out_channels, time_emb_dim, num_groups=num_groups),
                  inputs, record_error)


def test_residual_block_seed_defaults(record_error):
    """The seed's own signature and its 32 groups, t_emb given: the block exactly as the user wrote it."""
    inputs = [images(64, 6, 4), torch.randn(3, 16, generator=torch.Generator().manual_seed(3))]
    assert_parity("ResidualBlock", ref.ResidualBlock(64, 96, 16), uf.ResidualBlock(96, 16), inputs, record_error)


def test_residual_block_time_mlp_without_t_emb(record_error):
    """time_emb_dim set but no t_emb: the weights exist on both sides, the modulation is skipped."""
    assert_parity("ResidualBlock", ref.ResidualBlock(8, 8, 5, num_groups=2), uf.ResidualBlock(8, 5, num_groups=2),
                  [images(8)], record_error)


def test_residual_block_low_variance_input(record_error):
    """Std 1e-3, so variance 1e-6 is below GroupNorm's epsilon: flax's default 1e-6 would show."""
    inputs = [images(12, std=1e-3), torch.randn(3, 4, generator=torch.Generator().manual_seed(2))]
    assert_parity("ResidualBlock low-var", ref.ResidualBlock(12, 16, 4, num_groups=4),
                  uf.ResidualBlock(16, 4, num_groups=4), inputs, record_error)


@pytest.mark.parametrize("mean,std", [(5.0, 1e-3), (100.0, 1e-2)])
def test_residual_block_large_mean_input(mean, std, record_error):
    """Far from zero relative to the spread: E[x^2] - E[x]^2 cancels catastrophically, and even a
    two-pass float32 mean is off by 1/std-amplified rounding. torch's float32 is itself ~1e-4 from
    the exact answer here, so the Flax block is held to the float64 reference instead."""
    inputs = [images(12, mean=mean, std=std), torch.randn(3, 4, generator=torch.Generator().manual_seed(2))]
    assert_parity("ResidualBlock large-mean", ref.ResidualBlock(12, 16, 4, num_groups=4),
                  uf.ResidualBlock(16, 4, num_groups=4), inputs, record_error, float64_reference=True)


@pytest.mark.parametrize("in_channels,out_channels,time_conditioning,eps,output_scale", [
    (12, 20, "additive", 1e-6, 1.0),      # DDPM's block: the projection added before norm2
    (8, 8, "additive", 1e-3, 2 ** 0.5),   # identity skip, a middle block's scale factor
    (6, 12, "scale_shift", 1e-6, 0.7),
])
def test_residual_block_variants(in_channels, out_channels, time_conditioning, eps, output_scale, record_error):
    inputs = [images(in_channels), torch.randn(3, 10, generator=torch.Generator().manual_seed(7))]
    assert_parity(f"ResidualBlock {time_conditioning}",
                  ref.ResidualBlock(in_channels, out_channels, 10, 2, 0.0, eps, time_conditioning, output_scale),
                  uf.ResidualBlock(out_channels, 10, 2, 0.0, epsilon=eps, time_conditioning=time_conditioning,
                                   output_scale=output_scale), inputs, record_error)


@pytest.mark.parametrize("normalize,eps,output_scale", [(False, 1e-5, 2 ** 0.5), (True, 1e-3, 0.5)])
def test_attention_block_variants(normalize, eps, output_scale, record_error):
    assert_parity(f"AttentionBlock norm={normalize}", ref.AttentionBlock(12, 3, 4, eps, normalize, output_scale),
                  uf.AttentionBlock(3, 4, epsilon=eps, normalize=normalize, output_scale=output_scale),
                  [images(12, 4, 5)], record_error)


@pytest.mark.parametrize("channels,num_heads,num_groups,height,width", [
    (12, 3, 4, 5, 7),
    (16, 1, 8, 4, 3),
    (24, 6, 4, 3, 6),
    (64, 8, 32, 4, 4),  # the seed's defaults
])
def test_attention_block(channels, num_heads, num_groups, height, width, record_error):
    assert_parity("AttentionBlock", ref.AttentionBlock(channels, num_heads, num_groups),
                  uf.AttentionBlock(num_heads, num_groups), [images(channels, height, width)], record_error)


@pytest.mark.parametrize("channels,context_dim,length,num_heads", [(12, 10, 4, 3), (16, 7, 1, 4), (8, 5, 9, 8)])
def test_cross_attention_block(channels, context_dim, length, num_heads, record_error):
    context = torch.randn(3, length, context_dim, generator=torch.Generator().manual_seed(5))
    assert_parity("CrossAttentionBlock", ref.CrossAttentionBlock(channels, context_dim, num_heads, num_groups=4),
                  uf.CrossAttentionBlock(num_heads, num_groups=4), [images(channels), context], record_error)


@pytest.mark.parametrize("height,width", [(5, 7), (6, 4), (1, 3)])
def test_downsample(height, width, record_error):
    assert_parity("Downsample", ref.Downsample(6), uf.Downsample(), [images(6, height, width)], record_error)


@pytest.mark.parametrize("height,width", [(5, 7), (6, 4), (3, 2)])
def test_downsample_bottom_right(height, width, record_error):
    assert_parity("Downsample bottom_right", ref.Downsample(6, "bottom_right"), uf.Downsample(padding="bottom_right"),
                  [images(6, height, width)], record_error)


@pytest.mark.parametrize("height,width", [(5, 7), (2, 3)])
def test_upsample(height, width, record_error):
    assert_parity("Upsample", ref.Upsample(6), uf.Upsample(), [images(6, height, width)], record_error)


@pytest.mark.parametrize("channels,embed_dim", [(16, 24), (15, 8)])
def test_timestep_embedding(channels, embed_dim, record_error):
    # Up to t = 999, where a float32 phase error in the sinusoid would show.
    t = torch.tensor([0, 1, 17, 500, 999])
    assert_parity("TimestepEmbedding", ref.TimestepEmbedding(channels, embed_dim),
                  uf.TimestepEmbedding(channels, embed_dim), [t], record_error)


@pytest.mark.parametrize("order,shift", [("sin_cos", 1.0), ("cos_sin", 1.0), ("sin_cos", 0.0)])
def test_timestep_embedding_variants(order, shift, record_error):
    t = torch.tensor([0, 3, 250, 998, 999])
    assert_parity(f"TimestepEmbedding {order} shift {shift:g}", ref.TimestepEmbedding(14, 20, order, shift),
                  uf.TimestepEmbedding(14, 20, order=order, frequency_shift=shift), [t], record_error)


def test_sinusoid_order_and_shift():
    """[sin, cos] is [cos, sin] with its halves swapped; the shift divides the exponent by half - shift."""
    t = np.array([0, 7, 999])
    cos_sin = np.asarray(uf.timestep_embedding(t, 8, "cos_sin", 1.0))
    sin_cos = np.asarray(uf.timestep_embedding(t, 8, "sin_cos", 1.0))
    np.testing.assert_array_equal(sin_cos, np.concatenate([cos_sin[:, 4:], cos_sin[:, :4]], axis=1))
    frequencies = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(sin_cos[:, :4], np.sin(t[:, None] * frequencies), atol=1e-4)


def test_sinusoid_matches_reference():
    t = np.arange(0, 1000, 37)
    for dim in (8, 33, 128):
        flax_embedding = np.asarray(uf.timestep_embedding(t, dim))
        torch_embedding = ref.timestep_embedding(torch.from_numpy(t), dim).numpy()
        np.testing.assert_allclose(flax_embedding, torch_embedding, rtol=0, atol=2e-6)


def test_layers_given_one_shared_dropout_seed_draw_masks_of_their_own():
    """GroupNorm's `shared_dropout_seed`: each layer salts it with its own path, so two layers draw different
    masks from one seed, each the mask of that seed and its path's CRC-32; and the same layer, the same mask."""
    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x, seed):
            return [model.GroupNorm(4, name=name)(x, dropout_rate=0.5, shared_dropout_seed=seed) for name in "ab"]

    x = jax.random.normal(jax.random.key(5), (4, 6, 6, 16))
    seed = model.dropout_seed(jax.random.key(3))
    params = TwoLayers().init(jax.random.key(0), x, seed)
    dropped = [np.asarray(out == 0) for out in TwoLayers().apply(params, x, seed)]
    for name, mask in zip("ab", dropped):
        np.testing.assert_array_equal(~mask, model.dropout_mask(seed, 0.5, x.shape, zlib.crc32(name.encode())))
    assert abs((dropped[0] & dropped[1]).mean() - 0.25) <= 5 * np.sqrt(0.25 * 0.75 / x.size)
    np.testing.assert_array_equal(dropped[0], np.asarray(TwoLayers().apply(params, x, seed)[0] == 0))


@pytest.mark.parametrize("keep_rate", [0.9, 0.5])
def test_dropout_mask_keeps_values_independently_at_its_rate(keep_rate):
    """dropout_mask: the share kept is the keep rate, and two values are kept together as often as
    independent draws are (keep_rate**2), whether neighbours along any axis or the same value under another
    key (typed, raw, or a layer's, folded in as make_rng does); the same key gives the same mask. Bounds: 5
    standard deviations of the binomial count."""
    shape = (8, 16, 12, 48)  # 73728 values
    keys = [jax.random.key(0), jax.random.key(1), jax.random.PRNGKey(2), jax.random.fold_in(jax.random.key(0), 7)]
    keep, *others = (np.asarray(model.dropout_mask(model.dropout_seed(key), keep_rate, shape)) for key in keys)
    # Two layers sharing key(0)'s seed, salted with their paths as GroupNorm salts them.
    layers = [np.asarray(model.dropout_mask(model.dropout_seed(keys[0]), keep_rate, shape, zlib.crc32(path.encode())))
              for path in ("up_blocks_0/resnet/norm2", "up_blocks_1/resnet/norm2")]
    assert abs(keep.mean() - keep_rate) <= 5 * np.sqrt(keep_rate * (1 - keep_rate) / keep.size)
    both = keep_rate ** 2
    for a, b in [(keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1]), (keep[:, :, 1:], keep[:, :, :-1]),
                 (keep[..., 1:], keep[..., :-1]), *((keep, other) for other in others + layers),
                 (layers[0], layers[1]), (layers[0][1:], layers[1][:-1])]:
        assert abs((a & b).mean() - both) <= 5 * np.sqrt(both * (1 - both) / a.size)
    np.testing.assert_array_equal(model.dropout_mask(model.dropout_seed(jax.random.key(0)), keep_rate, shape), keep)
