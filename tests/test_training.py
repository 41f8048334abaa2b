"""The train step under pmap, sharded jit and one device; training parity with the PyTorch reference."""
import dataclasses
import functools

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from parity import rel_error, without_key_biases

from unet_flax import UNet, UNetConfig, diffusion
from unet_flax import reference as ref
from unet_flax.config import SamplerConfig, TrainConfig
from unet_flax.model import compute_dtype_params, init_params, param_shapes
from unet_flax.parallel import Parallel, data_mesh, fsdp_spec, jit_driver, local_value
from unet_flax.torch_format import flax_to_torch, torch_to_flax
from unet_flax.train_step import (
    NOT_READ_BY_THE_STEP,
    _make_train_step,
    clip_by_global_norm,
    create_train_state,
    learning_rate,
    make_optimizer,
    make_train_step,
    partial_sums_norm,
)

TINY = UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), image_size=8, num_heads=2, num_groups=4)
CONFIG = TrainConfig(model=dataclasses.replace(TINY, num_classes=3), batch_size=8, lr=3e-3, warmup_steps=2,
                     steps=5, class_conditional=True, ema_decay=0.9)


def batches(count, batch_size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 3, batch_size).astype(np.int32)} for _ in range(count)]


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(local_value(x)), tree)


# FSDP on a 2-D mesh here; every device on fsdp, and 8 devices: test_fsdp.py.
DRIVERS = {"pmap": ("pmap", None), "jit": ("jit", None), "fsdp data=2,fsdp=2": ("fsdp", "data=2,fsdp=2")}


@pytest.fixture(scope="module")
def runs():
    """The same 5 steps under each driver, from the same initial state; under FSDP, how many of the
    parameters and of the optimiser's arrays were split over the devices."""
    assert jax.device_count() == 4
    init = host(create_train_state(CONFIG, jax.random.PRNGKey(0)))
    rng = jax.random.PRNGKey(1)
    results, split = {}, {}
    for name, (kind, mesh) in DRIVERS.items():
        parallel = Parallel(kind, functools.partial(make_train_step, CONFIG), CONFIG.batch_size, mesh)
        state = parallel.put_state(init)
        for batch in batches(5):
            state, metrics = parallel.step(state, parallel.put_batch(batch), rng)
        per_device = 1 if kind == "pmap" else 0  # pmap's leading axis: one whole copy per device
        split[name] = {tree: sum(leaf.addressable_shards[0].data.shape[per_device:] != leaf.shape[per_device:]
                                 for leaf in jax.tree_util.tree_leaves(getattr(state, tree)))
                       for tree in ("params", "ema_params", "opt_state")}
        results[name] = (host(parallel.host_state(state)), host(metrics))
    results["split"] = split
    one = data_mesh(jax.devices()[:1])
    single = jit_driver(make_train_step(CONFIG), one)
    state = jax.device_put(init, NamedSharding(one, P()))
    for batch in batches(5):
        state, metrics = single(state, batch, rng)
    results["one device"] = (host(state), host(metrics))
    return results


@pytest.mark.parametrize("kind", DRIVERS)
def test_drivers_reach_the_one_device_parameters(runs, kind):
    state, metrics = runs[kind]
    reference_state, reference_metrics = runs["one device"]
    assert int(state.step) == int(reference_state.step) == 5
    for tree in ("params", "ema_params"):
        errors = jax.tree_util.tree_map(rel_error, without_key_biases(getattr(state, tree)),
                                        without_key_biases(getattr(reference_state, tree)))
        assert max(jax.tree_util.tree_leaves(errors)) <= 1e-5, tree
    np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)
    # The key biases (see without_key_biases) may differ; what the models compute may not.
    batch = batches(1, seed=7)[0]
    t = np.array([3, 100, 250, 400, 555, 700, 850, 999])
    apply = jax.jit(UNet(CONFIG.model).apply)
    outputs = [apply({"params": s.params}, batch["image"], t, batch["label"]) for s in (state, reference_state)]
    assert rel_error(*outputs) <= 1e-5


def test_fsdp_splits_parameters_moments_and_ema_and_data_parallel_does_not(runs):
    """FSDP holds a share of each large array per device (fsdp_spec); pmap and jit hold every array whole."""
    params = len(jax.tree_util.tree_leaves(runs["pmap"][0].params))
    split = runs["split"]["fsdp data=2,fsdp=2"]
    assert 0 < split["params"] < params and split["ema_params"] == split["params"], split
    assert split["opt_state"] >= 2 * split["params"], split  # both AdamW moments
    assert runs["split"]["pmap"] == runs["split"]["jit"] == {"params": 0, "ema_params": 0, "opt_state": 0}


def test_the_fsdp_rule_splits_the_largest_divisible_axis():
    assert fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
    assert fsdp_spec((3, 3, 64, 6), 4) == P(None, None, "fsdp", None)  # 6 does not divide by 4
    assert fsdp_spec((256, 256), 8) == P("fsdp", None)  # the first of equals
    assert fsdp_spec((512,), 4) == P()  # small: whole on every device
    assert fsdp_spec((3, 3, 33, 35), 4) == P()  # no axis divides
    assert fsdp_spec((3, 3, 64, 128), 1) == P()


def test_training_moved_the_parameters(runs):
    init = create_train_state(CONFIG, jax.random.PRNGKey(0))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), runs["jit"][0].params, host(init.params))
    assert min(jax.tree_util.tree_leaves(moved)) > 0


# A valid other value for each field the step does not read (and `steps`, under the constant schedule).
UNREAD_CHANGED = {"workdir": "elsewhere", "data": "images.npz", "class_conditional": False, "hflip": True,
                  "data_workers": 3, "skip_bad_images": True, "batch_size": 16, "skip_nonfinite": True,
                  "sample_every": 7, "num_samples": 5, "sampling_steps": 9, "guidance_scale": 1.0,
                  "sampler": SamplerConfig("unipc", solver_order=3),
                  "parallel": "fsdp", "mesh": "data=2,fsdp=2", "seed": 11, "save_every": 13, "keep_checkpoints": 1,
                  "log_every": 3,
                  "resume": False, "distributed": True, "coordinator_address": "localhost:1", "num_processes": 2,
                  "process_id": 1, "weight_copy": "on", "steps": 50}


def test_configs_that_differ_only_in_what_the_step_does_not_read_share_one_step():
    """They get one step function (JAX then traces and compiles it once), and that is sound: built
    apart, their steps lower to the same program; a field the step reads (lr) changes it."""
    assert UNREAD_CHANGED.keys() == NOT_READ_BY_THE_STEP | {"steps"}
    other = dataclasses.replace(CONFIG, **UNREAD_CHANGED)
    assert make_train_step(other) is make_train_step(CONFIG)
    faster = dataclasses.replace(CONFIG, lr=2 * CONFIG.lr)
    assert make_train_step(faster) is not make_train_step(CONFIG)

    one = data_mesh(jax.devices()[:1])
    state = jax.eval_shape(lambda: create_train_state(CONFIG, jax.random.PRNGKey(0)))
    batch = jax.eval_shape(lambda: batches(1)[0])

    def program(config):
        step = jit_driver(_make_train_step(config), one)  # built apart, not shared
        return step.lower(state, batch, jax.random.PRNGKey(1)).as_text()

    assert program(other) == program(CONFIG)
    assert program(faster) != program(CONFIG)


def test_global_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the 4 devices; use a multiple of 4"):
        Parallel("jit", functools.partial(make_train_step, CONFIG), 6)


def test_nonfinite_step_leaves_the_state_unchanged():
    parallel = Parallel("jit", functools.partial(make_train_step, CONFIG), 8)
    state = parallel.put_state(host(create_train_state(CONFIG, jax.random.PRNGKey(0))))
    before = host(state.params)
    batch = batches(1)[0]
    batch["image"][0, 0, 0, 0] = np.nan
    state, metrics = parallel.step(state, parallel.put_batch(batch), jax.random.PRNGKey(1))
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 1
    assert int(state.skipped_steps) == 1 and int(state.applied_steps) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(state.params), before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(state.ema_params), before)
    assert optimizer_counts(state) == {0}  # the schedule did not move

    # The next good step is the first applied: the learning rate and EMA warm-up start from zero.
    good = parallel.put_batch(batches(1)[0])
    state, metrics = parallel.step(state, good, jax.random.PRNGKey(1))
    assert int(metrics["nonfinite"]) == 0 and float(metrics["lr"]) == float(learning_rate(CONFIG)(0))
    assert int(state.step) == 2 and int(state.applied_steps) == 1
    assert optimizer_counts(state) == {1}


def optimizer_counts(state) -> set[int]:
    """The step counts optax keeps in the optimiser state (Adam's and the schedule's)."""
    return {int(np.asarray(local_value(leaf))) for path, leaf in
            jax.tree_util.tree_leaves_with_path(state.opt_state) if "count" in jax.tree_util.keystr(path)}


def test_remat_changes_neither_parameters_nor_training():
    """Rematerialising each block leaves the parameters' names and initial values as they are, and,
    with dropout on, recomputes the same forward (same dropout masks): the loss, the gradient norm
    and the parameters after two steps agree."""
    results = []
    for remat in (False, True):
        config = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, remat=remat, dropout=0.3))
        parallel = Parallel("jit", functools.partial(make_train_step, config), config.batch_size)
        init = host(create_train_state(config, jax.random.PRNGKey(0)))
        state = parallel.put_state(init)
        losses = []
        for batch in batches(2):
            state, metrics = parallel.step(state, parallel.put_batch(batch), jax.random.PRNGKey(1))
            losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        results.append((init.params, losses, host(state.params)))
    (plain_init, plain_losses, plain), (remat_init, remat_losses, remat) = results
    assert jax.tree_util.tree_structure(remat_init) == jax.tree_util.tree_structure(plain_init)
    jax.tree_util.tree_map(np.testing.assert_array_equal, remat_init, plain_init)
    np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-5)
    errors = jax.tree_util.tree_map(rel_error, without_key_biases(remat), without_key_biases(plain))
    # 2e-5: a GroupNorm bias's gradient is a sum over the batch and the positions that largely cancels, and
    # summed in another order under remat it differs in its sixth digit, which Adam's first steps (about
    # +-lr each) pass on to the bias (1.0e-5 for one of them, with dropout's masks drawn as they are now).
    assert max(jax.tree_util.tree_leaves(errors)) <= 2e-5


def test_a_bfloat16_step_reads_its_compute_copy_and_computes_what_the_cast_parameters_give():
    """The state's bfloat16 copy of the weights changes what the step reads, not what it computes: from the
    same state, the steps with the copy and without it (the forward pass casting each weight) give the same
    bits, and after each step the copy is the new parameters cast; a skipped step leaves it as it was. Dropout
    on: its masks are drawn alike."""
    config = dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, dtype="bfloat16", dropout=0.2),
                                 weight_copy="on")
    step = jax.jit(_make_train_step(config, axis_name=None))
    with_copy = create_train_state(config, jax.random.PRNGKey(0))
    # 'auto' keeps a copy on a GPU only (train_step.WEIGHT_COPY_ON); 'off' and float32 never.
    for weight_copy, model in (("auto", config.model), ("off", config.model), ("on", CONFIG.model)):
        state = jax.eval_shape(lambda: create_train_state(
            dataclasses.replace(config, model=model, weight_copy=weight_copy), jax.random.PRNGKey(0)))
        keeps = (weight_copy == "on" and model is config.model
                 or weight_copy == "auto" and jax.default_backend() == "gpu")
        assert (state.compute_params is not None) == keeps, (weight_copy, model.dtype)
    kinds = {path[-2:]: leaf.dtype for path, leaf in flax.traverse_util.flatten_dict(with_copy.compute_params).items()}
    assert kinds[("conv1", "kernel")] == kinds[("to_qkv", "bias")] == kinds[("label_embedding", "embedding")] == \
        jnp.bfloat16
    assert kinds[("norm1", "scale")] == kinds[("norm_out", "bias")] == jnp.float32
    casting = with_copy.replace(compute_params=None)
    for batch in batches(3):
        with_copy, copy_metrics = step(with_copy, batch, jax.random.PRNGKey(1))
        casting, casting_metrics = step(casting, batch, jax.random.PRNGKey(1))
        assert float(copy_metrics["loss"]) == float(casting_metrics["loss"])
        assert float(copy_metrics["grad_norm"]) == float(casting_metrics["grad_norm"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, with_copy.compute_params,
                               compute_dtype_params(with_copy.params, jnp.bfloat16))
    assert casting.compute_params is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, with_copy.replace(compute_params=None), casting)
    # A skipped step (a non-finite loss) keeps the copy as it keeps the parameters.
    bad = batches(1)[0]
    bad["image"][0, 0, 0, 0] = np.nan
    skipped, metrics = step(with_copy, bad, jax.random.PRNGKey(1))
    assert int(metrics["nonfinite"]) == 1 and int(skipped.skipped_steps) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           skipped.replace(step=with_copy.step, skipped_steps=with_copy.skipped_steps), with_copy)


@pytest.mark.parametrize("scale", [0.5, 50.0], ids=["under the limit", "clipped"])
def test_the_drivers_global_norm_and_clipping_are_optaxs(scale):
    """partial_sums_norm (each leaf summed over all but its last axis, then all at once) equals optax.tree.norm
    on a U-Net's gradient-shaped tree, kernels of 2 and 4 axes and biases, and clip_by_global_norm with it
    clips as optax's does."""
    params = param_shapes(dataclasses.replace(TINY, base_channels=64, num_groups=8))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    grads = treedef.unflatten([scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    assert {leaf.ndim for leaf in leaves} == {1, 2, 4}
    np.testing.assert_allclose(jax.jit(partial_sums_norm)(grads), optax.tree.norm(grads), rtol=1e-6)
    ours, _ = jax.jit(clip_by_global_norm(1000.0, partial_sums_norm).update)(grads, optax.EmptyState())
    optaxs, _ = optax.clip_by_global_norm(1000.0).update(grads, optax.EmptyState())
    assert (optax.tree.norm(grads) > 1000.0) == (scale > 1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, optaxs)


def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step():
    cosine = learning_rate(dataclasses.replace(CONFIG, lr_schedule="cosine", lr=0.2, warmup_steps=10,
                                                        steps=110))
    constant = learning_rate(dataclasses.replace(CONFIG, lr=0.2, warmup_steps=10, steps=110))
    for schedule in (cosine, constant):
        np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose([cosine(60), cosine(110)], [0.1, 0.0], rtol=1e-6, atol=1e-9)  # cos(pi/2), cos(pi)
    np.testing.assert_allclose([constant(60), constant(110)], [0.2, 0.2], rtol=1e-6)


def test_weight_decay_leaves_biases_norms_and_embeddings_alone():
    config = dataclasses.replace(CONFIG, weight_decay=0.5, grad_clip=0.0, warmup_steps=0, lr=0.1)
    params = create_train_state(config, jax.random.PRNGKey(0)).params
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx = make_optimizer(config)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = getattr(path[-1], "key", None)
        if name == "kernel":  # decayed: lr * wd * param
            np.testing.assert_allclose(update, -0.1 * 0.5 * params_at(params, path), rtol=1e-6)
        else:
            assert name in ("bias", "scale", "embedding"), jax.tree_util.keystr(path)
            assert not np.any(update), jax.tree_util.keystr(path)


def params_at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_fifty_adam_steps_match_pytorch():
    """Same converted initial weights, same batches, same t and noise: losses agree at every step
    to 1e-4 relative, and the final parameters to 1e-4 (relative to each tensor's largest entry)."""
    config = dataclasses.replace(TINY, num_classes=4)
    model = UNet(config)
    torch_model = ref.UNet(config)
    params = init_params(config, jax.random.PRNGKey(3))
    ref.load_numpy_state_dict(torch_model, flax_to_torch(params))

    schedule = diffusion.make_schedule("linear", 1000)
    abar = ref.alphas_cumprod("linear", 1000)
    lr = 1e-3
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    torch_opt = torch.optim.Adam(torch_model.parameters(), lr=lr)

    @jax.jit
    def flax_step(params, opt_state, x0, t, noise, y):
        def loss_fn(p):
            return diffusion.diffusion_loss(lambda x, t: model.apply({"params": p}, x, t, y), schedule, x0, t, noise)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for step in range(50):
        x0 = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
        noise = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
        t = rng.integers(0, 1000, 3)
        y = rng.integers(0, 5, 3)  # the null label (4) included
        params, opt_state, loss = flax_step(params, opt_state, x0, t, noise, y)

        torch_opt.zero_grad()
        torch_loss = ref.diffusion_loss(torch_model, abar, torch.from_numpy(x0.transpose(0, 3, 1, 2)),
                                        torch.from_numpy(t), torch.from_numpy(noise.transpose(0, 3, 1, 2)),
                                        torch.from_numpy(y))
        torch_loss.backward()
        torch_opt.step()
        assert abs(float(loss) - torch_loss.item()) <= 1e-4 * abs(torch_loss.item()), step

    expected = torch_to_flax(torch_model.state_dict())
    errors = jax.tree_util.tree_map(rel_error, without_key_biases(params), without_key_biases(expected))
    assert max(jax.tree_util.tree_leaves(errors)) <= 1e-4
    # The key biases (see without_key_biases) may differ; what the models compute may not.
    x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    t, y = np.array([5, 500, 995]), np.array([0, 3, 4])
    with torch.no_grad():
        torch_out = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y))
    assert rel_error(jax.jit(model.apply)({"params": params}, x, t, y), torch_out.numpy().transpose(0, 2, 3, 1)) <= 1e-4


@pytest.mark.parametrize("sampler", [SamplerConfig("ddim"), SamplerConfig("dpm_solver",
                                                                          algorithm_type="sde-dpmsolver++")],
                         ids=["ddim", "sde-dpm-solver"])
def test_sampling_spread_over_devices_gives_the_same_images(sampler, monkeypatch):
    from unet_flax import sampling
    params = create_train_state(CONFIG, jax.random.PRNGKey(0)).params
    how = sampling.SamplingConfig(num_samples=8, labels=(0, 1, 2), sampler=sampler, sampling_steps=3,
                                  guidance_scale=1.5, batch_size=8)
    spread = sampling.sample(params, CONFIG, how)
    monkeypatch.setattr(sampling.jax, "local_device_count", lambda: 1)
    single = sampling.sample(params, CONFIG, how)
    assert spread.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    np.testing.assert_array_equal(spread.images, single.images)
