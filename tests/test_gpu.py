"""On the GPU (`python -m pytest --gpu`): cuDNN attention against XLA's, a bf16 run trained under pmap
and resumed under sharded jit, and sampling, on the GPU and back on the CPU. Skipped without a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from commands import params_at, run_sample, run_train, summary
from parity import rel_error

import unet_flax as uf
from unet_flax.checkpoint import Checkpoints
from unet_flax.config import TrainConfig
from unet_flax.model import attention_implementation, cudnn_attention_applies
from unet_flax.train_step import _make_train_step, create_train_state

pytestmark = pytest.mark.gpu

# bfloat16 keeps 8 bits of mantissa; the bound the README documents for bf16 against float32.
BF16_TOLERANCE = 5e-2
CUDNN_ATTENTION = "__cudnn$fmha"  # the custom call XLA emits for cuDNN's fused attention


def attention_case(kind: str, implementation: str, dtype, height: int = 6, context_length: int = 8):
    """The block, its inputs (a non-square map; head size 16 or 8) and non-default random params."""
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (3, height, 10 if height % 2 == 0 else 7, 64), jnp.float32)
    if kind == "self":
        module, inputs = uf.AttentionBlock(4, 8, dtype, implementation), (x,)
    else:
        context = jax.random.normal(keys[1], (3, context_length, 24), jnp.float32)
        module, inputs = uf.CrossAttentionBlock(8, 8, dtype, implementation), (x, context)
    params = module.init(keys[2], *inputs)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = jax.random.split(keys[3], len(leaves))
    params = treedef.unflatten([p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)])
    return module, params, inputs


def forward_and_grads(module, params, inputs):
    out, vjp = jax.vjp(lambda p, *xs: module.apply({"params": p}, *xs), params, *inputs)
    cotangent = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
    return out, vjp(cotangent)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_cudnn_attention_matches_xla(gpu, kind):
    module, params, inputs = attention_case(kind, "xla", jnp.float32)
    expected_out, expected_grads = jax.jit(forward_and_grads, static_argnums=0)(module, params, inputs)
    for implementation in ("cudnn", "auto"):
        module, _, _ = attention_case(kind, implementation, jnp.bfloat16)
        compiled = jax.jit(forward_and_grads, static_argnums=0).lower(module, params, inputs).compile()
        assert CUDNN_ATTENTION in compiled.as_text(), f"{implementation}: no cuDNN attention in the program"
        out, grads = compiled(params, inputs)
        assert rel_error(out, expected_out) <= BF16_TOLERANCE
        errors = jax.tree_util.tree_map(rel_error, grads, expected_grads)
        assert max(jax.tree_util.tree_leaves(errors)) <= BF16_TOLERANCE, errors


def test_cudnn_attention_applies_only_to_what_cudnn_takes():
    bf16, hopper, ampere = jnp.bfloat16, (9, 0), (8, 0)
    assert cudnn_attention_applies(bf16, 16, 60, 8, hopper) and cudnn_attention_applies(jnp.float16, 128, 4, 4, ampere)
    assert cudnn_attention_applies(bf16, 256, 64, 64, hopper) and not cudnn_attention_applies(bf16, 256, 64, 64, ampere)
    refused = {"float32": (jnp.float32, 16, 60, 8, hopper), "head size 12": (bf16, 12, 60, 8, hopper),
               "head size 264": (bf16, 264, 60, 8, hopper), "odd map (7x7)": (bf16, 16, 49, 49, hopper),
               "odd context (7 tokens)": (bf16, 16, 60, 7, hopper), "Turing": (bf16, 16, 60, 8, (7, 5)),
               "not an NVIDIA GPU": (bf16, 16, 60, 8, None)}
    for case, arguments in refused.items():
        assert not cudnn_attention_applies(*arguments), case
    if jax.default_backend() != "gpu":  # 'auto' is XLA's attention on the CPU and TPU, whatever the inputs
        assert attention_implementation("auto", bf16, 16, 60, 8) == "xla"
    assert attention_implementation("cudnn", jnp.float32, 12, 7, 7) == "cudnn"  # asked for, not second-guessed


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_auto_attention_is_xla_where_cudnn_does_not_apply(gpu, kind):
    assert attention_implementation("auto", jnp.bfloat16, 16, 60, 8) == "cudnn"
    # float32, and bf16 with odd lengths (a 5x7 map; a 7-token context): XLA's, forward and backward.
    for dtype, height, context_length in ((jnp.float32, 6, 8), (jnp.bfloat16, 5, 7)):
        module, params, inputs = attention_case(kind, "auto", dtype, height, context_length)
        compiled = jax.jit(forward_and_grads, static_argnums=0).lower(module, params, inputs).compile()
        assert CUDNN_ATTENTION not in compiled.as_text()
        out, grads = compiled(params, inputs)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves((out, grads)))


# A U-Net whose attention heads (32 and 64 channels, 2 heads) are sizes cuDNN takes.
GPU_RUN = ["--base-channels", "32", "--num-groups", "8", "--num-heads", "2", "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """4 steps under pmap, then resumed to 6 under sharded jit."""
    workdir = tmp_path_factory.mktemp("gpu_bf16")
    first = summary(run_train(workdir, *GPU_RUN, "--steps", "4", "--save-every", "2", "--parallel", "pmap"))
    resumed = summary(run_train(workdir, *GPU_RUN, "--steps", "6", "--parallel", "jit"))
    return workdir, first, resumed


def test_bf16_training_resumes_under_the_other_driver(gpu, bf16_run):
    workdir, first, resumed = bf16_run
    assert first["step"] == 4 and resumed["resumed_from"] == 4 and resumed["step"] == 6
    assert np.isfinite(first["loss"]) and np.isfinite(resumed["loss"])
    checkpoints = Checkpoints(workdir, read_only=True)
    assert checkpoints.read_config(6)["model"]["dtype"] == "bfloat16"
    checkpoints.close()
    before, after = params_at(workdir, 4), params_at(workdir, 6)
    assert int(after["step"]) == 6
    for tree in (after["params"], after["ema_params"], after["opt_state"]):
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(tree))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), before["params"], after["params"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_sampling_on_the_gpu_is_reproducible_and_the_cpu_samples_the_same_checkpoint(gpu, bf16_run, tmp_path):
    workdir = bf16_run[0]
    flags = ["--num-samples", "8", "--sampling-steps", "5", "--seed", "3"]
    for name, env in (("gpu_a", None), ("gpu_b", None), ("cpu", {"JAX_PLATFORMS": "cpu"})):
        run_sample(workdir, *flags, "--npz", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.png"),
                   env=env)
    a, b, cpu = (np.load(tmp_path / f"{name}.npz")["images"] for name in ("gpu_a", "gpu_b", "cpu"))
    np.testing.assert_array_equal(a, b)
    assert cpu.shape == a.shape == (8, 8, 8, 1)


def test_the_bf16_weight_copy_trains_as_casting_each_weight_does(gpu):
    """On a GPU the state keeps its weights' bf16 copy ('auto'): three steps with it and without it (the
    forward pass then casting each weight) agree to bf16's rounding; the two programs differ, so not bit
    for bit as on the CPU (tests/test_training.py)."""
    model = uf.UNetConfig(in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), image_size=8, num_heads=2, num_groups=8, dtype="bfloat16")
    config = TrainConfig(model=model, batch_size=8, lr=1e-3, warmup_steps=1)
    with_copy = create_train_state(config, jax.random.PRNGKey(0))
    assert with_copy.compute_params is not None
    casting = with_copy.replace(compute_params=None)
    step = jax.jit(_make_train_step(config, axis_name=None))
    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 8, 1)).astype(np.float32)
    for batch in images:
        with_copy, copy_metrics = step(with_copy, {"image": batch}, jax.random.PRNGKey(1))
        casting, casting_metrics = step(casting, {"image": batch}, jax.random.PRNGKey(1))
        loss = float(casting_metrics["loss"])
        assert abs(float(copy_metrics["loss"]) - loss) <= 1e-2 * loss
    errors = jax.tree_util.tree_map(rel_error, with_copy.params, casting.params)
    assert max(jax.tree_util.tree_leaves(errors)) <= BF16_TOLERANCE, errors
