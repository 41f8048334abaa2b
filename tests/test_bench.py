"""bench.py as a user runs it, shortened to one timed step: both JAX variants and PyTorch are timed,
and the JSON's figures agree with what can be checked apart from bench.py."""
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from commands import ROOT
from parity import randomize_, rel_error, to_nchw, without_key_biases

from unet_flax import UNet, UNetConfig, reference
from unet_flax.config import PRESETS, TrainConfig
from unet_flax.parallel import data_mesh, jit_driver
from unet_flax.torch_format import torch_to_flax
from unet_flax.train_step import create_train_state, make_train_step, step_randomness

sys.path.insert(0, str(ROOT))
import bench  # noqa: E402

WARMUP_STEPS = 3  # bench.py's untimed calls before each timed group
BATCH = 4  # 2 rows on each of the 2 CPU devices
# The digits preset made smaller through bench.py's model flags: its programs compile in seconds.
MODEL = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1, "num_groups": 4, "num_heads": 2,
         "attention_resolutions": (4,), "image_size": 8}


def flags(fields: dict) -> list[str]:
    return [part for name, value in fields.items() for part in (
        "--" + name.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value))]


def test_bench_digits_cpu_writes_the_documented_json(tmp_path):
    out = tmp_path / "digits.json"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "digits", "--steps", "1",
                             "--batch-size", str(BATCH), "--cpu-devices", "2", "--no-sampling", "--json", str(out),
                             *flags(MODEL)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    wall_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(out.read_text())["runs"]["float32"]
    assert run["timed"] == ["jax_1-device", "jax_2-cpu-devices", "torch_eager"]
    assert run["precision"] == "float32" and run["torch_best_variant"] == "eager"

    # Every timed call happened inside this run: three repeats, each a loop of one step and a median of one.
    for kind in ("step_s_repeats", "step_s_median_repeats"):
        repeats = [run[f"{name}_{kind}"] for name in run["timed"]]
        assert all(len(r) == 3 and min(r) > 0 for r in repeats)
        assert sum(sum(r) for r in repeats) < wall_s

    # The parameter count and XLA's FLOP count, against the model built here.
    model_config = dataclasses.replace(PRESETS["digits"].model, **MODEL, num_classes=10)
    x = jax.ShapeDtypeStruct((BATCH, 8, 8, 1), "float32")
    t = y = jax.ShapeDtypeStruct((BATCH,), "int32")
    params = jax.eval_shape(UNet(model_config).init, jax.random.key(0), x, t, y)["params"]
    assert run["model"] == json.loads(json.dumps(dataclasses.asdict(model_config)))  # the flags were applied
    assert run["parameters"] == sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    forward = jax.jit(UNet(model_config).apply).lower({"params": params}, x, t, y).cost_analysis()
    forward_flops = (forward[0] if isinstance(forward, list) else forward)["flops"]
    # A train step is a forward, a backward of about twice its cost, and the optimiser.
    assert 2.5 * forward_flops < run["jax_flops_per_step"] < 4 * forward_flops


# The production step's options, every one away from its no-op: warm-up, decay on kernels only, clipping
# that bites, EMA, Min-SNR weighting, v prediction, label dropout (dropout off: the frameworks draw it apart).
SAME_MATH = TrainConfig(
    model=UNetConfig(in_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     image_size=8, num_heads=2, num_groups=4, num_classes=10),
    batch_size=3, lr=2e-3, warmup_steps=4, weight_decay=0.05, grad_clip=0.1, ema_decay=0.9, min_snr_gamma=5.0,
    prediction="v", label_dropout=0.3, class_conditional=True, steps=10**6)


def test_sdpa_attention_equals_the_seed_attention():
    """bench.py's fused attention path computes what the seed's AttentionBlock computes (odd map, 3 heads)."""
    block = randomize_(reference.AttentionBlock(12, num_heads=3, num_groups=4), seed=2)
    x = torch.randn(2, 12, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = block(x)
    actual = bench.sdpa_attention(block, x.contiguous(memory_format=torch.channels_last))
    assert rel_error(actual.detach().numpy(), expected.detach().numpy()) <= 1e-5


def test_the_timed_pytorch_step_is_the_production_step():
    """make_train_step (what train.py runs and bench.py times) and bench.py's PyTorch step, from the
    same weights, on the same batch with the same t, noise and dropped labels (JAX's draws handed to
    PyTorch): the loss agrees at every step, parameters and EMA after 20 steps, all to 1e-4."""
    config = SAME_MATH
    with jax.default_matmul_precision("float32"):
        state = create_train_state(config, jax.random.PRNGKey(0))
        mesh = data_mesh(jax.devices()[:1])
        step = jit_driver(make_train_step(config), mesh)
        batch = bench.make_batch(config)
        torch_step = bench.TorchStep(config, jax.device_get(state.params), "cpu", "eager")
        rng = jax.random.PRNGKey(1)
        draws = jax.jit(lambda s: step_randomness(config, rng, s, jnp.arange(config.batch_size),
                                                           batch["image"].shape[1:])[:3])
        clipped = 0
        for s in range(20):
            t, noise, dropped = draws(s)
            torch_loss = torch_step.step(torch_step.x0, torch.from_numpy(np.array(t)).long(),
                                         torch_step.to_nchw(noise), torch.from_numpy(np.array(dropped)))
            state, metrics = step(state, batch, rng)
            assert abs(float(metrics["loss"]) - torch_loss.item()) <= 1e-4 * abs(torch_loss.item()), s
            clipped += float(metrics["grad_norm"]) > config.grad_clip
    assert clipped > 10  # the clipping took part

    def as_flax(tensors):
        names = [name for name, _ in torch_step.raw_model.named_parameters()]
        return torch_to_flax(dict(zip(names, tensors)))
    for actual, expected in ((state.params, as_flax(torch_step.raw_model.parameters())),
                             (state.ema_params, as_flax(torch_step.ema))):
        errors = jax.tree_util.tree_map(rel_error, without_key_biases(jax.device_get(actual)),
                                        without_key_biases(expected))
        assert max(jax.tree_util.tree_leaves(errors)) <= 1e-4
    # What the trained models compute, key biases included.
    x = np.random.default_rng(5).uniform(-1, 1, (3, 8, 8, 2)).astype(np.float32)
    t, y = np.array([5, 500, 995]), np.array([0, 3, 10])
    with torch.no_grad():
        expected = torch_step.raw_model(torch.from_numpy(to_nchw(x)), torch.from_numpy(t), torch.from_numpy(y))
    with jax.default_matmul_precision("float32"):
        actual = jax.jit(UNet(config.model).apply)({"params": state.params}, x, t, y)
    assert rel_error(to_nchw(actual), expected.numpy()) <= 1e-4
