"""Sampling throughput of every sampler: images/s of a preset's U-Net (random weights, the backend's compute
dtype, classifier-free guidance where the preset is class-conditional) at the same step count.

    python benchmarks/sampler_speed.py --preset digits --json docs/bench/sampler_speed_cpu.json
    python benchmarks/sampler_speed.py --preset cifar10 --batch-size 64 --json docs/bench/sampler_speed_h100.json

Each sampler samples one batch first (its compilation and, on a GPU, cuDNN's autotuning), then --repeats
timed batches, each ended by block_until_ready; the median is reported. Heun evaluates the model 2n - 1
times for n steps, the others n times. DDPM is left out: it is DDIM with eta 1 over every timestep, DDIM's
cost per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from unet_flax.config import PRESETS, SAMPLERS, SamplerConfig
from unet_flax.config.unet_config import compute_dtype
from unet_flax.model import init_params
from unet_flax.runtime import use_xla_cpu_convolutions
from unet_flax.samplers import make_plan
from unet_flax.sampling import generate


def time_sampler(params, config, sampler: SamplerConfig, steps: int, batch_size: int, repeats: int) -> dict:
    m = config.model
    plan = make_plan(sampler, steps, config.noise_schedule, config.timesteps, config.prediction)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % m.num_classes if m.num_classes else None
    guidance = config.guidance_scale if labels is not None else 1.0

    def batch(seed: int) -> float:
        start = time.perf_counter()
        generate(params, jax.random.PRNGKey(seed), labels, plan, model_config=m, guidance_scale=guidance,
                 shape=(batch_size, m.image_size, m.image_size, m.in_channels)).block_until_ready()
        return time.perf_counter() - start

    first = batch(0)
    seconds = statistics.median(batch(seed) for seed in range(1, repeats + 1))
    return {"steps": steps, "model_evaluations": plan.evaluations, "img_per_s": round(batch_size / seconds, 1),
            "batch_s": round(seconds, 4), "first_batch_s": round(first, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    use_xla_cpu_convolutions()
    preset = PRESETS[args.preset]  # with a class label where it is class-conditional, as its data gives
    model = dataclasses.replace(preset.model, num_classes=10 if preset.class_conditional else None, remat=False,
                                dtype=compute_dtype(jax.default_backend()))
    config = dataclasses.replace(preset, model=model)
    params = init_params(config.model, jax.random.PRNGKey(0))
    results = {}
    for name in (s for s in SAMPLERS if s != "ddpm"):
        results[name] = time_sampler(params, config, SamplerConfig(name), args.steps, args.batch_size, args.repeats)
        print(name, json.dumps(results[name]), flush=True)
    report = {"preset": args.preset, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "dtype": config.model.dtype, "batch_size": args.batch_size,
              "machine": platform.processor() or platform.machine(),
              "samplers": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
