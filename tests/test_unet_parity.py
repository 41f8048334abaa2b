"""The whole Flax UNet against the PyTorch reference UNet: forward, gradients, bf16."""
import copy
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import flax_params, randomize_, rel_error, to_nchw, to_nhwc, torch_grads_as_flax

from unet_flax import UNet, UNetConfig
from unet_flax import reference as ref

# The parity suite also runs with JAX on the GPU (`pytest --gpu`), against the same CPU reference.
pytestmark = pytest.mark.gpu

CONFIGS = {
    # Two levels, attention at the lower one; non-square input.
    "plain": (UNetConfig(in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                         attention_resolutions=(8,), image_size=16, num_heads=4, num_groups=8), (16, 12)),
    # Labels (with the null label in the batch) and a cross-attention context; dropout off in eval.
    "class+context": (UNetConfig(in_channels=2, out_channels=3, base_channels=12, channel_mults=(1, 2),
                                 num_res_blocks=1, attention_resolutions=(8,), image_size=16, num_heads=3,
                                 num_groups=4, num_classes=5, context_dim=7, dropout=0.1), (8, 14)),
    # Three levels, attention at two sizes, odd multiplier, 2 res blocks per level.
    "three-level": (UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2, 3), num_res_blocks=2,
                               attention_resolutions=(8, 4), image_size=16, num_heads=2, num_groups=4), (12, 20)),
    # diffusers' DDPM variants: time added before norm2, eps 1e-6, [sin, cos] with shift 1, heads sized by
    # head_dim, right/bottom downsample padding, centred input, scaled middle without its attention norm,
    # labels without a null label.
    "ddpm-variants": (UNetConfig(in_channels=3, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                                 attention_resolutions=(8,), image_size=16, num_groups=4, head_dim=4,
                                 time_conditioning="additive", norm_eps=1e-6, timestep_embedding_order="sin_cos",
                                 timestep_frequency_shift=1.0, downsample_padding="bottom_right",
                                 center_input=True, mid_block_scale_factor=2 ** 0.5, mid_attention_norm=False,
                                 num_classes=3, null_label=False), (12, 20)),
    # No middle attention; scale-shift with a large epsilon.
    "no-mid-attention": (UNetConfig(in_channels=2, base_channels=8, channel_mults=(1, 3), num_res_blocks=2,
                                    attention_resolutions=(16,), image_size=16, num_heads=2, num_groups=2,
                                    norm_eps=1e-3, mid_attention=False), (10, 6)),
}


def make_inputs(config: UNetConfig, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = 3
    x = torch.randn(batch, config.in_channels, *size, generator=generator)
    t = torch.tensor([0, 421, 999])
    last = config.num_classes if config.null_label else 1  # the null label where there is one
    y = None if config.num_classes is None else torch.tensor([0, config.num_classes - 1, last])
    context = None if config.context_dim is None else torch.randn(batch, 4, config.context_dim, generator=generator)
    return x, t, y, context


@functools.cache
def build_case(name):
    """The torch model with random weights, its weights converted for Flax, and the inputs."""
    config, size = CONFIGS[name]
    torch_model = randomize_(ref.UNet(config), seed=1).eval()
    x, t, y, context = make_inputs(config, size)
    flax_args = (to_nhwc(x), t.numpy(), None if y is None else y.numpy(),
                 None if context is None else context.numpy())
    model = UNet(config)
    params = flax_params(torch_model, model, *flax_args)
    return name, config, torch_model, model, params, (x, t, y, context), flax_args


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    return build_case(request.param)


def test_forward(case, record_error):
    name, config, torch_model, model, params, torch_args, flax_args = case
    expected = torch_model(*torch_args).detach().numpy()
    actual = jax.jit(model.apply)({"params": params}, *flax_args)
    chex.assert_shape(actual, flax_args[0].shape[:3] + (config.out_channels,))
    chex.assert_type(actual, jnp.float32)
    error = rel_error(to_nchw(actual), expected)
    record_error(f"UNet {name}", "forward", error)
    assert error <= 1e-5


def test_gradients(case, record_error):
    name, config, torch_model, model, params, torch_args, flax_args = case
    x = torch_args[0].clone().requires_grad_(True)
    context = torch_args[3]
    if context is not None:
        context = context.clone().requires_grad_(True)
    torch_model.zero_grad()
    expected = torch_model(x, torch_args[1], torch_args[2], context)
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    (expected * cotangent).sum().backward()

    def loss(params, x, context):
        out = model.apply({"params": params}, x, flax_args[1], flax_args[2], context)
        return jnp.sum(out * to_nhwc(cotangent))

    param_grads, x_grad, context_grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, flax_args[0], flax_args[3])

    errors = [rel_error(to_nchw(x_grad), x.grad.numpy())]
    if context is not None:
        errors.append(rel_error(context_grad, context.grad.numpy()))
    record_error(f"UNet {name}", "grad inputs", max(errors))
    assert max(errors) <= 1e-4

    expected_grads = dict(jax.tree_util.tree_leaves_with_path(torch_grads_as_flax(torch_model)))
    actual_grads = dict(jax.tree_util.tree_leaves_with_path(param_grads))
    assert actual_grads.keys() == expected_grads.keys()
    worst = max((rel_error(g, expected_grads[p]), jax.tree_util.keystr(p)) for p, g in actual_grads.items())
    record_error(f"UNet {name}", "grad params", worst[0])
    assert worst[0] <= 1e-4, worst


# bfloat16 keeps 8 bits of mantissa (4e-3 per rounding); through the network the suite measures
# 1.6e-2 .. 2.2e-2 with these deliberately large random weights.
BF16_TOLERANCE = 5e-2


@pytest.mark.parametrize("name", ["plain", "class+context", "three-level"])  # the variants change no dtype
def test_bfloat16_computation(name, record_error):
    """dtype=bfloat16 (params float32) against the float32 reference: close, and not bit-equal."""
    _, config, torch_model, _, params, torch_args, flax_args = build_case(name)
    model = UNet(dataclasses.replace(config, dtype="bfloat16"))
    own_params = jax.eval_shape(model.init, jax.random.key(0), *flax_args)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(own_params)} == {jnp.dtype(jnp.float32)}
    expected = torch_model(*torch_args).detach().numpy()
    actual = jax.jit(model.apply)({"params": params}, *flax_args)
    chex.assert_type(actual, jnp.float32)  # the output is handed back in float32
    error = rel_error(to_nchw(actual), expected)
    record_error(f"UNet {name} bf16", "forward", error)
    assert 1e-4 < error <= BF16_TOLERANCE


def test_variants_change_the_output():
    """Each variant option changes the network's output: none of them is silently ignored."""
    config, size = CONFIGS["ddpm-variants"]
    _, _, _, model, params, _, (x, t, y, _) = build_case("ddpm-variants")
    reference = jax.jit(model.apply)({"params": params}, x, t, y)
    changes = dict(time_conditioning="scale_shift", norm_eps=1e-2, timestep_embedding_order="cos_sin",
                   timestep_frequency_shift=0.0, head_dim=8, downsample_padding="symmetric",
                   center_input=False, mid_block_scale_factor=1.0, mid_attention_norm=True, mid_attention=False)
    for name, value in changes.items():
        variant = UNet(dataclasses.replace(config, **{name: value}))
        variant_params = jax.eval_shape(variant.init, jax.random.key(0), x, t, y)["params"]
        same_shapes = jax.tree_util.tree_structure(variant_params) == jax.tree_util.tree_structure(params) and all(
            a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(variant_params),
                                               jax.tree_util.tree_leaves(params)))
        if same_shapes:
            assert rel_error(jax.jit(variant.apply)({"params": params}, x, t, y), reference) > 1e-3, name
        else:
            assert name in ("time_conditioning", "mid_attention_norm", "mid_attention"), name


def test_null_label_is_default():
    """A class-conditional model called without labels uses the null label (for guidance)."""
    _, config, _, model, params, _, flax_args = build_case("class+context")
    x, t, _, context = flax_args
    null = np.full(x.shape[0], config.num_classes)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply({"params": params}, x, t, None, context),
                                  apply({"params": params}, x, t, null, context))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", BF16_TOLERANCE)])
def test_forward_mode_against_the_reference_in_float64(dtype, tolerance, record_error):
    """jax.jvp through the U-Net (consistency-model and flow-map training take one in every step) equals
    the float64 reference's torch.func.jvp in random directions of the image and the context."""
    _, config, torch_model, _, params, torch_args, flax_args = build_case("class+context")
    x, t, y, context = torch_args
    generator = torch.Generator().manual_seed(5)
    x_tangent, context_tangent = torch.randn(x.shape, generator=generator), torch.randn(context.shape,
                                                                                        generator=generator)
    model64 = copy.deepcopy(torch_model).double()
    # The sinusoidal embedding of the (integer) timesteps is float32 on both sides; the rest is float64.
    model64.time_embed.mlp.register_forward_pre_hook(lambda module, args: tuple(a.double() for a in args))
    _, expected = torch.func.jvp(lambda x, c: model64(x, t, y, c), (x.double(), context.double()),
                                 (x_tangent.double(), context_tangent.double()))

    model = UNet(dataclasses.replace(config, dtype=dtype))

    def apply(x, context):
        return model.apply({"params": params}, x, flax_args[1], flax_args[2], context)
    _, actual = jax.jit(lambda *a: jax.jvp(apply, a[:2], a[2:]))(
        flax_args[0], flax_args[3], to_nhwc(x_tangent), context_tangent.numpy())
    chex.assert_type(actual, jnp.float32)
    error = rel_error(to_nchw(actual), expected.detach().numpy())
    record_error(f"UNet class+context {dtype}", "jvp vs float64", error)
    assert error <= tolerance


def test_forward_and_reverse_mode_agree_through_every_input():
    """<jvp(u), w> = <u, vjp(w)> along random directions of the image, the (float) timesteps and the
    parameters, dropout on: forward mode is reverse mode's transpose, which the reference proves right."""
    _, config, _, model, params, _, (x, t, y, context) = build_case("class+context")

    def f(params, x, t):
        return model.apply({"params": params}, x, t, y, context, train=True, rngs={"dropout": jax.random.key(4)})
    primals = (params, jnp.asarray(x), jnp.asarray(t, jnp.float32) + 0.5)
    rng = np.random.default_rng(3)
    tangents = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape, np.float32), primals)
    cotangent = rng.standard_normal(jax.eval_shape(f, *primals).shape, np.float32)

    @jax.jit
    def both_modes(primals, tangents, cotangent):
        return jax.jvp(f, primals, tangents)[1], jax.vjp(f, *primals)[1](cotangent)
    forward, reverse = both_modes(primals, tangents, cotangent)
    lhs = jnp.vdot(forward, cotangent)
    rhs = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(tangents), jax.tree_util.tree_leaves(reverse)))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs), (lhs, rhs)


def test_the_backward_pass_that_recomputes_equals_the_one_that_keeps():
    """GroupNorm's backward pass recomputes the activation's slope on a GPU or TPU and keeps it on a CPU
    (UNetConfig.norm_backward 'auto'): both run here, whatever the platform, and give the same gradient for
    every parameter and the input, dropout on (float32)."""
    _, config, _, _, params, _, (x, t, y, context) = build_case("class+context")
    cotangent = np.random.default_rng(6).standard_normal((*x.shape[:3], config.out_channels)).astype(np.float32)

    def gradients(norm_backward):
        model = UNet(dataclasses.replace(config, norm_backward=norm_backward))

        def f(params, x):
            out = model.apply({"params": params}, x, t, y, context, train=True, rngs={"dropout": jax.random.key(4)})
            return jnp.vdot(out, cotangent)
        step = jax.jit(jax.grad(f, argnums=(0, 1))).lower(params, x).compile()
        return step.as_text().count("exponential("), step(params, x)

    kept_exponentials, kept = gradients("keep")
    recomputed_exponentials, recomputed = gradients("recompute")
    # SiLU's exponential computed again in each GroupNorm's backward pass where the slope is recomputed.
    assert recomputed_exponentials > kept_exponentials, (recomputed_exponentials, kept_exponentials)
    # 'auto' is the GPU's and TPU's choice there and the CPU's here.
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    assert gradients("auto")[0] == (recomputed_exponentials if on_accelerator else kept_exponentials)
    errors = jax.tree_util.tree_map(rel_error, recomputed, kept)
    assert max(jax.tree_util.tree_leaves(errors)) <= 1e-5, errors
