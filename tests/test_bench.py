"""bench.py as a user runs it, shortened to one timed step: both JAX variants and PyTorch are timed,
and the JSON's figures agree with what can be checked apart from bench.py."""
import dataclasses
import json
import subprocess
import sys
import time

import jax

from unet_flax import UNet
from unet_flax.train_config import PRESETS

from commands import ROOT

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

    # Every timed call happened inside this run: two repeats of warm-up plus one timed step each.
    repeats = [run[f"{name}_step_s_repeats"] for name in run["timed"]]
    assert all(len(r) == 2 and min(r) > 0 for r in repeats)
    assert sum(sum(r) for r in repeats) * (WARMUP_STEPS + 1) < wall_s

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
