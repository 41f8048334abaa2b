"""Checkpoints with orbax: the train state and RNG, the data iterator's position, and the config.

Saved asynchronously every `save_every` steps and at the end; the last `keep` are kept. Every
process calls save (orbax writes replicated arrays once); a step directory appears only once its
write is complete, so an interrupted save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from . import job
from .config import TrainConfig, UNetConfig
from .config.fields import FIXED, fields_resumed
from .errors import ConfigError, SaveError, TrainingError
from .train_step import create_train_state, initial_keys, saved_form, train_state_from_params


def checkpoint_directory(workdir: str | Path) -> Path:
    """Where a workdir's checkpoints are."""
    return Path(workdir).absolute() / "checkpoints"


class Checkpoints:
    def __init__(self, workdir: str | Path, keep: int = 3, read_only: bool = False):
        self.directory = checkpoint_directory(workdir)
        background_read_errors.log_to(self.directory.parent / RESTORE_LOG)
        # Read-only: orbax warns of each option that read-only mode turns off, nothing to act on.
        with _absl_errors_only(read_only):
            # cleanup_tmp_directories: the partial writes of a run killed mid-save, removed at start.
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                                   enable_async_checkpointing=not read_only,
                                                   cleanup_tmp_directories=not read_only)
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts writing `step` in the background; a failed earlier write surfaces here or in wait()."""
        with self._writing():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config)), force=True)

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """The state (placed as `abstract_state`'s shardings say) and the data iterator's state."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def read_weights(self, step: int, which: str, sharding: jax.sharding.Sharding) -> Any:
        """One parameter tree of the train state (`which`: 'params' or 'ema_params'), placed by `sharding`,
        and nothing else read: its shapes come from the checkpoint's own metadata, so no model or
        optimiser is built, and a checkpoint of any optimiser or layout reads."""
        with _absl_errors_only():  # orbax's notes on metadata that older checkpoints do not hold
            saved = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state")
        saved = getattr(saved, "item_metadata", saved)
        target = {"train_state": {which: jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved["train_state"][which])}}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        return restored["state"]["train_state"][which]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def set_aside(self, step: int) -> Path:
        """Rename a damaged step directory out of orbax's sight (kept for inspection, never deleted).
        The primary process renames it; every other process waits for that, then looks again."""
        target = self.directory / f"{step}.damaged"
        suffix = 1
        while target.exists():
            target, suffix = self.directory / f"{step}.damaged{suffix}", suffix + 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        job.wait_for_all(f"set-aside-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self.manager.close()

    @contextlib.contextmanager
    def _writing(self):
        """A write the machine refused (disk full, quota, read-only, permissions, memory) as a SaveError
        naming the folder; orbax writes each step into a temporary folder first, so the checkpoints
        before it are intact. Anything else keeps its traceback."""
        try:
            yield
        except Exception as error:
            reason = transient_cause(error)
            if reason is None:
                raise
            # Writes run in the background: the error may be an earlier step's, surfacing now, and
            # others may still be finishing.
            with contextlib.suppress(Exception):
                self.manager.wait_until_finished()
            complete = complete_steps(self.directory)
            raise SaveError(f"writing a checkpoint in {self.directory} failed ({reason}); the complete ones are "
                            f"intact (steps: {', '.join(map(str, complete)) or 'none'})") from error


def refuse_used_workdir(workdir: str | Path) -> None:
    """FileExistsError where `workdir` already holds checkpoints (an import must not mix with a run)."""
    directory = checkpoint_directory(workdir)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{workdir} already holds checkpoints; import into a new --workdir")


def write_initial_checkpoint(config: TrainConfig, params: Any) -> dict:
    """Step 0 of `config.workdir`: these weights as params and EMA, a fresh optimiser, the seed's step key;
    what train.py resumes and sample.py reads. A summary: workdir, step, parameter count."""
    state = train_state_from_params(config, jax.tree_util.tree_map(np.asarray, params))
    _, step_rng = initial_keys(config.seed)
    checkpoints = Checkpoints(config.workdir)
    try:
        checkpoints.save(0, {"train_state": saved_form(state), "rng": step_rng}, {"next_index": 0}, config.to_dict())
        checkpoints.wait()
    finally:
        checkpoints.close()
    return {"workdir": config.workdir, "step": 0,
            "parameters": int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))}


def complete_steps(directory: Path) -> list[int]:
    """The steps whose checkpoint was written completely (orbax renames a step's folder into place
    once its write is done), read from the folder alone: no orbax, so any thread may ask."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def last_complete_step(workdir: str | Path) -> int | None:
    """The newest step of the workdir's complete checkpoints (see complete_steps); None: none, or unreadable."""
    with contextlib.suppress(OSError):  # the workdir's disk may be what failed
        return (complete_steps(checkpoint_directory(workdir)) or [None])[-1]
    return None


RESTORE_LOG = "restore_errors.log"


class BackgroundReadErrors:
    """Where the errors of a failed restore's reads go: the workdir's restore_errors.log, not the terminal.

    Orbax reads a checkpoint's arrays concurrently. When one read fails, the restore raises at once; the
    reads still in flight then fail in TensorStore's threads (their event loop is closed) and in the
    coroutines garbage-collected later, each printed as a traceback with TensorStore's whole spec:
    thousands of lines for one damaged checkpoint, some long after the warning that names it. Python
    reports both through sys.unraisablehook and asyncio's logger, which this diverts; any other
    unraisable error is printed as before."""

    def __init__(self):
        self.path: Path | None = None

    def log_to(self, path: Path) -> None:
        if self.path is None:
            self.previous_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            logging.getLogger("asyncio").addFilter(self._asyncio_record)
            # The read coroutines that never ran, garbage-collected: the same failure, already logged.
            warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was never awaited",
                                    RuntimeWarning)
        self.path = path

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError):  # a read-only workdir: dropped, as the terminal would drop it
            with open(self.path, "a") as log:
                log.write(text)

    def _unraisable(self, unraisable) -> None:
        if not _from_a_read(unraisable.exc_value, unraisable.object):
            self.previous_hook(unraisable)
            return
        self.write(f"{unraisable.err_msg or 'Exception ignored'}: {unraisable.object!r}\n" + "".join(
            traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))

    def _asyncio_record(self, record: logging.LogRecord) -> bool:
        """False (not for the terminal) for asyncio's 'exception was never retrieved' of a read."""
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not _from_a_read(error, None):
            return True
        self.write(record.getMessage() + "\n" + "".join(traceback.format_exception(*record.exc_info)))
        return False


def _from_a_read(error: BaseException | None, source: Any) -> bool:
    """Whether an unraisable error comes from orbax's reads: a TensorStore callback into a closed event
    loop, a read coroutine (or its error) from orbax's serialization, or TensorStore's own error."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    if error is not None and any(mark in str(error).lower() for mark in ("tensorstore", "ocdbt", '"zarr" driver')):
        return True
    code = getattr(source, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return any("orbax" in frame.filename and "serialization" in frame.filename for frame in frames)


background_read_errors = BackgroundReadErrors()


# What the machine, not a checkpoint's own files, can make fail: memory, permissions, space, time.
# `errno`s for Python's errors; the texts for the errors tensorstore and XLA raise as ValueError.
TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM, errno.EMFILE,
                    errno.ENFILE, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR, errno.EIO, errno.EFBIG}
TRANSIENT_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                      "File too large", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                      "UNAVAILABLE", "CANCELLED", "out of memory", "Out of memory")


def transient_cause(error: BaseException) -> str | None:
    """What the machine said, where `error` (or one it was raised from) failed for want of memory,
    permission, space or time; None where nothing says so."""
    seen = error
    while seen is not None:
        if isinstance(seen, (MemoryError, TimeoutError, KeyboardInterrupt)):
            return type(seen).__name__
        if isinstance(seen, OSError) and seen.errno in TRANSIENT_ERRNOS:
            return f"{seen.strerror}: {seen.filename}" if seen.filename else seen.strerror
        found = next((message for message in TRANSIENT_MESSAGES if message in str(seen)), None)
        if found:
            return found
        seen = seen.__cause__ or seen.__context__
    return None


def is_damage(error: BaseException) -> bool:
    """Whether restoring failed on the checkpoint's own files (missing, truncated, inconsistent), rather
    than on this machine's state at the moment (memory, permissions, disk space, a timeout)."""
    return transient_cause(error) is None


def damage_description(error: BaseException) -> str:
    """What a damaged checkpoint could not give, in words: the array's path in the saved state where
    TensorStore names it (`cannot read opt_state.1.0.mu.conv_in.kernel (DATA_LOSS)`), else the error's
    first line without TensorStore's spec."""
    seen = error
    while seen is not None:
        array = re.search(r'Error reading "(?:train_state\.)?([^"/]+)', str(seen))
        if array:
            status = re.search(r"\b([A-Z][A-Z_]{3,}): ", str(seen))
            return f"cannot read {array.group(1)}" + (f" ({status.group(1)})" if status else "")
        seen = seen.__cause__ or seen.__context__
    first_line = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


# -- the resume policy: which checkpoint restores, damage set aside ------------------------------

def try_restore(checkpoints: Checkpoints, step: int, config: TrainConfig, abstract) -> tuple[str, object]:
    """('ok', (state, data state)), ('damaged', error) or ('error', error) for one checkpoint."""
    try:
        saved = checkpoints.read_config(step)
        differing = incompatible_fields(saved, config.to_dict(), trained=step > 0)
        if differing:
            raise ConfigError(f"cannot resume {config.workdir} (step {step}): the config differs in "
                             f"{', '.join(differing)}")
        return "ok", checkpoints.restore(step, abstract)
    except ConfigError:
        raise
    except Exception as error:
        return ("damaged" if is_damage(error) else "error"), error


OUTCOMES = ("ok", "damaged", "error")


def agreed_outcome(step: int, outcome: str) -> str:
    """Every process's outcome, reduced to one they all act on: any error stops all of them, any
    damage sets the checkpoint aside for all (process 0 renames it)."""
    return OUTCOMES[max(job.gather(f"restore-{step}", OUTCOMES.index(outcome)))]


def restore_newest_good(checkpoints: Checkpoints, config: TrainConfig, abstract) -> tuple[int, dict, dict]:
    """(step, state, data state) of the newest checkpoint that restores. A damaged one (its own files
    unreadable or inconsistent) is renamed N.damaged, kept, and named in a warning; any other failure
    (memory, permissions, disk, timeouts) stops the run with nothing renamed; if none restores, the run
    stops rather than start over."""
    for step in reversed(checkpoints.all_steps()):
        outcome, result = try_restore(checkpoints, step, config, abstract)
        agreed = agreed_outcome(step, outcome)
        if agreed == "ok":
            return step, *result
        if agreed == "error":
            reason = job.describe(result) if outcome == "error" else "another process failed to read it"
            raise TrainingError(f"cannot restore checkpoint step {step} ({reason}); nothing was renamed or "
                                f"changed: fix the cause and run again")
        if outcome == "damaged":
            background_read_errors.write(f"checkpoint step {step}, process {jax.process_index()}:\n"
                                         + "".join(traceback.format_exception(result)))
        kept = checkpoints.set_aside(step)
        if jax.process_index() == 0:
            why = damage_description(result) if outcome == "damaged" else "unreadable in another process"
            print(f"warning: checkpoint step {step} is damaged ({why}); kept as {kept}, trying the previous one "
                  f"(the reads' errors: {background_read_errors.path})", file=sys.stderr)
    raise TrainingError(f"no checkpoint in {checkpoints.directory} could be restored (the damaged ones are kept "
                        f"as *.damaged); move them away to start afresh")


def saved_config(workdir: str | Path) -> dict | None:
    """The config of a workdir's newest checkpoint whose config reads; None where there is none."""
    if not checkpoint_directory(workdir).is_dir():
        return None
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        for step in reversed(checkpoints.all_steps()):
            try:
                return checkpoints.read_config(step)
            except Exception:  # a damaged checkpoint: resuming sets it aside and names it
                continue
        return None
    finally:
        checkpoints.close()


def incompatible_fields(saved: dict, current: dict, trained: bool = True) -> list[str]:
    """Names of the fields whose change would make a resumed run a different run; from a checkpoint
    that was never `trained` (an import at step 0), only the network's."""
    fixed_train_fields = [name for name in fields_resumed(TrainConfig, FIXED) if name != "model"]
    differing = [f"{name} ({saved.get(name)!r} -> {current.get(name)!r})"
                 for name in fixed_train_fields if trained and saved.get(name) != current.get(name)]
    saved_model, current_model = saved.get("model", {}), current["model"]
    differing += [f"model.{name} ({saved_model.get(name)!r} -> {current_model[name]!r})"
                  for name in fields_resumed(UNetConfig, FIXED)
                  if _normalise(saved_model.get(name)) != _normalise(current_model[name])]
    return differing


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def abstract_checkpoint(config: TrainConfig, sharding_of: Callable[[jax.ShapeDtypeStruct], jax.sharding.Sharding]
                        ) -> dict:
    """The shape of what train.py saves ({'train_state', 'rng'}), each leaf placed by `sharding_of(leaf)`, to
    restore into: a checkpoint restores into any layout, whichever wrote it."""
    abstract = jax.eval_shape(lambda: {"train_state": saved_form(create_train_state(config, jax.random.PRNGKey(0))),
                                       "rng": jax.random.PRNGKey(0)})
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_of(a)), abstract)


@contextlib.contextmanager
def _reading(workdir: str | Path, step: int | None):
    """(read-only Checkpoints, the step: `step` or the latest), or FileNotFoundError naming what is there."""
    directory = checkpoint_directory(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint in {directory}: train first, or pass the --workdir that holds one")
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        steps = checkpoints.manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}: train first, or pass the "
                                    f"--workdir that holds one")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoints.directory} "
                                    f"(steps: {', '.join(map(str, sorted(steps)))})")
        yield checkpoints, step
    finally:
        checkpoints.close()


def load_config(workdir: str | Path, step: int | None = None) -> TrainConfig:
    """The config a workdir's latest checkpoint, or `step`'s, was saved with."""
    with _reading(workdir, step) as (checkpoints, step):
        return TrainConfig.from_dict(checkpoints.read_config(step))


def load_params(workdir: str | Path, step: int | None = None, ema: bool = True) -> tuple[Any, dict, int]:
    """(params, config dict, step) from a workdir's latest checkpoint, or from `step`, on this process's
    first device (any process of a multi-host job may call it); only those parameters are read."""
    with _reading(workdir, step) as (checkpoints, step):
        config = checkpoints.read_config(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = checkpoints.read_weights(step, "ema_params" if ema else "params", device)
    return params, config, step


@contextlib.contextmanager
def _absl_errors_only(quiet: bool = True):
    """absl's (orbax's) log below ERROR silenced for the block, where `quiet`."""
    logger = logging.getLogger("absl")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
