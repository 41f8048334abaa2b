"""The train step compiled for TPU slices on a machine without a TPU: per-chip memory against the chip's
HBM, the collectives XLA's partitioner inserted, and FLOPs; data-parallel (state replicated) against FSDP.

    pip install 'jax[tpu]==<the installed jax version>'   # libtpu, about 100 MB; not a requirement
    python benchmarks/tpu_aot.py                          # every case: docs/bench/tpu_aot.json and .md
    python benchmarks/tpu_aot.py --cases cifar10-fsdp8    # one case

libtpu compiles for a TPU topology it is only told about (`jax.experimental.topologies`): the program is
the one a slice of that shape would run, with JAX on the CPU (libtpu warns that TPU_ACCELERATOR_TYPE is
unset). Each case's result is written as soon as it compiles, so a run cut short keeps the earlier ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compilation targets the TPU; nothing runs on it

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h100_aot import shape_bytes, step_arguments  # noqa: E402

from unet_flax.config import PRESETS, TrainConfig  # noqa: E402
from unet_flax.parallel import DATA_AXIS, FSDP_AXIS, data_mesh, fsdp_driver, fsdp_mesh, fsdp_shardings, jit_driver  # noqa: E402
from unet_flax.train_step import create_train_state, make_train_step  # noqa: E402

# The chips' HBM per chip (GiB), from Google Cloud's TPU pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    topology: str  # libtpu's topology name: generation:shape
    parallel: str  # "jit" (data-parallel, state replicated) or "fsdp"
    batch_size: int

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]


CASES = {
    "cifar10-replicated": Case("cifar10", "v5e:2x4", "jit", 128),
    "cifar10-fsdp8": Case("cifar10", "v5e:2x4", "fsdp", 128),
    "adm256-replicated": Case("adm256", "v5p:2x2x2", "jit", 64),
    "adm256-fsdp8": Case("adm256", "v5p:2x2x2", "fsdp", 64),
    "adm256-fsdp64": Case("adm256", "v5p:4x4x4", "fsdp", 256),
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def case_config(case: Case) -> TrainConfig:
    """The preset in bf16 with XLA's attention (cuDNN's is a GPU's), GroupNorm's backward recomputing the
    slope and no weight copy in the state ('auto' on a TPU), its data's channels and classes."""
    config = PRESETS[case.preset]
    model = dataclasses.replace(config.model, dtype="bfloat16", attention_impl="xla", norm_backward="recompute",
                                num_classes=10 if config.class_conditional else None)
    return dataclasses.replace(config, model=model, batch_size=case.batch_size, parallel=case.parallel,
                               weight_copy="off")


def abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lower(case: Case, devices: list) -> jax.stages.Lowered:
    """train.py's step for `case` on these devices, as Parallel lays it out."""
    config = case_config(case)
    state, batch, rng = step_arguments(config)
    if case.parallel == "fsdp":
        mesh = fsdp_mesh(None, devices)
        step, state_shardings = fsdp_driver(make_train_step(config, None), mesh), fsdp_shardings(state, mesh)
        batch_spec = P((DATA_AXIS, FSDP_AXIS))
    else:
        mesh = data_mesh(devices)
        step = jit_driver(make_train_step(config, row_major_gradients=False), mesh, xla_chooses_state_layout=True)
        state_shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), state)
        batch_spec = P(DATA_AXIS)
    replicated = NamedSharding(mesh, P())
    return step.lower(abstract(state, state_shardings),
                      abstract(batch, jax.tree_util.tree_map(lambda _: NamedSharding(mesh, batch_spec), batch)),
                      jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Each collective's count and the bytes its results hold (per chip), from the optimised program. The
    TPU compiler writes a reduce-scatter as a fusion calling an `all-reduce-scatter` computation."""
    found = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
    pattern = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M)
    fused = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) fusion\(.*calls=%all-reduce-scatter", re.M)
    for shape, opcode in [*pattern.findall(hlo_text), *((shape,
                                                         "reduce-scatter") for shape in fused.findall(hlo_text))]:
        found[opcode]["count"] += 1
        found[opcode]["bytes"] += shape_bytes(shape)
    return found


def parameter_count(config: TrainConfig) -> int:
    params = jax.eval_shape(lambda key: create_train_state(config, key).params, jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def analyse(case: Case) -> dict:
    devices = topologies.get_topology_desc(topology_name=case.topology, platform="tpu").devices
    start = time.time()
    lowered = lower(case, devices)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_chip = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes \
        - memory.alias_size_in_bytes
    hbm = HBM_GIB[case.generation] * 2**30
    return {**dataclasses.asdict(case), "chips": len(devices), "device_kind": devices[0].device_kind,
            "parameters": parameter_count(case_config(case)),
            "per_chip_bytes": {"arguments": memory.argument_size_in_bytes, "temporary": memory.temp_size_in_bytes,
                               "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                               "total": per_chip},
            "hbm_bytes": hbm, "fits": per_chip <= hbm, "flops_per_chip": float(cost.get("flops", 0.0)),
            "collectives": collectives(compiled.as_text()), "compile_s": round(time.time() - start, 1)}


def markdown(results: dict[str, dict]) -> str:
    gib = functools.partial(lambda b: f"{b / 2**30:.2f}")
    lines = ["| case | chips | parameters | per chip: arguments / temporary / total GiB | HBM GiB | fits | "
             "all-gather | reduce-scatter | all-reduce | GFLOP per chip | compile s |", "|" + "---|" * 11]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['topology']} | | failed: {r['error']} | | | | | | | |")
            continue
        b, c = r["per_chip_bytes"], r["collectives"]
        count = lambda kind: f"{c[kind]['count']} ({c[kind]['bytes'] / 2**20:.0f} MiB)"  # noqa: E731
        lines.append(f"| {name} | {r['chips']} x {r['device_kind']} ({r['topology']}) | {r['parameters'] / 1e6:.1f}M | "
                     f"{gib(b['arguments'])} / {gib(b['temporary'])} / {gib(b['total'])} | {gib(r['hbm_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {count('all-gather')} | {count('reduce-scatter')} | "
                     f"{count('all-reduce')} | {r['flops_per_chip'] / 1e9:.0f} | {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "tpu_aot"), help="path without suffix")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for name in args.cases:
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = analyse(CASES[name])
        except Exception as error:  # a slice the model does not fit: libtpu refuses to compile it
            results[name] = {**dataclasses.asdict(CASES[name]), "error": str(error).splitlines()[0][:300]}
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
        print(json.dumps({name: results[name]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
