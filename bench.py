"""Time the train step (forward, backward, AdamW, clipping, EMA) of the Flax UNet against the PyTorch
reference at its strongest, side by side in one process, and DDIM sampling throughput.

    python bench.py --preset digits --device cpu
    python bench.py --preset cifar10 --device cpu --batch-size 8
    python bench.py --preset cifar10 --device gpu --json gpu.json    # bfloat16, tensorfloat32, float32
    python bench.py --preset cifar10 --device gpu --precision bfloat16 --torch-variants eager compile

Precisions (`--precision`, in this order): bfloat16 (Flax `dtype=bfloat16`, float32 params; PyTorch
under bf16 autocast), tensorfloat32 (JAX `default_matmul_precision("tensorfloat32")`; PyTorch with TF32
matmuls and cuDNN convolutions; on a CPU both are float32) and float32 (strict on both sides).

PyTorch at its strongest: channels_last, `F.scaled_dot_product_attention` in the attention blocks (a
benchmark-only path; the reference stays the seed's code, and a test holds both to 1e-5), AdamW with
`fused=True` on CUDA, eager and `torch.compile` in its default mode and in
`max-autotune-no-cudagraphs` (`--torch-variants`); the best variant is the denominator. On CPU the JAX
step is also timed data-parallel over one CPU device per core (`--cpu-devices`).

The same math on both sides (a test proves it step by step): AdamW with the same masks, learning-rate
warm-up, global-norm clipping, EMA, the loss weighting, label dropout; JAX jitted with the state donated.
Each variant is warmed up (compiled, autotuned) before any timed region, then timed in at least three
interleaved repeats, each as a training loop runs (--steps steps back to back, one device sync at the
end: `step_s`) and step by step (a sync after each: the median, `step_s_median`). Peak memory is read
per variant (PyTorch's counter reset before each; JAX's peak only rises, so it is read after JAX's runs).
FLOPs are XLA's count of the step lowered for the CPU; MFU is against the GPU's dense peak for the
precision (bf16, TF32).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from unet_flax import reference
from unet_flax.cli import add_config_flags, add_debug_flag, given_fields, run_command
from unet_flax.config import PRESETS, SamplerConfig, TrainConfig, UNetConfig
from unet_flax.errors import UsageError
from unet_flax.parallel import DATA_AXIS, compile_step, data_mesh, jit_driver
from unet_flax.samplers import make_plan
from unet_flax.sampling import generate
from unet_flax.torch_format import flax_to_torch
from unet_flax.train_step import create_train_state, ema_decay, learning_rate, make_train_step

PRECISIONS = ("bfloat16", "tensorfloat32", "float32")
TORCH_VARIANTS = {"eager": None, "compile": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# Dense tensor-core peaks from the data sheets (SXM), per precision.
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "tensorfloat32": 495e12},
              "H200": {"bfloat16": 989e12, "tensorfloat32": 495e12},
              "A100": {"bfloat16": 312e12, "tensorfloat32": 156e12}}
JAX_MATMUL_PRECISION = {"bfloat16": "default", "tensorfloat32": "tensorfloat32", "float32": "float32"}


def bench_config(preset: str, batch_size: int | None, precision: str,
                 model_overrides: dict | None = None) -> TrainConfig:
    """The preset with a class label when it is class-conditional, the model flags given, computing in
    bfloat16 for the bfloat16 precision and in float32 otherwise."""
    config = PRESETS[preset]
    num_classes = 10 if config.class_conditional else None
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    model = dataclasses.replace(config.model, **(model_overrides or {}), num_classes=num_classes, dtype=dtype)
    return dataclasses.replace(config, model=model, batch_size=batch_size or config.batch_size, steps=10**6)


def make_batch(config: TrainConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = config.model
    return {"image": rng.uniform(-1, 1, (config.batch_size, m.image_size, m.image_size,
                                         m.in_channels)).astype(np.float32),
            "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}


def count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


class JaxStep:
    """The production train step, jitted data-parallel over `devices` (one device: plain jit)."""

    def __init__(self, config: TrainConfig, devices: list):
        mesh = data_mesh(devices)
        self.step_fn = jit_driver(make_train_step(config, row_major_gradients=False), mesh,
                                  xla_chooses_state_layout=True)
        state = create_train_state(config, jax.random.PRNGKey(0))
        self.params_host = jax.device_get(state.params)
        self.state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.batch = jax.device_put(make_batch(config), jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(DATA_AXIS)))
        self.rng = jax.random.PRNGKey(1)
        self.device = devices[0]
        start = time.perf_counter()
        self.compiled, self.state = compile_step(self.step_fn, self.state, self.batch, self.rng)
        self.compile_s = time.perf_counter() - start

    def __call__(self) -> None:
        self.state, self.metrics = self.compiled(self.state, self.batch, self.rng)

    def synchronize(self) -> None:
        jax.block_until_ready((self.state, self.metrics))

    def peak_bytes(self) -> int | None:
        return (self.device.memory_stats() or {}).get("peak_bytes_in_use")


def sdpa_attention(self: reference.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """reference.AttentionBlock.forward with F.scaled_dot_product_attention (fused kernels): the same heads,
    the same scale, the same channel order."""
    b, c, h, w = x.shape
    qkv = self.to_qkv(self.norm(x))
    # (b, 3c, h, w) -> 3 x (b, heads, h*w, head_dim), head n owning channels n*head_dim.. of each third
    q, k, v = qkv.reshape(b, 3, self.num_heads, self.head_dim, h * w).transpose(-1, -2).unbind(1)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(-1, -2).reshape(b, c, h, w)
    return (self.to_out(out) + x) / self.output_scale


def with_sdpa_attention(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every self-attention block computing through sdpa_attention (benchmark-only)."""
    for module in model.modules():
        if isinstance(module, reference.AttentionBlock):
            module.forward = types.MethodType(sdpa_attention, module)
    return model


def torch_weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """decays' mask for PyTorch: conv and linear weights decay; biases, GroupNorm scales and the
    label embedding do not."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


@contextlib.contextmanager
def torch_precision(precision: str):
    """TF32 matmuls and cuDNN convolutions for 'tensorfloat32', off otherwise (PyTorch's global switches)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tensorfloat32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class TorchStep:
    """make_train_step's step in PyTorch: the reference U-Net (channels_last, SDPA attention),
    AdamW with the same decay mask and warm-up, global-norm clipping as optax's, EMA, the loss weighting
    and label dropout. `step` takes the draws (t, noise, dropped labels), so a test can hand it JAX's;
    a call draws them with torch."""

    def __init__(self, config: TrainConfig, flax_params, device: str, variant: str, precision: str = "float32"):
        self.config, self.device, self.precision = config, torch.device(device), precision
        model = reference.UNet(dataclasses.replace(config.model, dtype="float32"))
        reference.load_numpy_state_dict(model, flax_to_torch(flax_params))
        self.raw_model = with_sdpa_attention(model).to(self.device, memory_format=torch.channels_last).train()
        mode = TORCH_VARIANTS[variant]
        self.model = self.raw_model if mode is None else torch.compile(self.raw_model, mode=mode)
        self.ema = [p.detach().clone() for p in self.raw_model.parameters()]
        self.optimizer = torch.optim.AdamW(torch_weight_decay_groups(self.raw_model, config.weight_decay),
                                           lr=config.lr, betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                                           fused=self.device.type == "cuda")
        lr = learning_rate(config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: float(lr(s)) / config.lr)
        self.abar = reference.alphas_cumprod(config.noise_schedule, config.timesteps).to(self.device)
        batch = make_batch(config)
        self.x0 = self.to_nchw(batch["image"])
        self.y = torch.from_numpy(batch["label"]).long().to(self.device) if config.model.num_classes else None
        self.step_count = 0
        self.compile_s = None

    def warm_up(self) -> TorchStep:
        """The first step, timed apart: torch.compile compiles in it, cuDNN picks its algorithms."""
        start = time.perf_counter()
        self()
        self.synchronize()
        self.compile_s = time.perf_counter() - start
        return self

    def to_nchw(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(images).transpose(0, 3, 1, 2)).to(
            self.device).contiguous(memory_format=torch.channels_last)

    def __call__(self) -> None:
        t = torch.randint(0, self.config.timesteps, (self.x0.shape[0],), device=self.device)
        dropped = torch.rand(t.shape, device=self.device) < self.config.label_dropout if self.y is not None else None
        self.step(self.x0, t, torch.randn_like(self.x0), dropped)

    def step(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             dropped: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        y = None if self.y is None else torch.where(dropped, torch.full_like(self.y, config.model.num_classes), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            loss = reference.diffusion_loss(self.model, self.abar, x0, t, noise, y, prediction=config.prediction,
                                            min_snr_gamma=config.min_snr_gamma)
        loss.backward()
        params = list(self.raw_model.parameters())
        if config.grad_clip > 0:  # optax.clip_by_global_norm: scale by max_norm / norm where norm exceeds it
            grads = [p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, torch.clamp(config.grad_clip / norm, max=1.0))
        self.optimizer.step()
        self.scheduler.step()
        decay = ema_decay(config.ema_decay, self.step_count)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, params, 1 - decay)
        self.step_count += 1
        return loss

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak_bytes(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None


def median_times(step, warmup: int, steps: int) -> list[float]:
    """Per-step wall times, each step synchronised, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    step.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        step.synchronize()
        times.append(time.perf_counter() - start)
    return times


def loop_time(step, steps: int) -> float:
    """Seconds per step over `steps` steps run back to back, as a training loop runs them: one sync at the end."""
    step.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step.synchronize()
    return (time.perf_counter() - start) / steps


def timed_repeats(steppers: dict, steps: int, repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Each stepper warmed up, then timed in `repeats` interleaved rounds (loop and per-step median)."""
    for step in steppers.values():
        median_times(step, warmup, 0)
    times = {name: {"loop": [], "median": [], "peak_bytes": None} for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            if hasattr(step, "reset_peak_bytes"):
                step.reset_peak_bytes()
            times[name]["loop"].append(loop_time(step, steps))
            times[name]["median"].append(statistics.median(median_times(step, 0, steps)))
            peak = step.peak_bytes()
            times[name]["peak_bytes"] = None if peak is None else max(peak, times[name]["peak_bytes"] or 0)
    return times


def step_flops(config: TrainConfig, state, batch, rng) -> float:
    """XLA's FLOP count of the whole step (all devices), lowered for one CPU device with attention written
    out: a GPU program's cost analysis does not see into its cuDNN convolutions and attention."""
    counted = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    mesh = data_mesh(jax.devices("cpu")[:1])

    def on_cpu(tree, spec):
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(DATA_AXIS)
    step = jit_driver(make_train_step(counted), mesh)
    cost = step.lower(on_cpu(state, replicated), on_cpu(batch, split), on_cpu(rng, replicated)).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def sampling_throughput(config: TrainConfig, flax_params, torch_model, devices: list, torch_device: str,
                        images: int = 64, num_steps: int = 50) -> dict:
    """DDIM images/s of both frameworks from the same weights at float32, each warmed up first (JAX's
    compile, cuDNN's autotuning); JAX's batch split over `devices`."""
    m = config.model
    shape = (images, m.image_size, m.image_size, m.in_channels)
    labels = jnp.arange(images, dtype=jnp.int32) % 10 if m.num_classes else None
    mesh = data_mesh(devices)
    params = jax.device_put(flax_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
                if len(devices) > 1 else None)

    plan = make_plan(SamplerConfig("ddim"), num_steps, config.noise_schedule, config.timesteps, config.prediction)

    def jax_run():
        generate(params, jax.random.PRNGKey(0), labels, plan, model_config=m, shape=shape,
                 batch_sharding=sharding).block_until_ready()

    abar = reference.alphas_cumprod(config.noise_schedule, config.timesteps).to(torch_device)
    x_T = torch.randn(images, m.in_channels, m.image_size, m.image_size,
                      device=torch_device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(images, device=torch_device) % 10 if m.num_classes else None

    def torch_run(steps=num_steps):
        reference.ddim_sample(torch_model, abar, x_T, steps, y, prediction=config.prediction)
        if torch_device == "cuda":
            torch.cuda.synchronize()

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    torch_model.eval()
    compile_s = timed(jax_run)
    timed(lambda: torch_run(1))  # the warm-up: cuDNN picks its algorithms for these shapes
    jax_s, torch_s = [], []
    for _ in range(2):
        jax_s.append(timed(jax_run))
        torch_s.append(timed(torch_run))
    torch_model.train()
    return {"sampling_images": images, "sampling_steps": num_steps, "jax_sampling_devices": len(devices),
            "jax_sampling_img_per_s": images / min(jax_s), "torch_sampling_img_per_s": images / min(torch_s),
            "jax_sampling_compile_s": compile_s - min(jax_s)}


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
        reason = str(error).splitlines()[0]
        raise UsageError(f"--device {args.device}: JAX has no such device here ({reason})") from None
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    steps = args.steps or (50 if args.device == "gpu" else 20)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    else:
        torch.backends.cudnn.benchmark = True
    precisions = args.precision or (list(PRECISIONS) if args.device == "gpu" else ["float32"])
    torch_variants = args.torch_variants or (list(TORCH_VARIANTS) if args.device == "gpu" else ["eager"])
    result = {"preset": args.preset, "device": args.device, "device_kind": device.device_kind,
              "batch_size": None, "steps": steps, "repeats": args.repeats, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
              "torch": torch.__version__, "python": platform.python_version(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": {}}
    peaks = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), {})
    for precision in precisions:
        config = bench_config(args.preset, args.batch_size, precision, model_overrides)
        result["batch_size"] = config.batch_size
        with jax.default_matmul_precision(JAX_MATMUL_PRECISION[precision]), torch_precision(precision):
            device_lists = jax_variants(config, args.device, args.cpu_devices)
            jax_steps = {v: JaxStep(config, devices) for v, devices in device_lists.items()}
            params_host = jax_steps["1-device"].params_host
            torch_steps = {v: TorchStep(config, params_host, torch_device, v, precision).warm_up()
                           for v in torch_variants}
            n_torch = sum(p.numel() for p in next(iter(torch_steps.values())).raw_model.parameters())
            if n_torch != count(params_host):
                raise RuntimeError(f"parameter counts differ: jax {count(params_host)}, torch {n_torch}")
            steppers = {f"jax_{v}": step for v, step in jax_steps.items()}
            steppers.update({f"torch_{v}": step for v, step in torch_steps.items()})
            times = timed_repeats(steppers, steps, args.repeats)
            run_result = {"precision": precision, "model": dataclasses.asdict(config.model), "parameters": n_torch,
                          "timed": list(steppers)}
            for name, step in steppers.items():
                run_result[f"{name}_step_s"] = min(times[name]["loop"])
                run_result[f"{name}_step_s_repeats"] = times[name]["loop"]
                run_result[f"{name}_step_s_median"] = min(times[name]["median"])
                run_result[f"{name}_step_s_median_repeats"] = times[name]["median"]
                run_result[f"{name}_img_per_s"] = config.batch_size / run_result[f"{name}_step_s"]
                run_result[f"{name}_compile_s"] = step.compile_s
                run_result[f"{name}_peak_bytes"] = times[name]["peak_bytes"]
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
                flop_rate = run_result["jax_flops_per_step"] / run_result[f"{framework}_step_s"]
                run_result[f"{framework}_tflop_per_s"] = flop_rate / 1e12
                if precision in peaks:
                    run_result[f"{framework}_mfu"] = flop_rate / peaks[precision]
            if precision == "float32" and args.sampling:
                run_result.update(sampling_throughput(config, params_host, torch_steps[torch_variants[0]].raw_model,
                                                      device_lists[run_result["jax_best_variant"]], torch_device))
        result["runs"][precision] = run_result
        write_json(args.json, result)  # each precision as it ends: a run cut short keeps what it measured
        del jax_steps, torch_steps, steppers
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
    for name in ("steps", "batch_size", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cpu_devices < 1:
        raise UsageError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    # The model flags (but the dtype, which --precision sets), checked before anything is compiled.
    model_overrides = {k: v for k, v in given_fields(args, UNetConfig).items() if k != "dtype"}
    bench_config(args.preset, args.batch_size, "float32", model_overrides)
    if args.device == "cpu" and {"compile", "max-autotune"} & set(args.torch_variants or ()):
        print("note: torch.compile on a CPU compiles C++ for minutes on a small machine", file=sys.stderr)
    result = run(args, model_overrides)
    for precision, r in result["runs"].items():
        timings = ", ".join(f"{v} {r[f'{v}_step_s'] * 1e3:.1f} ms ({r[f'{v}_img_per_s']:.0f} img/s)"
                            for v in r["timed"])
        print(f"{args.preset} {args.device} {precision} batch {result['batch_size']}: {timings}; JAX compile "
              f"{r['jax_compile_s']:.1f} s; best JAX / best PyTorch step time {r['jax_over_torch_step_time']:.2f}",
              file=sys.stderr)
    return {k: v for k, v in result.items() if k != "runs"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timed loop and per median, each repeat (default 20 CPU, 50 GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant")
    parser.add_argument("--cpu-devices", type=int, default=os.cpu_count(),
                        help="CPU only: also time the JAX step data-parallel over this many CPU devices "
                             "(default: one per core; 1 turns it off)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None,
                        help="the precisions to time, in this order (default: float32 on CPU; all three on GPU, "
                             "bfloat16 first)")
    parser.add_argument("--torch-variants", nargs="+", choices=list(TORCH_VARIANTS), default=None,
                        help="PyTorch variants: eager, torch.compile (default mode), torch.compile "
                             "(max-autotune-no-cudagraphs) (default: eager on CPU, all on GPU)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-sampling", dest="sampling", action="store_false",
                        help="skip the sampling measurement (64 images x 50 DDIM steps: minutes for cifar10 on a CPU)")
    add_debug_flag(parser)
    add_config_flags(parser.add_argument_group("model: the preset's, but for the flags given (shown: digits')"),
                     PRESETS["digits"].model, skip=frozenset({"dtype"}))  # --precision above sets it
    args = parser.parse_args(argv)
    return run_command(measure, args)


if __name__ == "__main__":
    sys.exit(main())
