"""The linen modules inside Flax NNX models through flax.nnx.bridge: the same outputs and gradients
as the linen modules with the same weights, weights set from outside (a diffusers import), dropout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_flax import AttentionBlock, CrossAttentionBlock, ResidualBlock, UNet, UNetConfig

BLOCKS = {"resnet": lambda: ResidualBlock(4, 6, num_groups=2),
          "attn": lambda: AttentionBlock(num_heads=2, num_groups=2, attention_impl="xla"),
          "cross": lambda: CrossAttentionBlock(num_heads=2, num_groups=2, attention_impl="xla")}
CONFIG = UNetConfig(in_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), image_size=8, head_dim=4, num_groups=4, num_classes=3,
                    context_dim=5, dropout=0.2, time_conditioning="additive")


class Denoiser(nnx.Module):
    """A user's NNX model: the U-Net and the blocks as its parts, next to NNX's own layers."""

    def __init__(self, config: UNetConfig, rngs: nnx.Rngs):
        self.unet = nnx.bridge.ToNNX(UNet(config), rngs=rngs)
        self.resnet = nnx.bridge.ToNNX(BLOCKS["resnet"](), rngs=rngs)
        self.attn = nnx.bridge.ToNNX(BLOCKS["attn"](), rngs=rngs)
        self.cross = nnx.bridge.ToNNX(BLOCKS["cross"](), rngs=rngs)
        self.head = nnx.Linear(4, config.in_channels, rngs=rngs)

    def __call__(self, x, t, y, context, t_emb, train=False):
        h = self.unet(x, t, y, context, train=train)
        h = self.resnet(jnp.concatenate([h, x[..., :2]], axis=-1), t_emb, train=train)
        h = self.cross(self.attn(h), context)
        return self.head(h)


def inputs():
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (3, 8, 12, 2))
    context = jax.random.normal(keys[1], (3, 4, 5))
    t_emb = jax.random.normal(keys[2], (3, 6))
    return x, jnp.array([0, 421, 999]), jnp.array([0, 2, 3]), context, t_emb


@jax.jit
def linen_forward(params, x, t, y, context, t_emb):
    """The same computation with the linen modules' apply and the NNX model's weights."""
    h = UNet(CONFIG).apply({"params": params["unet"]}, x, t, y, context)
    h = BLOCKS["resnet"]().apply({"params": params["resnet"]}, jnp.concatenate([h, x[..., :2]], axis=-1), t_emb)
    h = BLOCKS["attn"]().apply({"params": params["attn"]}, h)
    h = BLOCKS["cross"]().apply({"params": params["cross"]}, h, context)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


@functools.partial(nnx.jit, static_argnames="train")
def nnx_forward(model: Denoiser, *args, train: bool = False):
    return model(*args, train=train)


@nnx.jit
def lazy_init(model: Denoiser, *args) -> None:
    nnx.bridge.lazy_init(model, *args)  # one compiled program: op by op, the U-Net's init takes minutes


@pytest.fixture(scope="module")
def initialised():
    model = Denoiser(CONFIG, nnx.Rngs(0, dropout=1))
    lazy_init(model, *inputs())
    # Move every weight off its initial value (zero biases, unit scales) so none can hide.
    rng = np.random.default_rng(2)
    nnx.update(model, jax.tree_util.tree_map(lambda leaf: leaf + 0.2 * rng.standard_normal(leaf.shape, np.float32),
                                             nnx.state(model, nnx.Param)))
    return model


@pytest.fixture
def model(initialised):
    return nnx.clone(initialised)


def test_nnx_model_computes_what_the_linen_modules_compute(model):
    args = inputs()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(nnx_forward(model, *args), linen_forward(params, *args), rtol=0, atol=1e-5)


def test_gradients_through_the_bridge_are_the_linen_gradients(model):
    args = inputs()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cotangent = jax.random.normal(jax.random.key(3), args[0].shape)
    nnx_grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(*args) * cotangent)))(model)
    linen_grads = jax.jit(jax.grad(lambda p: jnp.sum(linen_forward(p, *args) * cotangent)))(params)
    nnx_grads = nnx.to_pure_dict(nnx_grads)
    assert jax.tree_util.tree_structure(nnx_grads) == jax.tree_util.tree_structure(linen_grads)
    for path, grad in jax.tree_util.tree_leaves_with_path(linen_grads):
        actual = nnx_grads
        for key in path:
            actual = actual[key.key]
        scale = float(jnp.abs(grad).max()) or 1.0
        assert float(jnp.abs(actual - grad).max()) / scale <= 1e-5, jax.tree_util.keystr(path)


def test_weights_from_outside_replace_the_bridged_ones(model):
    """Weights converted elsewhere (convert.from_diffusers, a linen checkpoint) drop into the NNX model."""
    args = inputs()
    unet_params = jax.tree_util.tree_map(lambda a: -0.5 * a, nnx.to_pure_dict(nnx.state(model.unet, nnx.Param)))
    state = nnx.state(model.unet, nnx.Param)
    nnx.replace_by_pure_dict(state, unet_params)
    nnx.update(model.unet, state)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["unet"], unet_params)
    np.testing.assert_allclose(nnx_forward(model, *args), linen_forward(params, *args), rtol=0, atol=1e-5)


def test_dropout_draws_from_the_nnx_rngs(model):
    args = inputs()
    eval_out = nnx_forward(model, *args)
    first, second = nnx_forward(model, *args, train=True), nnx_forward(model, *args, train=True)
    assert not np.allclose(first, eval_out) and not np.allclose(first, second)  # a fresh mask per call
