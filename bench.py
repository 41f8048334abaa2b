"""Time the train step (forward, backward, AdamW, EMA) of the Flax UNet and the PyTorch reference,
side by side in one process, and DDIM sampling throughput.

    python bench.py --preset digits --device cpu
    python bench.py --preset cifar10 --device cpu --batch-size 8
    python bench.py --preset cifar10 --device gpu --json gpu.json       # float32 (TF32 off) and bf16
    python bench.py --preset cifar10 --device gpu --dtype bfloat16      # bf16 only

On CPU the JAX step is timed twice: on one CPU device, and data-parallel over one CPU device per
core (`--cpu-devices`, the batch split between them), since XLA:CPU runs each small convolution on
a single core; `jax_step_s` is the faster of the two and `jax_best_variant` names it.

Same config (parameter counts checked equal), batch, AdamW, clipping, EMA and loss on both sides, data
already on the device; JAX jitted with the state donated and `block_until_ready`, PyTorch with
`torch.cuda.synchronize()` on GPU. Compile time is reported apart; the step time is the median over
--steps (20 on CPU, 200 on GPU by default). The pair is timed twice, interleaved, so the spread between
repeats shows the noise. Ratios are JAX / PyTorch from this one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from unet_flax import reference, training
from unet_flax.cli import UsageError, add_config_flags, given_fields, run_command
from unet_flax.train_config import PRESETS, TrainConfig
from unet_flax.unet_config import UNetConfig
from unet_flax.convert import flax_to_torch
from unet_flax.sampling import generate

BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def bench_config(preset: str, batch_size: int | None, dtype: str, model_overrides: dict | None = None) -> TrainConfig:
    """The preset with a class label when it is class-conditional, `dtype`, and the model flags given."""
    config = PRESETS[preset]
    num_classes = 10 if config.class_conditional else None
    model = dataclasses.replace(config.model, **(model_overrides or {}), num_classes=num_classes, dtype=dtype)
    return dataclasses.replace(config, model=model, batch_size=batch_size or config.batch_size, steps=10**6)


def make_batch(config: TrainConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = config.model
    return {"image": rng.uniform(-1, 1, (config.batch_size, m.image_size, m.image_size, m.in_channels)).astype(np.float32),
            "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}


def count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


class JaxStep:
    """The jitted train step, data-parallel over `devices` (one device: plain jit)."""

    def __init__(self, config: TrainConfig, devices: list):
        mesh = training.data_mesh(devices)
        self.step_fn = training.jit_driver(training.make_train_step(config), mesh)
        state = training.create_train_state(config, jax.random.PRNGKey(0))
        self.params_host = jax.device_get(state.params)
        self.state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.batch = jax.device_put(make_batch(config), jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(training.DATA_AXIS)))
        self.rng = jax.random.PRNGKey(1)
        start = time.perf_counter()
        self.compiled = self.step_fn.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - start

    def __call__(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def step_flops(config: TrainConfig, state, batch, rng) -> float:
    """XLA's FLOP count of the whole step (all devices), lowered for one CPU device with attention written
    out: a GPU program's cost analysis does not see into its cuDNN convolutions and attention."""
    counted = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    mesh = training.data_mesh(jax.devices("cpu")[:1])

    def on_cpu(tree, spec):
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(training.DATA_AXIS)
    step = training.jit_driver(training.make_train_step(counted), mesh)
    cost = step.lower(on_cpu(state, replicated), on_cpu(batch, split), on_cpu(rng, replicated)).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


class TorchStep:
    """The same step in PyTorch: AdamW with the same warm-up, global-norm clipping, EMA."""

    def __init__(self, config: TrainConfig, flax_params, device: str, variant: str):
        self.config, self.device = config, torch.device(device)
        model = reference.UNet(dataclasses.replace(config.model, dtype="float32"))
        reference.load_numpy_state_dict(model, flax_to_torch(flax_params))
        model = model.to(self.device).train()
        self.autocast = variant.startswith("bf16")
        if self.autocast:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if variant.endswith("compile") else model
        self.raw_model = model
        self.ema = [p.detach().clone() for p in model.parameters()]
        lr = training.learning_rate(config)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_b1, config.adam_b2),
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: float(lr(s)) / config.lr)
        self.abar = reference.alphas_cumprod(config.noise_schedule, config.timesteps).to(self.device)
        batch = make_batch(config)
        self.x0 = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2)).to(self.device)
        if self.autocast:
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)
        self.y = torch.from_numpy(batch["label"]).long().to(self.device) if config.model.num_classes else None
        self.step_count = 0
        self.compile_s = self._timed() if variant.endswith("compile") else 0.0

    def _step(self) -> None:
        config = self.config
        t = torch.randint(0, config.timesteps, (self.x0.shape[0],), device=self.device)
        noise = torch.randn_like(self.x0)
        y = self.y
        if y is not None:
            y = torch.where(torch.rand(y.shape, device=self.device) < config.label_dropout,
                            torch.full_like(y, config.model.num_classes), y)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = reference.diffusion_loss(self.model, self.abar, self.x0, t, noise, y, prediction=config.prediction)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        decay = training.ema_decay(config.ema_decay, self.step_count)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.raw_model.parameters()), 1 - decay)
        self.step_count += 1

    def _timed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self._step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    __call__ = _timed


def median_times(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    return [step() for _ in range(steps)]


def sampling_throughput(config: TrainConfig, flax_params, torch_model, devices: list, torch_device: str,
                        images: int = 64, num_steps: int = 50) -> dict:
    """DDIM images/s of both frameworks from the same weights; JAX's batch split over `devices`."""
    m = config.model
    shape = (images, m.image_size, m.image_size, m.in_channels)
    labels = jnp.arange(images, dtype=jnp.int32) % 10 if m.num_classes else None
    mesh = training.data_mesh(devices)
    params = jax.device_put(flax_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(training.DATA_AXIS))
                if len(devices) > 1 else None)

    def jax_run():
        return generate(params, jax.random.PRNGKey(0), labels, model_config=m, shape=shape, num_steps=num_steps,
                        schedule_name=config.noise_schedule, timesteps=config.timesteps,
                        prediction=config.prediction, batch_sharding=sharding).block_until_ready()
    start = time.perf_counter()
    jax_run()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax_run()
    jax_s = time.perf_counter() - start

    abar = reference.alphas_cumprod(config.noise_schedule, config.timesteps).to(torch_device)
    x_T = torch.randn(images, m.in_channels, m.image_size, m.image_size, device=torch_device)
    y = torch.arange(images, device=torch_device) % 10 if m.num_classes else None
    torch_model.eval()
    start = time.perf_counter()
    reference.ddim_sample(torch_model, abar, x_T, num_steps, y, prediction=config.prediction)
    if torch_device == "cuda":
        torch.cuda.synchronize()
    torch_s = time.perf_counter() - start
    torch_model.train()
    return {"sampling_images": images, "sampling_steps": num_steps, "jax_sampling_devices": len(devices),
            "jax_sampling_img_per_s": images / jax_s,
            "torch_sampling_img_per_s": images / torch_s, "jax_sampling_compile_s": compile_s - jax_s}


def jax_variants(config: TrainConfig, device_kind: str, cpu_devices: int) -> dict[str, list]:
    """Device lists to time the JAX step on: one device, and on CPU one device per core as well."""
    devices = jax.devices(device_kind)
    variants = {"1-device": devices[:1]}
    if device_kind == "cpu" and cpu_devices > 1:
        if config.batch_size % cpu_devices:
            print(f"note: batch {config.batch_size} does not split over {cpu_devices} CPU devices; "
                  "timing JAX on one device only", file=sys.stderr)
        else:
            variants[f"{cpu_devices}-cpu-devices"] = devices[:cpu_devices]
    return variants


def run(args: argparse.Namespace, model_overrides: dict) -> dict:
    if args.device == "cpu":
        # Before the CPU backend starts: one JAX device per core for the data-parallel variant.
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    try:
        device = jax.devices(args.device)[0]
    except RuntimeError as error:
        raise UsageError(f"--device {args.device}: JAX has no such device here ({str(error).splitlines()[0]})") from None
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    steps = args.steps or (200 if args.device == "gpu" else 20)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    precisions = args.dtype or ["float32"] + (["bfloat16"] if args.device == "gpu" else [])
    result = {"preset": args.preset, "device": args.device, "device_kind": device.device_kind,
              "batch_size": None, "steps": steps, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
              "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": {}}
    for dtype in precisions:
        config = bench_config(args.preset, args.batch_size, dtype, model_overrides)
        result["batch_size"] = config.batch_size
        with jax.default_matmul_precision("float32" if dtype == "float32" else "default"):
            device_lists = jax_variants(config, args.device, args.cpu_devices)
            jax_steps = {v: JaxStep(config, devices) for v, devices in device_lists.items()}
            params_host = jax_steps["1-device"].params_host
            prefix = "bf16-" if dtype == "bfloat16" else ""  # PyTorch under autocast to bf16
            variants = [prefix + v for v in (["eager"] if args.device == "cpu" else ["eager", "compile"])]
            torch_steps = {v: TorchStep(config, params_host, torch_device, v) for v in variants}
            n_torch = sum(p.numel() for p in torch_steps[variants[0]].raw_model.parameters())
            if n_torch != count(params_host):
                raise RuntimeError(f"parameter counts differ: jax {count(params_host)}, torch {n_torch}")
            steppers = {f"jax_{v}": step for v, step in jax_steps.items()}
            steppers.update({f"torch_{v}": step for v, step in torch_steps.items()})
            times = {name: [] for name in steppers}
            for _ in range(2):  # interleaved repeats: the spread between them is the noise
                for name, step in steppers.items():
                    times[name].append(statistics.median(median_times(step, 3, steps)))
        run_result = {"model": dataclasses.asdict(config.model), "parameters": n_torch, "timed": list(steppers)}
        for name, step in steppers.items():
            run_result[f"{name}_step_s"] = min(times[name])
            run_result[f"{name}_step_s_repeats"] = times[name]
            run_result[f"{name}_img_per_s"] = config.batch_size / min(times[name])
            run_result[f"{name}_compile_s"] = step.compile_s
        for framework, names in (("jax", jax_steps), ("torch", torch_steps)):
            best = min(names, key=lambda v: run_result[f"{framework}_{v}_step_s"])
            run_result[f"{framework}_best_variant"] = best
            run_result[f"{framework}_step_s"] = run_result[f"{framework}_{best}_step_s"]
            run_result[f"{framework}_img_per_s"] = config.batch_size / run_result[f"{framework}_step_s"]
        run_result["jax_compile_s"] = jax_steps[run_result["jax_best_variant"]].compile_s
        one_device = jax_steps["1-device"]
        run_result["jax_flops_per_step"] = step_flops(config, one_device.state, one_device.batch, one_device.rng)
        run_result["jax_over_torch_step_time"] = run_result["jax_step_s"] / run_result["torch_step_s"]
        for framework in ("jax", "torch"):  # the same model and step: one FLOP count serves both
            step_s = run_result[f"{framework}_step_s"]
            run_result[f"{framework}_tflop_per_s"] = run_result["jax_flops_per_step"] / step_s / 1e12
        if args.device == "gpu":
            peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in device.device_kind), None)
            if dtype == "bfloat16" and peak is not None:  # MFU against the bf16 dense peak, for bf16 runs only
                run_result["jax_mfu"] = run_result["jax_tflop_per_s"] * 1e12 / peak
            run_result["jax_peak_bytes"] = device.memory_stats().get("peak_bytes_in_use")
            run_result["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
        if dtype == "float32" and args.sampling:
            with jax.default_matmul_precision("float32"):  # as PyTorch's, TF32 off: full float32 on both sides
                run_result.update(sampling_throughput(config, params_host, torch_steps[variants[0]].raw_model,
                                                      device_lists[run_result["jax_best_variant"]], torch_device))
        result["runs"][dtype] = run_result
        write_json(args.json, result)  # each precision as it ends: a run cut short keeps what it measured
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first = result["runs"][precisions[0]]
    for key in ("jax_step_s", "torch_step_s", "jax_img_per_s", "torch_img_per_s", "jax_compile_s",
                "jax_over_torch_step_time", "jax_best_variant", "torch_best_variant"):
        result[key] = first[key]
    write_json(args.json, result)
    return result


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def measure(args: argparse.Namespace) -> dict:
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cpu_devices < 1:
        raise UsageError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    # The model flags (but --dtype, bench.py's own), checked before anything is compiled.
    model_overrides = {k: v for k, v in given_fields(args, UNetConfig).items() if k != "dtype"}
    bench_config(args.preset, args.batch_size, "float32", model_overrides)
    result = run(args, model_overrides)
    for dtype, r in result["runs"].items():
        timings = ", ".join(f"{v} {r[f'{v}_step_s'] * 1e3:.1f} ms ({r[f'{v}_img_per_s']:.0f} img/s)"
                            for v in r["timed"])
        print(f"{args.preset} {args.device} {dtype} batch {result['batch_size']}: {timings}; JAX compile "
              f"{r['jax_compile_s']:.1f} s; best JAX / best PyTorch step time {r['jax_over_torch_step_time']:.2f}",
              file=sys.stderr)
    return {k: v for k, v in result.items() if k != "runs"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20 CPU, 200 GPU)")
    parser.add_argument("--cpu-devices", type=int, default=os.cpu_count(),
                        help="CPU only: also time the JAX step data-parallel over this many CPU devices "
                             "(default: one per core; 1 turns it off)")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=None,
                        help="the precisions to time, in this order (default: float32 on CPU; float32 and "
                             "bfloat16 on GPU)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-sampling", dest="sampling", action="store_false",
                        help="skip the sampling measurement (64 images x 50 DDIM steps: minutes for cifar10 on a CPU)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_config_flags(parser.add_argument_group("model: the preset's, but for the flags given (shown: digits')"),
                     PRESETS["digits"].model, skip=frozenset({"dtype"}))  # --dtype above: one run per precision
    args = parser.parse_args(argv)
    return run_command(measure, args)


if __name__ == "__main__":
    sys.exit(main())
