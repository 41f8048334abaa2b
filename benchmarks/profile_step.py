"""Where the train step's time goes, JAX (jax.profiler) and PyTorch (torch.profiler).

    PYTHONPATH=. python benchmarks/profile_step.py --preset digits [--cpu-devices 2]
    PYTHONPATH=. python benchmarks/profile_step.py --preset cifar10 --device gpu --precision bfloat16 \
        --out docs/bench/profile_h200_bf16.md

CPU: traces a few steps, reads the trace with `jax.profiler.ProfileData` and sums the XLA:CPU
thunks' time per kind (convolutions by direction, dots, reductions, elementwise fusions,
transposes, collectives) over all worker threads, then prints how busy each thread was: a thread
busy for less than the wall time is a core left idle. PyTorch: the same step's operators, self time.
GPU: the JAX step only; the GPU's kernels from the same trace, by kind (convolution, attention,
fusion, copy, reduce, GEMM, other: count and time per step) and the 20 longest, as markdown.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import tempfile

import jax
import torch
from jax.profiler import ProfileData
from torch.profiler import ProfilerActivity, profile

import bench

TRACED_STEPS = 5


def fusion_contents(hlo_text: str) -> dict[str, str]:
    """Thunk name -> what it computes, from the optimised HLO: 'conv forward', 'conv weight-grad', ..."""
    bodies, called, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
        call = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .* fusion\(.*calls=%?([\w.\-]+)", line)
        if call:
            called[call.group(1)] = call.group(2)
    kinds = {}
    for name, computation in called.items():
        body = "\n".join(bodies.get(computation, []))
        conv = re.search(r"= f32\[\d+,(\d+),(\d+),\d+\]\S* convolution\(.*window=\{size=(\d+)x(\d+)", body)
        if conv:
            # A weight gradient is a convolution whose window spans the activations and whose
            # output is kernel-sized.
            out_h, out_w, window_h, window_w = map(int, conv.groups())
            weight_grad = window_h * window_w > out_h * out_w
            kinds[name] = "convolution, weight gradient" if weight_grad else "convolution, forward / input gradient"
        elif " dot(" in body:
            kinds[name] = "dot (attention, linear layers)"
        elif " reduce(" in body:
            kinds[name] = "reduction (GroupNorm statistics, sums)"
        elif " transpose(" in body:
            kinds[name] = "transpose / layout copy"
        else:
            kinds[name] = "elementwise fusion"
    return kinds


def profile_jax(config, devices: list):
    """Prints the breakdown; returns the initial parameters, for PyTorch to start from the same ones."""
    step = bench.JaxStep(config, devices)
    wall = statistics.median(bench.median_times(step, 3, 10))
    kinds = fusion_contents(step.compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(TRACED_STEPS):
            step()
        jax.profiler.stop_trace()
        trace = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    by_kind, by_thread = collections.Counter(), collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "end:")):
                    continue
                base = re.sub(r"\.\d+$", "", event.name)
                kind = kinds.get(event.name) or {"all-reduce": "all-reduce (gradients)", "copy": "copy"}.get(
                    base, "other (waits, loops, small ops)")
                by_kind[kind] += event.duration_ns
                by_thread[line.name] += event.duration_ns
    per_step = 1e6 * TRACED_STEPS
    print(f"JAX, {len(devices)} device(s): step {wall * 1e3:.1f} ms wall (median of 10)")
    for kind, ns in by_kind.most_common():
        print(f"  {ns / per_step:8.1f} ms  {kind}")
    print(f"  {sum(by_kind.values()) / per_step:8.1f} ms  all thunks, summed over threads")
    for thread, ns in sorted(by_thread.items()):
        print(f"  thread {thread}: busy {ns / per_step:.1f} ms of {wall * 1e3:.1f}")
    return step.params_host


GPU_KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention (cuDNN fused)", ("fmha", "flash", "fprop_", "bprop_")),
    ("convolution", ("conv", "xmma", "implicit", "wgrad", "dgrad", "fprop", "cudnn")),
    ("copy / layout", ("copy", "memcpy", "memset", "transpose")),
    ("reduce fusion", ("reduce", "reduction")),
    ("GEMM", ("gemm", "cutlass", "cublas", "triton")),
    ("fusion (elementwise)", ("fusion",)),
)


def gpu_kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in GPU_KERNEL_KINDS if any(key in lowered for key in keys)), "other")


def profile_jax_gpu(config, steps: int = TRACED_STEPS) -> str:
    """The GPU kernels of `steps` traced train steps, by kind and the 20 longest, as a markdown report."""
    step = bench.JaxStep(config, jax.devices("gpu")[:1])
    wall = statistics.median(bench.median_times(step, 3, 20))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            step()
        step.synchronize()
        jax.profiler.stop_trace()
        trace = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    count, time_ns = collections.Counter(), collections.Counter()
    for plane in trace.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # the streams' kernels; other lines are derived views
                continue
            for event in line.events:
                count[event.name] += 1
                time_ns[event.name] += event.duration_ns
    if not time_ns:
        raise SystemExit("error: the trace holds no GPU kernels (no /device:GPU:0 plane with streams)")
    kind_count, kind_ns = collections.Counter(), collections.Counter()
    for name, ns in time_ns.items():
        kind_count[gpu_kernel_kind(name)] += count[name]
        kind_ns[gpu_kernel_kind(name)] += ns
    per_step_ms = 1e6 * steps
    gpu = jax.devices("gpu")[0].device_kind
    lines = [f"# JAX train step on {gpu}: {config.model.dtype}, batch {config.batch_size}",
             "", f"Step {wall * 1e3:.2f} ms wall (median of 20); kernels summed over {steps} traced steps, per step: "
             f"{sum(kind_ns.values()) / per_step_ms:.2f} ms busy, {sum(kind_count.values()) / steps:.0f} kernels. "
             f"jax {jax.__version__}.", "", "| kind | kernels per step | ms per step |", "|---|---|---|"]
    lines += [f"| {kind} | {kind_count[kind] / steps:.0f} | {ns / per_step_ms:.3f} |"
              for kind, ns in kind_ns.most_common()]
    lines += ["", "| the 20 longest kernels | kind | calls per step | ms per step |", "|---|---|---|---|"]
    lines += [f"| `{name[:90]}` | {gpu_kernel_kind(name)} | {count[name] / steps:.0f} | {ns / per_step_ms:.3f} |"
              for name, ns in time_ns.most_common(20)]
    return "\n".join(lines) + "\n"


def profile_torch(config, params_host) -> None:
    torch.set_num_threads(os.cpu_count())
    step = bench.TorchStep(config, params_host, "cpu", "eager")
    wall = statistics.median(bench.median_times(step, 3, 10))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(TRACED_STEPS):
            step()
    by_kind = collections.Counter()
    for event in prof.key_averages():
        name = event.key
        kind = ("convolution (forward)" if name == "aten::mkldnn_convolution" else
                "convolution (backward)" if name == "aten::convolution_backward" else
                "bmm / mm (attention, linear layers)" if name in ("aten::bmm", "aten::mm", "aten::addmm") else
                "optimizer" if "Optimizer" in name or name.startswith("aten::_foreach") else "other operators")
        by_kind[kind] += event.self_cpu_time_total
    print(f"PyTorch eager, {torch.get_num_threads()} threads: step {wall * 1e3:.1f} ms wall (median of 10)")
    for kind, us in by_kind.most_common():
        print(f"  {us / 1e3 / TRACED_STEPS:8.1f} ms  {kind}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--cpu-devices", type=int, default=1, help="JAX CPU devices, the batch split over them")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--precision", choices=bench.PRECISIONS, default="float32")
    parser.add_argument("--out", default=None, help="GPU: write the markdown report here too")
    args = parser.parse_args()
    config = bench.bench_config(args.preset, args.batch_size, args.precision)
    with jax.default_matmul_precision(bench.JAX_MATMUL_PRECISION[args.precision]):
        if args.device == "gpu":
            if jax.default_backend() != "gpu":
                raise SystemExit(f"error: --device gpu: JAX has no GPU here (its backend is {jax.default_backend()})")
            report = profile_jax_gpu(config)
            print(report)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(report)
            return
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        params_host = profile_jax(config, jax.devices("cpu"))
        profile_torch(config, params_host)


if __name__ == "__main__":
    main()
