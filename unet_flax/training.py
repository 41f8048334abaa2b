"""The train state, the optimiser, one pure train step, and the pmap / sharded-jit drivers around it.

`train_step(state, batch, rng)` is written for one device's share of the batch and averages
gradients and metrics over the named axis 'data'. `jax.pmap` names that axis over the local
devices; the sharded-jit driver names it with `jax.shard_map` over a 1-D `Mesh`. Both donate the
state. Noise and timesteps are drawn per example from its global index, so the result does not
depend on how many devices share the batch.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import diffusion
from .train_config import TrainConfig
from .unet_config import ConfigError, UNetConfig
from .model import UNet

DATA_AXIS = "data"

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[Any, Batch, jax.Array], tuple[Any, Metrics]]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # steps taken, skipped ones included: it keys each step's randomness
    params: Any
    ema_params: Any
    opt_state: Any
    skipped_steps: jax.Array  # steps with a non-finite loss or gradient, left unapplied

    @property
    def applied_steps(self) -> jax.Array:
        """Updates applied: what the learning rate, the optimiser's own count and EMA warm-up follow."""
        return self.step - self.skipped_steps


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant or cosine decay to 0 at config.steps."""
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                                  max(config.steps, config.warmup_steps + 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, config.warmup_steps), optax.constant_schedule(config.lr)],
        [config.warmup_steps])


def decays(params: Any) -> Any:
    """Which parameters weight decay applies to: the conv and dense kernels. Biases, GroupNorm scales
    and the label embedding are left alone, as is usual: decaying them pulls the network's offsets
    and normalisation gains towards zero without regularising what it computes."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(learning_rate(config), b1=config.adam_b1, b2=config.adam_b2,
                                         eps=config.adam_eps, weight_decay=config.weight_decay, mask=decays))


def ema_decay(max_decay: float, applied_steps: jax.Array | int) -> jax.Array | float:
    """The EMA's decay after `applied_steps` updates: max_decay, warmed up as (1 + step) / (10 + step)
    so that early averages are not all initialisation. A Python number for a Python step (the
    PyTorch benchmark's)."""
    warm_up = (1.0 + applied_steps) / (10.0 + applied_steps)
    return min(max_decay, warm_up) if isinstance(warm_up, float) else jnp.minimum(max_decay, warm_up)


def example_inputs(config: TrainConfig | UNetConfig, batch_size: int = 1) -> tuple:
    m = config.model if isinstance(config, TrainConfig) else config
    x = jnp.zeros((batch_size, m.image_size, m.image_size, m.in_channels), jnp.float32)
    y = None if m.num_classes is None else jnp.zeros((batch_size,), jnp.int32)
    return x, jnp.zeros((batch_size,), jnp.int32), y


def init_params(model: UNetConfig, rng: jax.Array) -> Any:
    """The U-Net's initial parameters, from one compiled program: run op by op, Flax's init compiles
    each of its hundreds of small operations apart (25 s of a tiny run's start on a 2-core CPU)."""
    if isinstance(rng, jax.core.Tracer):  # traced (eval_shape, a caller's jit): part of that program
        return _init(model, rng)
    return _init_program(jax.default_backend())(model, rng)


@functools.cache
def _init_program(backend: str) -> Callable[[UNetConfig, jax.Array], Any]:
    # The program is one threefry expansion per parameter and runs once: LLVM's optimisations take
    # XLA:CPU 30 s on it for nothing (5 s without them, on a 2-core CPU without AVX-512).
    options = {"xla_backend_optimization_level": 0} if backend == "cpu" else None
    return jax.jit(_init, static_argnums=0, compiler_options=options)


def _init(model: UNetConfig, rng: jax.Array) -> Any:
    return UNet(model).init(rng, *example_inputs(model))["params"]


def param_shapes(model: UNetConfig) -> Any:
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves), computing nothing."""
    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def create_train_state(config: TrainConfig, rng: jax.Array) -> TrainState:
    return train_state_from_params(config, init_params(config.model, rng))


def train_state_from_params(config: TrainConfig, params: Any) -> TrainState:
    """Step 0 with these weights (also as the EMA) and a fresh optimizer state."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.device_put(params, may_alias=False),  # its own buffers: the steps donate
                      opt_state=jax.jit(make_optimizer(config).init)(params), skipped_steps=jnp.zeros((), jnp.int32))


# The TrainConfig fields the train step never reads (the data, the loop, sampling, the job; `steps`
# only through the cosine schedule). Configs that differ only in these get the same step function,
# and with it JAX's trace and compiled program: a process that trains again (a notebook, a sweep,
# the tests) skips seconds of tracing and compiling. A field missing here only costs a new trace.
NOT_READ_BY_THE_STEP = frozenset({
    "workdir", "data", "class_conditional", "hflip", "data_workers", "skip_bad_images", "batch_size",
    "skip_nonfinite", "sample_every", "num_samples", "sampling_steps", "guidance_scale", "parallel", "seed",
    "save_every", "keep_checkpoints", "log_every", "resume", "distributed", "coordinator_address",
    "num_processes", "process_id"})
_TRAIN_STEPS: dict[tuple, StepFn] = {}  # the newest few, oldest first
_TRAIN_STEPS_KEPT = 8


def make_train_step(config: TrainConfig) -> StepFn:
    """The pure per-device train step for this config (one function for configs that differ only in
    NOT_READ_BY_THE_STEP); see the module docstring."""
    unread = NOT_READ_BY_THE_STEP | ({"steps"} if config.lr_schedule == "constant" else set())
    key = tuple((field.name, getattr(config, field.name)) for field in dataclasses.fields(config)
                if field.name not in unread)
    if key not in _TRAIN_STEPS:
        if len(_TRAIN_STEPS) >= _TRAIN_STEPS_KEPT:
            del _TRAIN_STEPS[next(iter(_TRAIN_STEPS))]
        _TRAIN_STEPS[key] = _make_train_step(config)
    return _TRAIN_STEPS[key]


def _make_train_step(config: TrainConfig) -> StepFn:
    model = UNet(config.model)
    tx = make_optimizer(config)
    schedule = diffusion.make_schedule(config.noise_schedule, config.timesteps)
    lr = learning_rate(config)
    num_classes = config.model.num_classes

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        images = batch["image"]
        if images.dtype == jnp.uint8:  # batches leave the host as uint8 and are scaled here, on the device
            images = diffusion.from_uint8(images)
        example_ids = jax.lax.axis_index(DATA_AXIS) * images.shape[0] + jnp.arange(images.shape[0])
        t, noise, dropped, dropout_key = step_randomness(config, rng, state.step, example_ids, images.shape[1:])
        # Classifier-free guidance: train a share of the examples with the null label.
        labels = None if num_classes is None else jnp.where(dropped, num_classes, batch["label"])
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(DATA_AXIS))

        def loss_fn(params):
            def denoise(x_t, t):
                return model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_key})
            return diffusion.diffusion_loss(denoise, schedule, images, t, noise, config.prediction,
                                            config.min_snr_gamma)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        loss, grads = jax.lax.pmean((loss, grads), DATA_AXIS)
        grads = jax.lax.platform_dependent(grads, cuda=in_parameter_layout, default=lambda grads: grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optax.incremental_update(params, state.ema_params,
                                              1.0 - ema_decay(config.ema_decay, state.applied_steps))
        applied = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)

        # A non-finite loss or gradient leaves parameters, optimiser and EMA as they were (nothing poisoned
        # reaches a checkpoint) and is counted as skipped, so learning rate and warm-ups follow what was applied.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), applied, skipped)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr(state.applied_steps),
                   "nonfinite": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return train_step


def step_randomness(config: TrainConfig, rng: jax.Array, step: jax.Array | int, example_ids: jax.Array,
                    image_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """A step's draws: each example's timestep, noise and whether its label is dropped (None for an
    unconditional model), and the key the model's dropout draws from. Example i draws from
    fold_in(step key, i), so the draws do not depend on how many devices share the batch; a test
    hands the PyTorch side these very draws."""
    step_key = jax.random.fold_in(rng, step)
    example_key, dropout_key = jax.random.split(step_key)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(example_key, i), 3))(example_ids)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, config.timesteps))(keys[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, image_shape))(keys[:, 1])
    dropped = None
    if config.model.num_classes is not None:
        dropped = jax.vmap(lambda k: jax.random.bernoulli(k, config.label_dropout))(keys[:, 2])
    return t, noise, dropped, dropout_key


def in_parameter_layout(grads: Any) -> Any:
    """The gradients in the parameters' own (row-major) layout. On a GPU a convolution kernel's gradient leaves
    cuDNN in its filter layout, and an AdamW/EMA update computed in that layout transposes the optimiser state
    in and out, so it cannot overwrite the donated state in place: on an H100, 309 copies and 290 more kernels
    per cifar10 step (docs/benchmarks.md). Not on a TPU, where row-major is not its tiled default layout."""
    return jax.tree_util.tree_map(lambda g: with_layout_constraint(g, Layout(tuple(range(g.ndim)))), grads)


# -- drivers -----------------------------------------------------------------------------------

def data_mesh(devices: list | None = None) -> Mesh:
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def check_batch_size(global_batch: int, num_devices: int) -> None:
    if global_batch % num_devices:
        raise ConfigError(f"batch size {global_batch} is not divisible by the {num_devices} devices; "
                         f"use a multiple of {num_devices}")


# One driver per step function (and mesh): JAX's caches are keyed by the function a driver wraps, and
# shard_map wraps a new one at every call.
@functools.lru_cache(maxsize=_TRAIN_STEPS_KEPT)
def pmap_driver(train_step: StepFn) -> StepFn:
    """`jax.pmap` over the local devices: state replicated with a leading device axis, batch split on it."""
    return jax.pmap(train_step, axis_name=DATA_AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


@functools.lru_cache(maxsize=_TRAIN_STEPS_KEPT)
def jit_driver(train_step: StepFn, mesh: Mesh) -> StepFn:
    """`jax.jit` over a 1-D mesh: state replicated, batch sharded on its first axis with NamedSharding."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    per_device = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                               out_specs=(P(), P()), check_vma=False)
    return jax.jit(per_device, in_shardings=(replicated, sharded, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


class Parallel:
    """Moves the state and batches into the layout of the chosen driver and runs its step.

    `canonical` state (what checkpoints hold) is the same under either driver, so a run saved under
    pmap resumes under jit and back: one copy per process, on its first device. Orbax divides the
    writing of a replicated array between its copies, cutting each slice with a program of its own
    (5 s of a tiny network's first save on a 2-core CPU); one copy per process is one slice each.
    """

    def __init__(self, kind: str, train_step: StepFn, global_batch: int):
        self.kind = kind
        self.mesh = data_mesh()
        check_batch_size(global_batch, jax.device_count())
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self.saved = NamedSharding(Mesh(np.asarray(first_device_of_each_process()), (DATA_AXIS,)), P())
        if kind == "pmap":
            self.step_fn = pmap_driver(train_step)
        elif kind == "jit":
            self.step_fn = jit_driver(train_step, self.mesh)
        else:
            raise ValueError(f"parallel must be 'pmap' or 'jit', got {kind!r}")

    def put_state(self, state: Any) -> Any:
        """Canonical (or host) state -> the driver's layout."""
        host = jax.tree_util.tree_map(local_value, state)
        if self.kind == "pmap":
            # pmap's layout: a leading axis over the local devices, one copy on each.
            local = NamedSharding(Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,)), P(DATA_AXIS))
            n = jax.local_device_count()
            return jax.device_put(jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n, *x.shape)), host), local)
        return jax.tree_util.tree_map(self.replicate, host)

    def host_state(self, state: Any) -> Any:
        """The driver's layout -> numpy, one copy (read from this process's first device)."""
        # pmap's copies are read whole and indexed on the host: indexing on the device compiles a
        # program per parameter shape.
        read = (lambda x: np.asarray(x.addressable_shards[0].data)[0]) if self.kind == "pmap" else local_value
        return jax.tree_util.tree_map(read, state)

    def canonical_state(self, state: Any) -> Any:
        """The driver's layout -> what checkpoints hold (see the class)."""
        return jax.tree_util.tree_map(self.to_saved, self.host_state(state))

    def to_saved(self, value: np.ndarray) -> jax.Array:
        """A host value as checkpoints hold it: on the first device of each process."""
        return _place(value, self.saved)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows of the global batch -> the driver's layout, on the devices (asynchronously)."""
        if self.kind == "pmap":
            n = jax.local_device_count()
            local = NamedSharding(Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,)), P(DATA_AXIS))
            return {k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), local)
                    for k, v in local_batch.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}

    def compile(self, state: Any, batch: Batch, rng: jax.Array) -> None:
        """Compile the step for these arguments now rather than at its first call, so that processes
        can wait for each other before its first collective (see job.py)."""
        compiled = self.step_fn.lower(state, batch, rng).compile()
        # Across processes, pmap's compiled step takes global arrays, not each process's: pmap's first
        # call compiles again, from the persistent compilation cache where one is set (train.py's).
        if self.kind == "jit" or jax.process_count() == 1:
            self.step_fn = compiled

    def step(self, state: Any, batch: Batch, rng: jax.Array) -> tuple[Any, Metrics]:
        state, metrics = self.step_fn(state, batch, rng)
        if self.kind == "pmap":
            metrics = jax.tree_util.tree_map(first_replica, metrics)
        return state, metrics

    def replicate(self, value: np.ndarray) -> jax.Array:
        return _place(value, self.replicated)


def _place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The same host value in every process -> a global array (each process fills its own devices)."""
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


def local_value(x: Any) -> np.ndarray:
    """A replicated array's value, read from this process's first shard (works across hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)

