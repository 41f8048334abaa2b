"""The drivers that run one pure train step on many devices, the meshes they name, and where the state lives.

Data-parallel (every device holds the whole state): `train_step(state, batch, rng)` (unet_flax.train_step)
sees one device's share of the batch and averages gradients and metrics over the axis `DATA_AXIS`;
`jax.pmap` names that axis over the local devices, the sharded-jit driver with `jax.shard_map` over a 1-D
mesh. FSDP: the same step sees the whole batch under `jax.jit` over a 2-D mesh (`DATA_AXIS`, `FSDP_AXIS`);
each large parameter, its AdamW moments and its EMA are split over `FSDP_AXIS` by `fsdp_spec`, a rule of
shapes kept out of the model, the batch over both axes, and XLA's partitioner inserts the gathers and
reduce-scatters. Every driver donates the state. `Parallel` moves the state and the batches into the chosen
driver's layout and back.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config.train_config import mesh_sizes
from .errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Arrays of fewer elements stay whole on every device (biases, norms, the smallest kernels): their gathers
# would cost more time than their copies cost memory.
FSDP_MIN_SIZE = 2**10
# Step functions (and their drivers) kept per process: configs that differ only in what the step never
# reads share one; a process that trains again (a notebook, a sweep, the tests) skips their tracing.
STEP_FUNCTIONS_KEPT = 8

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[Any, Batch, jax.Array], tuple[Any, Metrics]]


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named `DATA_AXIS` over `devices` (default: every device of the job)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def check_batch_size(global_batch: int, num_devices: int) -> None:
    if global_batch % num_devices:
        raise ConfigError(f"batch size {global_batch} is not divisible by the {num_devices} devices; "
                         f"use a multiple of {num_devices}")


# One driver per step function (and mesh): JAX's caches are keyed by the function a driver wraps, and
# shard_map wraps a new one at every call.
@functools.lru_cache(maxsize=STEP_FUNCTIONS_KEPT)
def pmap_driver(train_step: StepFn) -> StepFn:
    """`jax.pmap` over the local devices: state replicated with a leading device axis, batch split on it."""
    return jax.pmap(train_step, axis_name=DATA_AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


@functools.lru_cache(maxsize=STEP_FUNCTIONS_KEPT)
def jit_driver(train_step: StepFn, mesh: Mesh, xla_chooses_state_layout: bool = False) -> StepFn:
    """`jax.jit` over a 1-D mesh: state replicated, batch sharded on its first axis with NamedSharding.

    `xla_chooses_state_layout`: the state's layout in memory is XLA's choice (`Layout.AUTO`, the same in
    and out). On a GPU the convolution kernels, their gradients and the optimiser's moments then stay in
    cuDNN's filter layout, so the update runs in place without transposing anything (with
    `make_train_step(..., row_major_gradients=False)`; docs/benchmarks.md). Such a step runs compiled,
    from `compile_step`, which also moves the state into its layout."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    state_sharding = Format(Layout.AUTO, replicated) if xla_chooses_state_layout else replicated
    per_device = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                               out_specs=(P(), P()), check_vma=False)
    return jax.jit(per_device, in_shardings=(state_sharding, sharded, replicated),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def compile_step(step_fn: StepFn, state: Any, batch: Batch, rng: jax.Array) -> tuple[jax.stages.Compiled, Any]:
    """A jitted step compiled for these arguments, and `state` in the memory layout the compiled step takes
    it in: moved through the host where a leaf's layout differs (each process fills its own devices, so a
    multi-host array too). The state is lowered from its shapes, which a layout left to XLA requires."""
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    compiled = step_fn.lower(shapes, batch, rng).compile()

    def move(x: jax.Array, target: Format) -> jax.Array:
        return x if x.format == target else _place(local_value(x), target)

    return compiled, jax.tree_util.tree_map(move, state, compiled.input_formats[0][0])


def fsdp_mesh(mesh: str | None, devices: list | None = None) -> Mesh:
    """The 2-D mesh (`DATA_AXIS`, `FSDP_AXIS`) that `--mesh` names ('data=2,fsdp=4'; a size left out is what
    the devices leave for it; None: every device on fsdp). Each process's devices are consecutive, so the
    processes' batch rows land on their own devices."""
    devices = jax.devices() if devices is None else devices
    sizes = {} if mesh is None else mesh_sizes(mesh)
    count = len(devices)
    fsdp = sizes.get("fsdp", count // sizes["data"] if "data" in sizes else count)
    data = sizes.get("data", count // max(fsdp, 1))
    if data * fsdp != count:
        raise ConfigError(f"mesh {mesh} has {data} x {fsdp} = {data * fsdp} devices; there are {count}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Where an array of `shape` lives on a mesh whose fsdp axis has `fsdp` devices: split along its
    largest axis that `fsdp` divides (the first of equals), or whole on every device where it is small
    (under FSDP_MIN_SIZE elements) or no axis divides."""
    if fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= FSDP_MIN_SIZE:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % fsdp == 0:
                return P(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))
    return P()


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """Each leaf's NamedSharding under `fsdp_spec`."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape[FSDP_AXIS])), tree)


@functools.lru_cache(maxsize=STEP_FUNCTIONS_KEPT)
def fsdp_driver(train_step: StepFn, mesh: Mesh) -> StepFn:
    """`jax.jit` of the whole-batch step over a 2-D mesh: the new state kept where fsdp_spec puts it (the
    arguments arrive there: Parallel.put_state, put_batch)."""
    def step(state: Any, batch: Batch, rng: jax.Array) -> tuple[Any, Metrics]:
        state, metrics = train_step(state, batch, rng)
        return jax.lax.with_sharding_constraint(state, fsdp_shardings(state, mesh)), metrics
    return jax.jit(step, donate_argnums=(0,))


class Parallel:
    """Moves the state and batches into the layout of the chosen driver and runs its step.

    Checkpoints restore into any driver, whichever wrote them. Data-parallel drivers save one copy per
    process, on its first device: orbax divides the writing of a replicated array between its copies,
    cutting each slice with a program of its own (5 s of a tiny network's first save on a 2-core CPU);
    one copy per process is one slice each. FSDP saves the state as it lives, each process its shards.

    `step_for(axis_name)` gives the train step for a data axis (data-parallel) or None (FSDP's whole batch).
    """

    def __init__(self, kind: str, step_for: Callable[[str | None], StepFn], global_batch: int,
                 mesh: str | None = None):
        self.kind = kind
        check_batch_size(global_batch, jax.device_count())
        if kind == "fsdp":
            self.mesh = fsdp_mesh(mesh)
            self.batch_sharding = NamedSharding(self.mesh, P((DATA_AXIS, FSDP_AXIS)))
            self.step_fn = fsdp_driver(step_for(None), self.mesh)
        elif kind in ("pmap", "jit"):
            self.mesh = data_mesh()
            self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
            self.step_fn = (pmap_driver(step_for(DATA_AXIS)) if kind == "pmap"
                            else jit_driver(step_for(DATA_AXIS, row_major_gradients=False), self.mesh,
                                            xla_chooses_state_layout=True))
        else:
            raise ValueError(f"parallel must be 'pmap', 'jit' or 'fsdp', got {kind!r}")
        self.replicated = NamedSharding(self.mesh, P())
        self.saved = NamedSharding(data_mesh(first_device_of_each_process()), P())

    def sharding_of(self, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        """Where a state leaf of this shape is restored to (the driver's layout, or one it is put in from)."""
        if self.kind == "fsdp":
            return NamedSharding(self.mesh, fsdp_spec(leaf.shape, self.mesh.shape[FSDP_AXIS]))
        return self.replicated

    def put_state(self, state: Any) -> Any:
        """Canonical (or host) state -> the driver's layout."""
        if self.kind == "fsdp":
            return jax.tree_util.tree_map(self._put_sharded, state)
        host = jax.tree_util.tree_map(local_value, state)
        if self.kind == "pmap":
            # pmap's layout: a leading axis over the local devices, one copy on each.
            local = NamedSharding(data_mesh(jax.local_devices()), P(DATA_AXIS))
            n = jax.local_device_count()
            return jax.device_put(jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n, *x.shape)), host), local)
        return jax.tree_util.tree_map(self.replicate, host)

    def _put_sharded(self, value: Any) -> jax.Array:
        sharding = self.sharding_of(value)
        if isinstance(value, jax.Array) and value.sharding == sharding:  # restored into place
            return value
        return _place(gathered(value) if isinstance(value, jax.Array) else np.asarray(value), sharding)

    def host_state(self, state: Any) -> Any:
        """The driver's layout -> numpy, one copy (read from this process's first device; FSDP's shards
        gathered from every process, which must all call it)."""
        # pmap's copies are read whole and indexed on the host: indexing on the device compiles a
        # program per parameter shape.
        read = {"pmap": lambda x: np.asarray(x.addressable_shards[0].data)[0],
                "fsdp": gathered}.get(self.kind, local_value)
        return jax.tree_util.tree_map(read, state)

    def canonical_state(self, state: Any) -> Any:
        """The driver's layout -> what checkpoints hold (see the class)."""
        if self.kind == "fsdp":
            return state
        return jax.tree_util.tree_map(self.to_saved, self.host_state(state))

    def to_saved(self, value: np.ndarray) -> jax.Array:
        """A host value as checkpoints hold it: on the first device of each process (FSDP: on every device)."""
        return _place(value, self.replicated if self.kind == "fsdp" else self.saved)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows of the global batch -> the driver's layout, on the devices (asynchronously)."""
        if self.kind == "pmap":
            n = jax.local_device_count()
            local = NamedSharding(data_mesh(jax.local_devices()), P(DATA_AXIS))
            return {k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), local)
                    for k, v in local_batch.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}

    def compile(self, state: Any, batch: Batch, rng: jax.Array) -> Any:
        """Compile the step for these arguments now rather than at its first call, so that processes
        can wait for each other before its first collective (see job.py). The state, in the layout the
        compiled step takes (the jit driver's is XLA's choice)."""
        if self.kind == "jit":
            self.step_fn, state = compile_step(self.step_fn, state, batch, rng)
            return state
        compiled = self.step_fn.lower(state, batch, rng).compile()
        # Across processes, pmap's compiled step takes global arrays, not each process's: pmap's first
        # call compiles again, from the persistent compilation cache where one is set (train.py's).
        if self.kind != "pmap" or jax.process_count() == 1:
            self.step_fn = compiled
        return state

    def step(self, state: Any, batch: Batch, rng: jax.Array) -> tuple[Any, Metrics]:
        if self.kind == "jit" and not isinstance(self.step_fn, jax.stages.Compiled):
            state = self.compile(state, batch, rng)  # its state's layout is XLA's: it runs compiled
        state, metrics = self.step_fn(state, batch, rng)
        if self.kind == "pmap":
            metrics = jax.tree_util.tree_map(first_replica, metrics)
        return state, metrics

    def replicate(self, value: np.ndarray) -> jax.Array:
        return _place(value, self.replicated)


def _place(value: np.ndarray, sharding: NamedSharding | Format) -> jax.Array:
    """The same host value in every process -> a global array (each process fills its own devices), in
    `sharding`'s memory layout where it is a Format."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def first_device_of_each_process() -> list:
    first = {}
    for device in jax.devices():
        first.setdefault(device.process_index, device)
    return [first[process] for process in sorted(first)]


def first_replica(x: jax.Array) -> jax.Array:
    """Device 0's copy of a pmap output, without a transfer; across hosts the output is a global
    array whose other rows live on other processes, so it is read from this process's first shard."""
    return x.addressable_shards[0].data[0]


def gathered(x: jax.Array) -> np.ndarray:
    """A sharded array's whole value in every process (a collective across processes: all must call it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return local_value(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_value(x: Any) -> np.ndarray:
    """A replicated array's value, read from this process's first shard (works across hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)

