"""The cifar10 train step and DDIM sampler, in bfloat16 and in float32 (TF32), compiled for an H100 and an
A100 on a machine without a GPU, and what XLA made of them: kernels, layouts, attention, memory, FLOPs and
a roofline bound on MFU.

    pip install 'jax[cuda12]==<the installed jax version>'   # the CUDA plugin, about 5.5 GB; not a requirement
    python benchmarks/h100_aot.py      # writes docs/bench/gpu_aot.json and gpu_aot.md (about 5 minutes on 2 cores)
    python benchmarks/h100_aot.py --gpus H100 --dtypes bfloat16     # one column pair (about 4 minutes)

XLA compiles for a GPU it does not have (a "deviceless" compilation) from the target's description,
which the CUDA plugin embeds for each GPU it knows (`GpuTargetConfigProto` text, one per model). What
only a real GPU decides is left at its default: convolution algorithms, GEMM tiles and cuDNN plans are
autotuned at run time. FLOPs come from XLA's cost analysis of the same step lowered for the CPU (the
cuDNN calls are opaque to it) with attention written out, so its matmuls are counted too.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compilation targets the GPU; nothing runs on it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unet_flax.config import PRESETS, SamplerConfig, TrainConfig  # noqa: E402
from unet_flax.model import init_params  # noqa: E402
from unet_flax.parallel import DATA_AXIS, jit_driver  # noqa: E402
from unet_flax.samplers import make_plan  # noqa: E402
from unet_flax.sampling import generate  # noqa: E402
from unet_flax.train_step import create_train_state, make_train_step  # noqa: E402

# name -> (the plugin's device description, dense tensor-core peak FLOP/s from the data sheet per compute
# dtype: bf16, and TF32 for float32, which is what XLA's default precision gives float32 matmuls on them)
TARGETS = {
    "H100": ("NVIDIA H100 80GB HBM3", {"bfloat16": 989e12, "float32": 495e12}),
    "A100": ("NVIDIA A100-SXM4-80GB", {"bfloat16": 312e12, "float32": 156e12}),
}
DTYPES = ("bfloat16", "float32")
FMHA_FORWARD, FMHA_BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
CONVOLUTION_CALLS = ("__cudnn$convForward", "__cudnn$convBackwardInput", "__cudnn$convBackwardFilter",
                     "__cudnn$convBiasActivationForward")
# Instructions that launch nothing: views, tuples, constants and the program's inputs.
FREE_OPCODES = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
                "replica-id", "opt-barrier"}
LAYOUT_OPCODES = ("transpose", "copy")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}


def target_config(device_description: str) -> str:
    """The plugin's GpuTargetConfigProto text for this GPU (the spec file XLA embeds for --xla_gpu_target_config)."""
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError:
        raise SystemExit("error: the CUDA plugin is not installed: pip install 'jax[cuda12]=="
                         f"{jax.__version__}'") from None
    binary = (Path(plugin.__file__).parent / "xla_cuda_plugin.so").read_bytes()
    marker = f'device_description_str: "{device_description}"\n'.encode()
    end = binary.find(marker)
    if end < 0:
        raise SystemExit(f"error: the CUDA plugin has no spec for {device_description!r}")
    start = binary.rfind(b"\0", 0, end) + 1  # each spec is one NUL-terminated string
    return binary[start:binary.find(b"\0", end)].decode()


def gpu_device(name: str) -> jax.Device:
    """A device of the named GPU that programs compile for but never run on."""
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=target_config(TARGETS[name][0]))
    return topology.devices[0]


def compiled_config(preset: str, batch_size: int, dtype: str) -> TrainConfig:
    """The preset computing in `dtype` with what 'auto' picks on these GPUs: cuDNN's fused attention in
    bfloat16, XLA's in float32 (cuDNN's take no float32); GroupNorm's backward recomputing the slope; the
    weights' bf16 copy in the state."""
    config = PRESETS[preset]
    attention = "cudnn" if dtype == "bfloat16" else "xla"
    model = dataclasses.replace(config.model, dtype=dtype, attention_impl=attention, norm_backward="recompute",
                                num_classes=10 if config.class_conditional else None)
    return dataclasses.replace(config, model=model, batch_size=batch_size, weight_copy="on")


def abstract(tree, sharding):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def step_arguments(config: TrainConfig) -> tuple:
    """The shapes of the train step's arguments: the state, a uint8 batch as train.py feeds it, the key."""
    state = jax.eval_shape(lambda key: create_train_state(config, key), jax.random.key(0))
    m = config.model
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, m.image_size, m.image_size, m.in_channels), jnp.uint8)}
    if m.num_classes is not None:
        batch["label"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    return state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)


def lower_train_step(config: TrainConfig, device: jax.Device) -> jax.stages.Lowered:
    """The jitted train step (train.py's sharded-jit driver on one device) on a uint8 batch, as train.py feeds it."""
    mesh = Mesh([device], (DATA_AXIS,))
    state, batch, rng = step_arguments(config)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    step = jit_driver(make_train_step(config, row_major_gradients=False), mesh, xla_chooses_state_layout=True)
    return step.lower(abstract(state, replicated), abstract(batch, sharded), abstract(rng, replicated))


def lower_sampler(config: TrainConfig, device: jax.Device, images: int, steps: int) -> jax.stages.Lowered:
    """DDIM over `steps` steps for `images` images, as sample.py runs it on one device."""
    m = config.model
    params = jax.eval_shape(lambda key: init_params(m, key), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(device)
    labels = None if m.num_classes is None else jax.ShapeDtypeStruct((images,), jnp.int32, sharding=sharding)
    plan = make_plan(SamplerConfig("ddim"), steps, config.noise_schedule, config.timesteps, config.prediction)
    return generate.lower(abstract(params, sharding), jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding),
                          labels, plan, model_config=m, shape=(images, m.image_size, m.image_size, m.in_channels),
                          guidance_scale=config.guidance_scale if labels is not None else 1.0)


# -- reading the optimised HLO ------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result's shape text, e.g. 'bf16[128,32,32,128]{3,2,1,0}' or a tuple
    opcode: str
    operands: list[str]
    text: str

    @property
    def target(self) -> str | None:
        found = re.search(r'custom_call_target="([^"]+)"', self.text)
        return found.group(1) if found else None

    @property
    def called(self) -> str | None:
        found = re.search(r"calls=%?([\w.\-]+)", self.text)
        return found.group(1) if found else None


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")


def parse_hlo(text: str) -> dict[str, list[Instruction]]:
    """Computation name -> its instructions, from HloModule text."""
    computations, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
            continue
        found = INSTRUCTION.match(line)
        if found and current is not None:
            name, shape, opcode, rest = found.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
            current.append(Instruction(name, shape, opcode, operands, line))
    return computations


def shape_bytes(shape: str) -> int:
    return sum(BYTES.get(dtype, 4) * _product(dims) for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape))


def _product(dims: str) -> int:
    size = 1
    for d in filter(None, dims.split(",")):
        size *= int(d)
    return size


def dims(shape: str) -> list[int]:
    found = re.match(r"\(?[a-z]+\d*\[([\d,]*)\]", shape)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def is_activation(shape: str, batch: int) -> bool:
    """Batch-leading arrays of rank 4 or more and at least 256 values per example (images, features,
    their groups and heads), not conv filters whose output-channel axis happens to equal the batch
    (O, 3, 3, I), nor per-group statistics."""
    d = dims(shape)
    return len(d) >= 4 and d[0] in (batch, 2 * batch) and tuple(d[1:3]) not in ((1, 1), (3, 3)) \
        and _product(",".join(map(str, d[1:]))) >= 256


def kernels(computations: dict[str, list[Instruction]]) -> list[Instruction]:
    """The instructions that launch work: everything outside fusion bodies and reducers that is not a
    view, a tuple or control flow."""
    inlined = {name for instrs in computations.values() for i in instrs
               for name in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", i.text) if i.opcode != "call"}
    return [i for name, instrs in computations.items() if name not in inlined for i in instrs
            if i.opcode not in FREE_OPCODES and i.opcode not in ("while", "call", "conditional")]


def bytes_moved(i: Instruction, computations: dict[str, list[Instruction]], by_name: dict[str, Instruction]) -> int:
    """HBM bytes a kernel reads and writes: its result, and each operand, or only the slices of it that
    a fusion reads when slicing (after converts and reshapes, elementwise) is all the fusion does with it."""
    body = computations.get(i.called, []) if i.opcode == "fusion" else []
    sliced = {}
    for p in body:
        if p.opcode == "parameter" and (elements := _sliced_elements(p, body)) is not None:
            sliced[int(re.search(r"parameter\((\d+)\)",
                                 p.text).group(1))] = elements * BYTES.get(p.shape.split("[")[0], 4)
    return shape_bytes(i.shape) + sum(sliced.get(k, shape_bytes(by_name[o].shape)) for k, o in enumerate(i.operands)
                                      if o in by_name)


# Ops through which a fused kernel reads an operand element for element: a slice after them reads its part only.
ELEMENTWISE_VIEWS = ("bitcast", "convert", "reshape", "copy")


def _sliced_elements(value: Instruction, body: list[Instruction]) -> int | None:
    """How many of `value`'s elements a fusion reads when every use of it ends in a slice; None if not."""
    users = [u for u in body if value.name in u.operands]
    total = 0
    for user in users:
        if user.opcode in ("slice", "dynamic-slice"):
            total += _product(",".join(map(str, dims(user.shape))))
        elif user.opcode in ELEMENTWISE_VIEWS and (elements := _sliced_elements(user, body)) is not None:
            total += elements
        else:
            return None
    return total if users else None


def is_matmul(i: Instruction) -> bool:
    """Convolutions, GEMMs and attention: the kernels whose time the tensor cores' peak bounds."""
    return i.opcode in ("convolution", "dot") or (i.opcode == "custom-call" and i.target != "__command_buffer") \
        or "__triton_gemm" in i.text or "kind=kCustom" in i.text


def program_report(compiled: jax.stages.Compiled, batch: int) -> dict:
    """Kernels by kind, layout changes on activations (rank 4, batch leading) and around convolutions,
    attention, memory: what decides the program's speed beyond the autotuned choices."""
    computations = parse_hlo(compiled.as_text())
    launched = kernels(computations)
    by_name = {i.name: i for instrs in computations.values() for i in instrs}
    fused_root = {name: instrs[-1].opcode for name, instrs in computations.items() if instrs}

    def is_layout_change(i: Instruction) -> bool:
        return i.opcode in LAYOUT_OPCODES or (i.opcode == "fusion" and fused_root.get(i.called) in LAYOUT_OPCODES)

    def on_activation(i: Instruction) -> bool:
        return is_activation(i.shape, batch)

    consumers = collections.defaultdict(list)
    for instrs in computations.values():
        for i in instrs:
            for operand in i.operands:
                consumers[operand].append(i)

    def through_views(i: Instruction, step) -> list[Instruction]:
        # Producers (step=operands) or consumers, looking through get-tuple-element and bitcast.
        found = []
        for j in step(i):
            found += through_views(j, step) if j.opcode in ("get-tuple-element", "bitcast") else [j]
        return found

    convolutions = [i for i in launched if i.target in CONVOLUTION_CALLS]
    around = [j.name for conv in convolutions
              for j in through_views(conv, lambda i: [by_name[o] for o in i.operands if o in by_name])
              + through_views(conv, lambda i: consumers[i.name])
              if is_layout_change(j) and on_activation(j)]
    calls = collections.Counter(i.target for i in launched if i.opcode == "custom-call")
    memory = compiled.memory_analysis()
    return {
        "kernels": len(launched),
        "fusions": sum(i.opcode == "fusion" for i in launched),
        "custom_calls": dict(sorted(calls.items())),
        "other_kernels": dict(collections.Counter(i.opcode for i in launched if i.opcode not in ("fusion",
                                                                                                 "custom-call"))),
        "layout_changes_on_activations": sorted(i.name for i in launched if is_layout_change(i) and on_activation(i)),
        "layout_changes_around_convolutions": sorted(set(around)),
        "attention": {"cudnn_fmha_forward": calls[FMHA_FORWARD], "cudnn_fmha_backward": calls[FMHA_BACKWARD],
                      "xla_softmax_fusions": sum("exponential" in i.text for i in launched if i.opcode == "fusion")},
        "float32_activations": dict(collections.Counter(
            piece for i in launched for piece in re.findall(r"f32\[[\d,]*\]", i.shape) if is_activation(piece, batch))),
        # Random bits or masks (dropout's) written between kernels instead of drawn where they are used.
        "integer_activations": dict(collections.Counter(
            piece for i in launched for piece in re.findall(r"(?:pred|[su]\d+)\[[\d,]*\]", i.shape)
            if is_activation(piece, batch))),
        "memory_bytes": {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                         "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes},
        "bytes": {kind: sum(bytes_moved(i, computations, by_name) for i in launched if is_matmul(i) == matmul)
                  for kind, matmul in (("matmul_kernels", True), ("memory_kernels", False))},
    }


def flops(lowered_on_cpu: jax.stages.Lowered) -> float:
    cost = lowered_on_cpu.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def attention_flops(config: TrainConfig, batch: int, backward: bool) -> float:
    """QK^T and PV of every self-attention, by hand: 4 B L^2 C for L positions of C channels; the
    backward pass is twice the forward."""
    m = config.model
    total = 0.0
    for level in range(m.num_levels):
        length, channels = (m.image_size // 2**level) ** 2, m.base_channels * m.channel_mults[level]
        blocks = ((2 * m.num_res_blocks + 1) * m.level_has_attention(level)
                  + (level == m.num_levels - 1) * m.mid_attention)
        total += blocks * 4 * batch * length**2 * channels
    return total * (3 if backward else 1)


def roofline(report: dict, step_flops: float, peak_flops: float, bandwidth: float, repeats: int) -> dict:
    """Matmul-class kernels at the bf16 peak, every other kernel's bytes at HBM bandwidth, one after the
    other (a GPU stream runs them in turn): a lower bound on the step's time, so an upper bound on MFU."""
    compute_s = step_flops / peak_flops
    memory_s = report["bytes"]["memory_kernels"] * repeats / bandwidth
    return {"compute_s": compute_s, "memory_bound_kernels_s": memory_s, "step_s_lower_bound": compute_s + memory_s,
            "mfu_upper_bound": compute_s / (compute_s + memory_s)}


def bandwidth(name: str) -> float:
    """HBM bytes/s from the plugin's spec of the GPU."""
    return float(re.search(r"memory_bandwidth: (\d+)", target_config(TARGETS[name][0])).group(1))


def analyse(config: TrainConfig, gpu: str, images: int, sampling_steps: int) -> dict:
    """The train step and the sampler compiled for `gpu`, each with its report and roofline."""
    device, cpu = gpu_device(gpu), jax.devices("cpu")[0]
    counted = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    peak, hbm = TARGETS[gpu][1][config.model.dtype], bandwidth(gpu)
    programs = {
        "train_step": (lambda c, d: lower_train_step(c, d), config.batch_size, 1, True),
        "ddim_sampler": (lambda c, d: lower_sampler(c, d, images, sampling_steps), images, sampling_steps, False),
    }
    result = {}
    for name, (lower, batch, repeats, backward) in programs.items():
        with jax.default_matmul_precision("default"):
            report = program_report(lower(config, device).compile(), batch)
            total_flops = flops(lower(counted, cpu))
        if name == "ddim_sampler":  # the loop body is counted once; it runs once per sampling step
            total_flops *= repeats
        report["flops"] = total_flops
        report["attention_matmul_flops_by_hand"] = attention_flops(config, batch, backward) * repeats
        report["roofline"] = roofline(report, total_flops, peak, hbm, repeats)
        result[name] = report
    return {"device": gpu_device(gpu).device_kind, "peak_flops": peak, "hbm_bytes_per_s": hbm, **result}


def markdown(report: dict) -> str:
    """The report's figures as tables, one per compute dtype, one column per program and GPU."""
    header = [f"# {report['preset']}, compiled for a GPU without one (jax {report['jax']})", "",
              f"Train step at batch {report['batch_size']}; sampler {report['sampler']}. "
              f"`python benchmarks/h100_aot.py`; raw figures in gpu_aot.json. float32 computes at XLA's "
              "default precision (TF32 matmuls and convolutions), and its MFU is against the TF32 peak.", ""]
    return "\n".join(header) + "\n" + "\n".join(_table(dtype, targets["targets"])
                                                 for dtype, targets in report["precisions"].items())


def _table(dtype: str, targets: dict) -> str:
    columns = [(gpu, name, target[name]) for gpu, target in targets.items() for name in ("train_step", "ddim_sampler")]
    rows = {
        "kernels (the sampler: one step)": lambda r: r["kernels"],
        "fusions": lambda r: r["fusions"],
        "cuDNN convolutions": lambda r: sum(r["custom_calls"].get(k, 0) for k in CONVOLUTION_CALLS),
        "cuDNN attention forward / backward":
            lambda r: "{cudnn_fmha_forward} / {cudnn_fmha_backward}".format(**r["attention"]),
        "XLA softmax fusions": lambda r: r["attention"]["xla_softmax_fusions"],
        "layout changes on activations": lambda r: len(r["layout_changes_on_activations"]),
        "float32 activation arrays written": lambda r: sum(r["float32_activations"].values()),
        "integer (mask, random bits) activation arrays written": lambda r: sum(r["integer_activations"].values()),
        "copies": lambda r: r["other_kernels"].get("copy", 0),
        "temp memory (MB)": lambda r: f"{r['memory_bytes']['temp'] / 1e6:.0f}",
        "argument memory (MB)": lambda r: f"{r['memory_bytes']['argument'] / 1e6:.0f}",
        "TFLOP (whole program)": lambda r: f"{r['flops'] / 1e12:.2f}",
        "GB moved by memory-bound kernels per step": lambda r: f"{r['bytes']['memory_kernels'] / 1e9:.2f}",
        "GB moved by matmul kernels per step": lambda r: f"{r['bytes']['matmul_kernels'] / 1e9:.2f}",
        "roofline time, lower bound (ms)": lambda r: f"{r['roofline']['step_s_lower_bound'] * 1e3:.1f}",
        "MFU, upper bound": lambda r: f"{r['roofline']['mfu_upper_bound']:.0%}",
    }
    lines = [f"## {dtype}", "", "| | " + " | ".join(f"{gpu} {name}" for gpu, name, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(cell(r)) for _, _, r in columns) + " |" for label, cell in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=64, help="sampler batch")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--gpus", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS, reverse=True))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="compute dtypes")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "gpu_aot.json")
    args = parser.parse_args(argv)
    for name in ("batch_size", "images", "sampling_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    report = {"preset": args.preset, "batch_size": args.batch_size,
              "sampler": f"DDIM {args.sampling_steps} x {args.images}",
              "jax": jax.__version__, "precisions": {}}
    for dtype in args.dtypes:
        config = compiled_config(args.preset, args.batch_size, dtype)
        report["precisions"][dtype] = {"targets": {gpu: analyse(config, gpu, args.images, args.sampling_steps)
                                                   for gpu in args.gpus}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
