"""The JAX train step alone (bench.JaxStep), to compare XLA flags: run once per XLA_FLAGS setting.

    PYTHONPATH=. XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/jax_step.py digits
"""
import statistics
import sys

import jax

import bench

config = bench.bench_config(sys.argv[1] if len(sys.argv) > 1 else "digits", None, "float32")
step = bench.JaxStep(config, jax.devices()[:1])
times = bench.median_times(step, 3, 15)
print(f"compile {step.compile_s:.1f}s median {statistics.median(times) * 1e3:.1f} ms")
