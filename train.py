"""Train the diffusion U-Net.

    python train.py                          # the digits demo on this machine's devices
    python train.py --preset cifar10 --data /path/to/cifar-10-batches-py --parallel jit

Every field of the config is a flag (`python train.py --help`). A workdir that holds checkpoints
is resumed from its latest one. The last line printed is a JSON summary of the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from unet_flax import input_pipeline, training
from unet_flax.checkpoint import Checkpoints, abstract_checkpoint, incompatible_fields
from unet_flax.cli import run_command, use_xla_cpu_convolutions
from unet_flax.configs import TrainConfig, build_parser, config_from_args
from unet_flax.sampling import generate
from unet_flax.visualize import save_grid, save_loss_curve


class UsageError(ValueError):
    """A bad flag or config value: exit code 2."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable workdir): exit code 1."""


def resolve_config(args, data: input_pipeline.ImageData, config: TrainConfig) -> TrainConfig:
    """Fill in what the data and the backend decide: channels, classes, and the default dtype."""
    model = dataclasses.replace(config.model, in_channels=data.channels,
                                num_classes=data.num_classes if config.class_conditional else None)
    if "dtype" not in vars(args) and jax.default_backend() != "cpu":
        model = dataclasses.replace(model, dtype="bfloat16")  # float32 params, bf16 compute on GPU/TPU
    if config.class_conditional and data.num_classes is None:
        raise UsageError(f"--class-conditional needs labels, and {data.source} has none")
    return dataclasses.replace(config, model=model)


def sample_grid(config: TrainConfig, ema_params, path: Path) -> None:
    """A grid of EMA samples: one row per class (guided) for class-conditional models."""
    m = config.model
    labels, columns = None, None
    if m.num_classes is not None:
        per_class = max(1, config.num_samples // m.num_classes)
        labels = jnp.repeat(jnp.arange(m.num_classes, dtype=jnp.int32), per_class)
        columns = per_class
    count = config.num_samples if labels is None else labels.shape[0]
    images = generate(ema_params, jax.random.PRNGKey(config.seed + 1), labels, model_config=m,
                      shape=(count, m.image_size, m.image_size, m.in_channels), num_steps=config.sampling_steps,
                      guidance_scale=config.guidance_scale, schedule_name=config.noise_schedule,
                      timesteps=config.timesteps, prediction=config.prediction)
    save_grid(input_pipeline.to_uint8(images), path, columns)


class MetricsLog:
    """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def history(self) -> tuple[list[int], list[float]]:
        if not self.path.exists():
            return [], []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        latest = {row["step"]: row["loss"] for row in rows}  # a resumed run may rewrite a step
        steps = sorted(latest)
        return steps, [latest[s] for s in steps]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def restore_newest_good(checkpoints: Checkpoints, config: TrainConfig, abstract) -> tuple[int, dict, dict]:
    """(step, state, data state) of the newest checkpoint that restores. One that does not is renamed
    N.damaged, kept, and named in a warning; if none restores, the run stops rather than start over."""
    for step in reversed(checkpoints.all_steps()):
        try:
            saved_config = checkpoints.read_config(step)
        except Exception as error:  # unreadable: damaged, whatever the library raised
            damaged = error
        else:
            differing = incompatible_fields(saved_config, config.to_dict())
            if differing:
                raise UsageError(f"cannot resume {config.workdir} (step {step}): the config differs in "
                                 f"{', '.join(differing)}")
            try:
                saved, data_state = checkpoints.restore(step, abstract)
                return step, saved, data_state
            except Exception as error:
                damaged = error
        kept = checkpoints.set_aside(step)
        print(f"warning: checkpoint step {step} is damaged ({type(damaged).__name__}: "
              f"{str(damaged).splitlines()[0][:200]}); kept as {kept}, trying the previous one", file=sys.stderr)
    raise TrainingError(f"no checkpoint in {checkpoints.directory} could be restored (the damaged ones are kept "
                        f"as *.damaged); move them away to start afresh")


def train(args) -> dict:
    start = time.time()
    config = config_from_args(args)
    if config.distributed:
        # Collectives between CPU processes need gloo; GPU and TPU bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    data = input_pipeline.load(config.data, config.model.image_size)
    config = resolve_config(args, data, config)
    is_main = jax.process_index() == 0
    workdir = Path(config.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"cannot create workdir {workdir}: {error.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise TrainingError(f"workdir {workdir} is not writable")

    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    latest = checkpoints.latest_step()
    summary = {"step": latest or 0, "loss": None, "workdir": str(workdir), "resumed_from": None}
    if latest is not None and not config.resume:
        raise TrainingError(f"{workdir} holds checkpoints up to step {latest} and --no-resume was given: "
                            f"use another --workdir (nothing was changed)")

    parallel = training.Parallel(config.parallel, training.make_train_step(config), config.batch_size)
    restored = None
    if latest is not None:
        restored = restore_newest_good(checkpoints, config, abstract_checkpoint(config, parallel.replicated))
    if restored is None:
        init_key, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
        saved = {"train_state": training.create_train_state(config, init_key), "rng": step_rng}
        data_state = None
    else:
        latest, saved, data_state = restored
        summary["step"] = latest
        if config.steps <= latest:
            print(f"{workdir} is already at step {latest} >= --steps {config.steps}: nothing to train, "
                  f"nothing overwritten", file=sys.stderr)
            return {**summary, "wall_s": round(time.time() - start, 2)}
        summary["resumed_from"] = latest
    state = parallel.put_state(saved["train_state"])
    rng = jnp.asarray(training.local_value(saved["rng"]))

    dataset = input_pipeline.make_dataset(data, config.batch_size, config.seed, config.hflip,
                                          jax.process_index(), jax.process_count())
    batches = iter(dataset.to_iter_dataset())
    if data_state is not None:
        batches.set_state(data_state)

    def save(step: int) -> None:
        canonical = {"train_state": parallel.canonical_state(state), "rng": parallel.replicate(np.asarray(rng))}
        checkpoints.save(step, canonical, batches.get_state(), config.to_dict())

    def ema_params():
        return parallel.host_state(state.ema_params)

    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))

    log = MetricsLog(workdir, is_main)
    first_step = latest or 0
    progress = _progress(first_step, config.steps, is_main)
    loss_sum = jnp.zeros(())
    first_bad = jnp.full((), -1, jnp.int32)
    nonfinite = jnp.zeros((), jnp.int32)
    interval_start, interval_steps, step, img_per_s = time.time(), 0, first_step, None
    try:
        for step in range(first_step + 1, config.steps + 1):
            state, metrics = parallel.step(state, parallel.put_batch(next(batches)), rng)
            loss_sum = loss_sum + metrics["loss"]
            nonfinite = nonfinite + metrics["nonfinite"]
            first_bad = jnp.where((first_bad < 0) & (metrics["nonfinite"] > 0), step, first_bad)
            interval_steps += 1
            boundary = step % config.log_every == 0 or step == config.steps or stop_requested
            saving = (config.save_every and step % config.save_every == 0) or step == config.steps or stop_requested
            if boundary or saving:
                if int(first_bad) >= 0 and not config.skip_nonfinite:
                    last_good = checkpoints.latest_step()
                    raise TrainingError(
                        f"non-finite loss or gradient at step {int(first_bad)}; stopped without saving, "
                        + ("no checkpoint was written yet" if last_good is None
                           else f"the last good checkpoint is step {last_good}")
                        + " (--skip-nonfinite skips such steps instead)")
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.time() - interval_start
                img_per_s = interval_steps * config.batch_size / elapsed
                host["loss"] = float(loss_sum) / interval_steps
                host.update(img_per_s=img_per_s, nonfinite_total=int(nonfinite))
                del host["nonfinite"]
                log.write(step, host)
                progress.set_postfix(loss=f"{host['loss']:.4f}", img_s=f"{img_per_s:.0f}")
                progress.update(interval_steps)
                summary["loss"] = host["loss"]
                loss_sum, interval_steps, interval_start = jnp.zeros(()), 0, time.time()
            if saving:
                save(step)
            if config.sample_every and step % config.sample_every == 0 and step != config.steps and is_main:
                sample_grid(config, ema_params(), workdir / f"samples_{step:07d}.png")
            if stop_requested:
                print(f"SIGTERM: saved step {step}, stopping", file=sys.stderr)
                break
        checkpoints.wait()
    finally:
        progress.close()
        log.close()
        checkpoints.close()

    summary["step"] = step
    if is_main:
        samples = workdir / "samples.png"
        if not stop_requested:
            sample_grid(config, ema_params(), samples)
            summary["samples"] = str(samples)
        save_loss_curve(*log.history(), workdir / "loss.png")
    summary["img_per_s"] = None if img_per_s is None else round(img_per_s, 1)
    summary["wall_s"] = round(time.time() - start, 2)
    return summary


def _progress(initial: int, total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    use_xla_cpu_convolutions()
    cache = os.environ.get("UNET_FLAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "unet_flax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)  # a second run does not compile again
    return run_command(train, args, (TrainingError, input_pipeline.DataError))


if __name__ == "__main__":
    sys.exit(main())
