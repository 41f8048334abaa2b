"""The training loop: `train(config)` runs a TrainConfig in its workdir and returns a summary.

    from unet_flax.config import PRESETS
    from unet_flax.train_loop import train
    summary = train(PRESETS["digits"], workdir="runs/my_digits")

A workdir that holds checkpoints is resumed from its newest one that restores (the config must
agree with the one saved there in its FIXED fields; unet_flax.checkpoint decides which restores); the
data decides the model's channels and classes. The loop's own parts: the device feed that reads batches
ahead and the metrics (metrics.jsonl, TensorBoard); stopping together (SIGTERM, a failed or lost peer)
is unet_flax.job's. `python train.py` is this function behind a command line (unet_flax/scripts/train.py).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import input_pipeline, job
from .checkpoint import Checkpoints, abstract_checkpoint, last_complete_step, restore_newest_good
from .config import SamplingConfig, TrainConfig, fit_to_data
from .errors import DataError, TrainingError
from .parallel import Batch, Parallel, local_value
from .samplers import make_plan
from .sampling import sample
from .train_step import create_train_state, from_saved_form, initial_keys, make_train_step, saved_form
from .visualize import save_grid, save_loss_curve


def sample_grid(config: TrainConfig, ema_params, path: Path) -> None:
    """A grid of EMA samples: one row per class (guided) for class-conditional models."""
    samples = sample(ema_params, config, SamplingConfig.during_training(config))
    save_grid(samples.images, path, samples.columns)


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch where PyTorch is not imported yet.
    tensorboardX imports PyTorch where it is installed, only to accept its tensors: a second or more
    of every start of train.py (and CUDA's libraries on a GPU machine) for scalars that are floats."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl and TensorBoard event files in the workdir, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.writer = summary_writer_class()(str(workdir / "tensorboard"))
            self._end_partial_line()

    def _end_partial_line(self) -> None:
        """A run killed mid-write (or a full disk) can leave a partial last line: end it, so the next
        row starts a line of its own (history() skips the partial one)."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

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
        rows = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                row = None
                print(f"warning: {self.path} line {number} is not a whole JSON row (an interrupted write?); "
                      f"skipped", file=sys.stderr)
            if isinstance(row, dict) and "step" in row and "loss" in row:
                rows.append(row)
        latest = {row["step"]: row["loss"] for row in rows}  # a resumed run may rewrite a step
        steps = sorted(latest)
        return steps, [latest[s] for s in steps]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsAccumulator:
    """The step metrics of one log interval, summed on the device so the loop never waits for the host."""

    def __init__(self):
        self.first_nonfinite = jnp.full((), -1, jnp.int32)  # this run's first non-finite step, -1: none
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.start, self.last = jnp.zeros(()), 0, time.time(), None

    def add(self, step: int, metrics: dict) -> None:
        self.loss_sum = self.loss_sum + metrics["loss"]
        self.first_nonfinite = jnp.where((self.first_nonfinite < 0) & (metrics["nonfinite"] > 0), step,
                                         self.first_nonfinite)
        self.steps, self.last = self.steps + 1, metrics

    def read(self, batch_size: int) -> dict[str, float]:
        """Host values of the interval (mean loss, the last step's other metrics, img/s), then reset."""
        values = {k: float(v) for k, v in jax.device_get(self.last).items() if k != "nonfinite"}
        values["loss"] = float(self.loss_sum) / self.steps
        values["img_per_s"] = self.steps * batch_size / (time.time() - self.start)
        self.reset()
        return values


class DeviceFeed:
    """Batches on their way to the devices ahead of the step that needs them, so that reading, decoding
    and the transfer of the next batches overlap the current step. Its state, saved with checkpoints,
    is the number of batches consumed (and the unreadable images passed over so far)."""

    def __init__(self, dataset, workers: int, parallel: Parallel, state: dict, depth: int = 2):
        self.consumed = int(state.get("next_index", 0))
        self.bad_images = int(state.get("bad_images", 0))
        self.batches = input_pipeline.batches_from(dataset, self.consumed, workers)
        self.parallel, self.depth = parallel, depth
        self.in_flight = collections.deque()
        self.error = None  # a DataError met while reading ahead: raised when its batch is due, not before

    def __next__(self):
        self._read_ahead()
        batch, bad = self.in_flight.popleft()
        self.consumed, self.bad_images = self.consumed + 1, self.bad_images + bad
        return batch

    def peek(self) -> Batch:
        """The next batch, left to be consumed."""
        self._read_ahead()
        return self.in_flight[0][0]

    def _read_ahead(self) -> None:
        while len(self.in_flight) < self.depth and self.error is None:
            try:
                batch = next(self.batches)
            except DataError as error:
                self.error = error
                break
            bad = int(batch.pop("bad_images"))
            self.in_flight.append((self.parallel.put_batch(batch), bad))
        if not self.in_flight:
            raise self.error

    def state(self) -> dict:
        return {"next_index": self.consumed, "bad_images": self.bad_images}

    def close(self) -> None:
        close = getattr(self.batches, "close", None)  # grain's worker processes, when there are any
        if close is not None:
            close()


def prepare_workdir(config: TrainConfig) -> Path:
    workdir = Path(config.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"cannot create workdir {workdir}: {error.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise TrainingError(f"workdir {workdir} is not writable")
    return workdir


def restore_or_init(checkpoints: Checkpoints, config: TrainConfig, parallel: Parallel
                    ) -> tuple[int | None, dict, dict | None]:
    """(the step resumed from or None, {'train_state', 'rng'}, the data iterator's state or None)."""
    init_key, step_rng = initial_keys(config.seed)
    if checkpoints.latest_step() is None:
        set_aside = sorted(p.name for p in checkpoints.directory.glob("*.damaged*"))
        if set_aside:  # a run requeued after every checkpoint was set aside must not begin again at step 0
            raise TrainingError(f"{checkpoints.directory} holds only checkpoints set aside as damaged "
                                f"({', '.join(set_aside)}); to start afresh, move {checkpoints.directory} away "
                                f"or use another --workdir")
        return None, {"train_state": create_train_state(config, init_key), "rng": step_rng}, None
    if not config.resume:
        raise TrainingError(f"{config.workdir} holds checkpoints up to step {checkpoints.latest_step()} and "
                            f"--no-resume was given: use another --workdir (nothing was changed)")
    abstract = abstract_checkpoint(config, parallel.sharding_of)
    step, saved, data_state = restore_newest_good(checkpoints, config, abstract)
    state = from_saved_form(saved["train_state"], config)
    if step == 0:  # imported weights, no step taken: this run's seed and data, from their start
        return step, {"train_state": state, "rng": step_rng}, None
    return step, {**saved, "train_state": state}, data_state


def train(config: TrainConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """Train `config` in `workdir` (default: config.workdir) up to config.steps, resuming from the
    workdir's checkpoints; the summary: step, loss, workdir, resumed_from, samples, img_per_s, wall_s.

    The user's mistakes raise ConfigError (a bad value or combination), DataError
    (unreadable data), TrainingError (a run that cannot go on) and errors.SaveError (a refused
    write), each naming what to fix."""
    start = time.time()
    if workdir is not None:
        config = dataclasses.replace(config, workdir=str(workdir))
    if config.distributed and not jax.distributed.is_initialized():
        job.join_job(config.coordinator_address, config.num_processes, config.process_id)
    if jax.process_count() == 1:
        return _run(config, start)
    peers = job.PeerFailures(functools.partial(last_complete_step, config.workdir))
    try:
        summary = _run(config, start)
    except BaseException as error:
        peers.announce(error)
        raise
    peers.close()
    return summary


def _run(config: TrainConfig, start: float) -> dict[str, Any]:
    # Set-up: the data, the config it completes, the devices, the workdir.
    data = input_pipeline.load(config.data, config.model.image_size, config.skip_bad_images)
    config = fit_to_data(config, data.channels, data.num_classes, data.source)
    # A sampler that cannot take the grids' steps is refused now, not after the training.
    make_plan(config.sampler, config.sampling_steps, config.noise_schedule, config.timesteps, config.prediction)
    parallel = Parallel(config.parallel, functools.partial(make_train_step, config), config.batch_size,
                        config.mesh)  # before the workdir: a mesh or batch the devices cannot take is refused first
    workdir = prepare_workdir(config)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)

    resumed_from, saved, data_state = restore_or_init(checkpoints, config, parallel)
    summary = {"step": resumed_from or 0, "loss": None, "workdir": str(workdir), "resumed_from": resumed_from}
    if resumed_from is not None and config.steps <= resumed_from:
        checkpoints.close()
        print(f"{workdir} is already at step {resumed_from} >= --steps {config.steps}: nothing to train, "
              f"nothing overwritten", file=sys.stderr)
        return {**summary, "wall_s": round(time.time() - start, 2)}
    state = parallel.put_state(saved["train_state"])
    rng = jnp.asarray(local_value(saved["rng"]))
    dataset = input_pipeline.make_dataset(data, config.batch_size, config.seed, config.hflip,
                                          jax.process_index(), jax.process_count())
    workers = input_pipeline.default_workers(data) if config.data_workers is None else config.data_workers
    feed = DeviceFeed(dataset, workers, parallel, data_state or {})

    state, summary["step"], stopped, last_logged = train_steps(config, workdir, checkpoints, parallel, feed, state,
                                                               rng, resumed_from or 0)
    ema_params = parallel.host_state(state.ema_params)  # every process: FSDP gathers
    if jax.process_index() == 0:
        summary.update(finish(config, workdir, ema_params, stopped))
    summary["loss"] = last_logged.get("loss")
    summary["img_per_s"] = round(last_logged["img_per_s"], 1) if "img_per_s" in last_logged else None
    summary["wall_s"] = round(time.time() - start, 2)
    return summary


def train_steps(config: TrainConfig, workdir: Path, checkpoints: Checkpoints, parallel: Parallel,
                feed: DeviceFeed, state, rng: jax.Array, first_step: int) -> tuple[Any, int, bool, dict]:
    """Steps first_step + 1 .. config.steps, or until SIGTERM: logging every log_every steps, saving every
    save_every and at the end, sampling every sample_every. (state, last step, whether SIGTERM stopped
    it, the last logged values)."""
    is_main = jax.process_index() == 0

    def save(step: int) -> None:
        canonical = {"train_state": parallel.canonical_state(saved_form(state)),
                     "rng": parallel.to_saved(np.asarray(rng))}
        checkpoints.save(step, canonical, feed.state(), config.to_dict())

    stop, metrics, log = job.StopSignal(), MetricsAccumulator(), MetricsLog(workdir, is_main)
    progress = tqdm(total=config.steps, initial=first_step, disable=not is_main, unit="step", dynamic_ncols=True)
    step, stopping, values = first_step, False, {}
    try:
        state = parallel.compile(state, feed.peek(), rng)
        job.wait_for_all("train-step-compiled")
        for step in range(first_step + 1, config.steps + 1):
            state, step_metrics = parallel.step(state, next(feed), rng)
            metrics.add(step, step_metrics)
            stopping = stop.reached(step)
            saving = (config.save_every and step % config.save_every == 0) or step == config.steps or stopping
            if step % config.log_every == 0 or saving:
                check_finite(config, metrics, checkpoints)
                steps_in_interval = metrics.steps
                values = metrics.read(config.batch_size)
                values["nonfinite_total"] = int(parallel.host_state(state.skipped_steps))
                if config.skip_bad_images:
                    values["bad_images_total"] = feed.bad_images
                log.write(step, values)
                progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
                progress.update(steps_in_interval)
            if saving:
                save(step)
            if config.sample_every and step % config.sample_every == 0 and step != config.steps:
                ema_params = parallel.host_state(state.ema_params)  # every process: FSDP gathers
                if is_main:
                    sample_grid(config, ema_params, workdir / f"samples_{step:07d}.png")
            if stopping:
                print(f"SIGTERM: saved step {step}, stopping", file=sys.stderr)
                break
        checkpoints.wait()
    except BaseException:
        # Not the checkpoints of several processes: their writes wait for processes that may be gone.
        close_all(stop, feed, progress, log, *([checkpoints] if jax.process_count() == 1 else []), quietly=True)
        raise
    close_all(stop, feed, progress, log, checkpoints)
    return state, step, stopping, values


def finish(config: TrainConfig, workdir: Path, ema_params, stopped: bool) -> dict[str, str]:
    """The run's last sample grid (not after SIGTERM: the machine is going) and its loss curve."""
    save_loss_curve(*MetricsLog(workdir, enabled=False).history(), workdir / "loss.png")
    if stopped:
        return {}
    sample_grid(config, ema_params, workdir / "samples.png")
    return {"samples": str(workdir / "samples.png")}


def close_all(*parts, quietly: bool = False) -> None:
    """Close each part; `quietly` after an error, so that what went wrong first is what is reported
    (on a full disk every writer fails again while closing)."""
    for part in parts:
        if quietly:
            with contextlib.suppress(Exception):
                part.close()
        else:
            part.close()


def check_finite(config: TrainConfig, metrics: MetricsAccumulator, checkpoints: Checkpoints) -> None:
    """Stop at the first non-finite step, before anything is saved, unless --skip-nonfinite."""
    first_bad = int(metrics.first_nonfinite)
    if first_bad >= 0 and not config.skip_nonfinite:
        last_good = checkpoints.latest_step()
        raise TrainingError(
            f"non-finite loss or gradient at step {first_bad}; stopped without saving, "
            + ("no checkpoint was written yet" if last_good is None
               else f"the last good checkpoint is step {last_good}")
            + " (--skip-nonfinite skips such steps instead)")
