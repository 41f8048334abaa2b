"""The train state, the optimiser and one pure train step: `make_train_step(config)`.

`train_step(state, batch, rng)` is written for one device's share of the batch and averages
gradients and metrics over the named axis `parallel.DATA_AXIS`; the drivers in unet_flax.parallel run
it on many devices. Noise and timesteps are drawn per example from its global index, so the result
does not depend on how many devices share the batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.experimental.layout import Layout, with_layout_constraint

from . import diffusion
from .config import TrainConfig
from .model import UNet, compute_dtype_params, init_params
from .parallel import DATA_AXIS, STEP_FUNCTIONS_KEPT, Batch, Metrics, StepFn


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # steps taken, skipped ones included: it keys each step's randomness
    params: Any
    ema_params: Any
    opt_state: Any
    skipped_steps: jax.Array  # steps with a non-finite loss or gradient, left unapplied
    # params as the forward pass reads them (model.compute_dtype_params), written by each update: a bfloat16
    # step then reads its weights without a cast of each one every step. None where the model computes in
    # float32 or the config keeps no copy (keeps_weight_copy). Never saved: a restored state casts its params
    # again (from_saved_form).
    compute_params: Any = None

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


def make_optimizer(config: TrainConfig,
                   norm: Callable[[Any], jax.Array] = optax.tree.norm) -> optax.GradientTransformation:
    """Clipping by the global `norm`, AdamW with decoupled weight decay on the kernels (`decays`)."""
    clip = clip_by_global_norm(config.grad_clip, norm) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(learning_rate(config), b1=config.adam_b1, b2=config.adam_b2,
                                         eps=config.adam_eps, weight_decay=config.weight_decay, mask=decays))


def clip_by_global_norm(max_norm: float, norm: Callable[[Any], jax.Array]) -> optax.GradientTransformation:
    """optax.clip_by_global_norm, the same math and state (none), with the global norm computed by `norm`."""
    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        g_norm = norm(updates)
        return jax.tree_util.tree_map(
            lambda g: jax.lax.select(g_norm < max_norm, g, (g / g_norm.astype(g.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def partial_sums_norm(tree: Any) -> jax.Array:
    """optax.tree.norm as one sum: each leaf's squares summed over all but its last axis (a kernel per large
    leaf on a GPU, where its whole sum takes two; a bias is its squares), then all of them at once (one kernel,
    where the small leaves' sums were a kernel each). For leaves each device holds whole (pmap, the replicated
    jit); on sharded leaves the concatenation would gather them."""
    partial = [jnp.sum(jnp.square(leaf), axis=tuple(range(leaf.ndim - 1))).ravel()
               for leaf in jax.tree_util.tree_leaves(tree)]
    # The barrier keeps XLA from splitting the sum of the concatenation back into a sum per leaf.
    return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(partial))))


def ema_decay(max_decay: float, applied_steps: jax.Array | int) -> jax.Array | float:
    """The EMA's decay after `applied_steps` updates: max_decay, warmed up as (1 + step) / (10 + step)
    so that early averages are not all initialisation. A Python number for a Python step (the
    PyTorch benchmark's)."""
    warm_up = (1.0 + applied_steps) / (10.0 + applied_steps)
    return min(max_decay, warm_up) if isinstance(warm_up, float) else jnp.minimum(max_decay, warm_up)


def initial_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the parameters' initialisation key, the key every step's randomness derives from) of a run's seed.
    Training and an imported checkpoint's step 0 both take them from here: a resumed import then draws
    the same noise as a run that started from those weights."""
    init_key, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, step_rng


def create_train_state(config: TrainConfig, rng: jax.Array) -> TrainState:
    return train_state_from_params(config, init_params(config.model, rng))


def train_state_from_params(config: TrainConfig, params: Any) -> TrainState:
    """Step 0 with these weights (also as the EMA) and a fresh optimizer state."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.device_put(params, may_alias=False),  # its own buffers: the steps donate
                       opt_state=jax.jit(make_optimizer(config).init)(params), skipped_steps=jnp.zeros((), jnp.int32))
    return with_compute_params(state, config)


# Where TrainConfig.weight_copy 'auto' keeps one (jax.default_backend()). On a TPU XLA fuses each weight's cast
# into the convolution that reads it, and a copy only costs: the cifar10 step on a v5e slice, per chip, 690
# against 613 MB of arguments, 708 against 650 MB of temporaries, 20.8 against 19.3 GB accessed.
WEIGHT_COPY_ON = ("gpu",)


def keeps_weight_copy(config: TrainConfig) -> bool:
    """Whether the train state keeps its weights' copy in the model's compute dtype (TrainState.compute_params):
    never for float32; TrainConfig.weight_copy 'on' or 'off', or 'auto' where the backend is in WEIGHT_COPY_ON."""
    if jnp.dtype(config.model.dtype) == jnp.float32 or config.weight_copy == "off":
        return False
    return config.weight_copy == "on" or jax.default_backend() in WEIGHT_COPY_ON


def with_compute_params(state: TrainState, config: TrainConfig) -> TrainState:
    """`state` with its params' copy in the compute dtype where `keeps_weight_copy`: what a restored state lacks.
    Cast by a jitted program, which takes arrays split over several processes (FSDP across hosts) as they are."""
    dtype = jnp.dtype(config.model.dtype)
    return state.replace(compute_params=_cast_params(state.params, dtype) if keeps_weight_copy(config) else None)


_cast_params = jax.jit(compute_dtype_params, static_argnums=1)


def cast_like(tree: Any, like: Any) -> Any:
    """`tree`'s leaves in the dtypes of `like`'s (None for None)."""
    return None if like is None else jax.tree_util.tree_map(lambda leaf, model: leaf.astype(model.dtype), tree, like)


def recast(copy: Any, params: Any) -> Any:
    """`copy`'s leaves of another dtype than `params`' cast again from `params`, the others as they are (None
    for None). Leaves in the parameters' own dtype (GroupNorm's float32) stay as the step chose them: taken
    from `params`, each would be one array in two of the state's buffers, and XLA would copy it."""
    if copy is None:
        return None
    return jax.tree_util.tree_map(lambda leaf, kept: leaf if leaf.dtype == kept.dtype else kept.astype(leaf.dtype),
                                  copy, params)


def saved_form(state: TrainState) -> dict[str, Any]:
    """`state` as checkpoints hold it: its fields but the compute copy, which its params determine."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if field.name != "compute_params"}


def from_saved_form(saved: dict[str, Any], config: TrainConfig) -> TrainState:
    """The state a checkpoint holds, with the compute copy where `config` keeps one."""
    return with_compute_params(TrainState(**saved), config)


# The TrainConfig fields the train step never reads (the data, the loop, sampling, the job; `steps`
# only through the cosine schedule). Configs that differ only in these get the same step function,
# and with it JAX's trace and compiled program: a process that trains again (a notebook, a sweep,
# the tests) skips seconds of tracing and compiling. A field missing here only costs a new trace.
NOT_READ_BY_THE_STEP = frozenset({
    "workdir", "data", "class_conditional", "hflip", "data_workers", "skip_bad_images", "batch_size",
    "skip_nonfinite", "sample_every", "num_samples", "sampling_steps", "guidance_scale", "sampler", "parallel", "seed",
    "save_every", "keep_checkpoints", "log_every", "resume", "distributed", "coordinator_address",
    "num_processes", "process_id", "mesh", "weight_copy"})
_TRAIN_STEPS: dict[tuple, StepFn] = {}  # the newest few, oldest first


def make_train_step(config: TrainConfig, axis_name: str | None = DATA_AXIS, row_major_gradients: bool = True) -> StepFn:
    """The pure train step for this config (one function for configs that differ only in
    NOT_READ_BY_THE_STEP). With `axis_name`, it sees one device's share of the batch and averages over
    that axis (pmap, shard_map); with None, the whole batch, however jit's shardings split it.
    `row_major_gradients`: on a GPU, the gradients in the parameters' default layout (in_parameter_layout),
    for a state in that layout; False where the driver lets XLA choose the state's layout (jit_driver)."""
    unread = NOT_READ_BY_THE_STEP | ({"steps"} if config.lr_schedule == "constant" else set())
    key = (axis_name, row_major_gradients, *((field.name, getattr(config, field.name))
                                              for field in dataclasses.fields(config) if field.name not in unread))
    if key not in _TRAIN_STEPS:
        if len(_TRAIN_STEPS) >= STEP_FUNCTIONS_KEPT:
            del _TRAIN_STEPS[next(iter(_TRAIN_STEPS))]
        _TRAIN_STEPS[key] = _make_train_step(config, axis_name, row_major_gradients)
    return _TRAIN_STEPS[key]


def _make_train_step(config: TrainConfig, axis_name: str | None = DATA_AXIS,
                     row_major_gradients: bool = True) -> StepFn:
    model = UNet(config.model)
    norm = optax.tree.norm if axis_name is None else partial_sums_norm
    tx = make_optimizer(config, norm)
    schedule = diffusion.make_schedule(config.noise_schedule, config.timesteps)
    lr = learning_rate(config)
    num_classes = config.model.num_classes

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        images = batch["image"]
        if images.dtype == jnp.uint8:  # batches leave the host as uint8 and are scaled here, on the device
            images = diffusion.from_uint8(images)
        share = 0 if axis_name is None else jax.lax.axis_index(axis_name)  # which share of the batch
        example_ids = share * images.shape[0] + jnp.arange(images.shape[0])
        t, noise, dropped, dropout_key = step_randomness(config, rng, state.step, example_ids, images.shape[1:])
        # Classifier-free guidance: train a share of the examples with the null label.
        labels = None if num_classes is None else jnp.where(dropped, num_classes, batch["label"])
        dropout_key = jax.random.fold_in(dropout_key, share)

        def loss_fn(params):
            def denoise(x_t, t):
                return model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_key})
            return diffusion.diffusion_loss(denoise, schedule, images, t, noise, config.prediction,
                                            config.min_snr_gamma)

        read_params = state.params if state.compute_params is None else state.compute_params
        loss, grads = jax.value_and_grad(loss_fn)(read_params)
        # A cast leaf's gradient, cast back: the float32 parameter's, as if the forward pass had cast it.
        grads = cast_like(grads, state.params)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        if row_major_gradients:
            grads = jax.lax.platform_dependent(grads, cuda=in_parameter_layout, default=lambda grads: grads)
        grad_norm = norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optax.incremental_update(params, state.ema_params,
                                              1.0 - ema_decay(config.ema_decay, state.applied_steps))
        applied = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                                compute_params=cast_like(params, state.compute_params))

        # A non-finite loss or gradient leaves parameters, optimiser and EMA as they were (nothing poisoned
        # reaches a checkpoint) and is counted as skipped, so learning rate and warm-ups follow what was applied.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), applied, skipped)
        # The copy's cast leaves cast from the parameters kept: choosing them as above reads the old copy too.
        new_state = new_state.replace(compute_params=recast(new_state.compute_params, new_state.params))
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
    per cifar10 step (docs/benchmarks.md). Not on a TPU, where row-major is not its tiled default layout. A
    driver that lets XLA choose the state's layout (jit_driver) does better without it: the state then lives
    in cuDNN's filter layout, and neither the update nor the forward pass's casts transpose anything."""
    return jax.tree_util.tree_map(lambda g: with_layout_constraint(g, Layout(tuple(range(g.ndim)))), grads)


# -- drivers -----------------------------------------------------------------------------------

