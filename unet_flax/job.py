"""The processes of one JAX job: joining it, what they tell each other outside their programs (barriers,
small values), stopping together (SIGTERM, a failed peer, a lost peer) and ending a failed job.

Through the job's coordination service (jax.distributed), not collectives: gloo, the collectives of CPU
processes, gives up on the first collective over a set of devices that one process reaches 30 s after
another (a slower compile, a busy machine), whatever the timeouts. The coordination service waits as
long as it is told.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import multiprocessing.synchronize
import multiprocessing.util
import os
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from . import input_pipeline
from .errors import ConfigError

INITIALIZATION_TIMEOUT_S = 300  # jax.distributed.initialize's default
TIMEOUT_MS = 30 * 60 * 1000  # a peer that fails says so (PeerFailures); this is for hangs
# A process that sends no heartbeat for this long is lost (killed, its host gone): the others stop.
# Heartbeats come from a thread of their own every few seconds, whatever the process is computing.
HEARTBEAT_TIMEOUT_S = 20
# How long a process that failed in a collective waits for PeerFailures to find a lost peer behind it:
# the peer's missed heartbeats, then the watcher's next look (16-18 s measured), with room to spare.
PEER_LOSS_NOTICED_S = HEARTBEAT_TIMEOUT_S + 20
# Every process makes the same calls in the same order, so the n-th call has the same key everywhere,
# and a second train() in the same job does not meet the first one's keys.
_calls = itertools.count()


def join_job(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize, before anything asks JAX which process this is (reading a saved
    config does); None: what the cluster's environment says (SLURM, Open MPI, Cloud TPU)."""
    # Recoverable: a lost process is reported to the others (PeerFailures watches for it) instead of
    # aborting them from inside the coordination client, which prints a C++ stack trace and no reason.
    jax.config.update("jax_enable_recoverability", True)
    bind_address, local_device_ids = None, None
    try:
        if None in (coordinator_address, num_processes, process_id):
            coordinator_address, num_processes, process_id, local_device_ids = _from_cluster_environment(
                coordinator_address, num_processes, process_id)
        if process_id == 0 and coordinator_address is not None and num_processes is not None:
            # The job's coordination service in a process of its own, which outlives this one: a lost process 0
            # is then reported like any other (the others' clients abort the moment a service in it goes).
            # JAX starts a service in process 0 all the same: it gets an address of its own, and no client.
            _start_service_host(f"[::]:{coordinator_address.rsplit(':', 1)[1]}", num_processes)
            bind_address = f"127.0.0.1:{_free_port()}"
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, coordinator_bind_address=bind_address)
    except ValueError as error:  # nothing given and no cluster in the environment
        raise ConfigError(f"--distributed: {error} JAX found no cluster to read it from: pass --coordinator-address "
                          f"HOST:PORT --num-processes N --process-id I") from None
    # Collectives between CPU processes need gloo; GPU and TPU bring their own. Before the backends start.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    atexit.register(_leave_last)  # after JAX's own exit handler, so it runs before it


def _from_cluster_environment(coordinator_address: str | None, num_processes: int | None,
                              process_id: int | None) -> tuple[str | None, int | None, int | None, list[int] | None]:
    """The settings not given, as jax.distributed.initialize would read them from the cluster's environment
    (SLURM, Open MPI, Cloud TPU), and the local devices it names: read first, so that process 0 knows
    that it is and starts the service in a process of its own. JAX has no public function for it."""
    from jax._src import clusters

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address, num_processes, process_id, None, None, INITIALIZATION_TIMEOUT_S)


def cluster_coordinator_address() -> str | None:
    """The job's coordinator address as the cluster's environment gives it (ValueError: no cluster)."""
    return _from_cluster_environment(None, None, None)[0]


_service_host: subprocess.Popen | None = None


def _start_service_host(bind_address: str, num_processes: int) -> None:
    global _service_host
    # Its own session: a Ctrl-C to the job's terminal stops the job's processes, which then leave the service.
    _service_host = start_module("unet_flax.job", bind_address, str(num_processes), stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True)


def start_module(module: str, *args: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`python -m module args` in a process of its own, with this process's environment and `env`, importing
    this package from where this process did (a checkout run as `python path/to/train.py` too)."""
    environment = {**os.environ, **(env or {})}
    package_root = str(Path(__file__).resolve().parents[1])
    if package_root not in (*site.getsitepackages(), site.getusersitepackages()):
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", module, *args], env=environment, **popen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(bind_address: str, num_processes: int) -> None:
    """The job's coordination service, in the process _start_service_host starts. It ends when process 0
    does: at once after a normal end (process 0 writes "normal" once the others have left), else after long
    enough for the others to see process 0 lost and stop."""
    from jax._src.lib import _jax  # what jax.distributed.initialize starts in process 0

    service = _jax.get_distributed_runtime_service(bind_address, num_processes, heartbeat_timeout=HEARTBEAT_TIMEOUT_S,
                                                   shutdown_timeout=60, recoverable=True)
    if sys.stdin.read() != "normal":  # until process 0 has exited
        time.sleep(HEARTBEAT_TIMEOUT_S + 10)
    del service
    os._exit(0)  # without the service's shut-down, which would wait for clients that are gone


def _leave_last(timeout_s: float = 60.0) -> None:
    """At exit, process 0 waits (at most `timeout_s`) for the others to leave the coordination service: a
    recoverable job has no shutdown barrier, and a process whose service is gone aborts as it leaves. Once
    alone, it lets the service's own process end with it. JAX's exit handler then disconnects."""
    from jax._src import distributed

    state = distributed.global_state
    if state.process_id == 0 and state.client is not None:
        _release_service_when_alone(state, timeout_s)


def _release_service_when_alone(state, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) until process 0 is the only live process, then tell the service's
    process to end when process 0 does."""
    everyone = list(range(state.num_processes))
    alone = threading.Event()

    def until_alone() -> None:
        with contextlib.suppress(Exception):  # nothing left to do at exit but leave
            while len(state.client.get_live_nodes(everyone)) > 1:  # answered once the others ask or leave
                time.sleep(0.1)
            alone.set()

    waiting = threading.Thread(target=until_alone, daemon=True)
    waiting.start()
    waiting.join(timeout_s)
    if alone.is_set() and _service_host is not None:
        with contextlib.suppress(OSError):
            _service_host.stdin.write("normal")
            _service_host.stdin.flush()


def _leave_failed_job(timeout_s: float) -> None:
    """Leave the job's coordination service at once, without the interpreter's shut-down: every process
    disconnects (the others then see it gone now, not after a heartbeat timeout), process 0 last, once the
    others have (so the service's process ends with it, leaving nothing of the job running). Bounded by
    `timeout_s`: the service may be gone."""
    from jax._src import distributed

    state = distributed.global_state
    if state.client is None:
        return

    def leave() -> None:
        with contextlib.suppress(Exception):
            if state.process_id == 0:
                _release_service_when_alone(state, timeout_s - 5)  # then 5 s to disconnect
            jax.distributed.shutdown()

    leaving = threading.Thread(target=leave, daemon=True)
    leaving.start()
    leaving.join(timeout_s)


def client():
    """The coordination client of the jax.distributed job that any run of several processes is."""
    from jax._src import distributed  # JAX has no public handle to it

    return distributed.global_state.client


def wait_for_all(name: str) -> None:
    """Returns once every process has called it (with the same `name`, which says what for)."""
    if jax.process_count() > 1:
        client().wait_at_barrier(_unique(name), TIMEOUT_MS)


def gather(name: str, value: int) -> list[int]:
    """Every process's `value`, in process order."""
    if jax.process_count() == 1:
        return [value]
    key = _unique(name)
    client().key_value_set(f"{key}/{jax.process_index()}", str(value))
    return [int(client().blocking_key_value_get(f"{key}/{i}", TIMEOUT_MS)) for i in range(jax.process_count())]


def _unique(name: str) -> str:
    return f"unet_flax/{next(_calls)}/{name}"


def describe(error: BaseException) -> str:
    """An exception as one short line: its type and its message's first line (which may be empty)."""
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


class StopSignal:
    """SIGTERM, what clusters send before preemption. One process keeps a flag; several processes use
    JAX's preemption sync point, so all stop after the same step whichever of them got the signal."""

    def __init__(self):
        self.several_processes = jax.process_count() > 1
        self.received = False
        self.previous_handler = None
        # JAX's preemption notifier owns SIGTERM across processes; Python lets only the main thread set handlers.
        if not self.several_processes and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGTERM, self._receive)

    def _receive(self, *_) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """Whether to stop after `step`; called after every step, by every process."""
        if self.several_processes:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        """SIGTERM's handler as it was before the run (train() may be called in a longer-lived program)."""
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)


class PeerFailures:
    """Several processes stop together when one cannot go on. The one that fails says why in the job's
    key-value store; one that is lost (killed, its host gone) stops sending heartbeats and drops out of
    the coordination service's live processes. The others, watching both from a thread, stop at once
    with the reason and the last complete checkpoint, wherever they are (waiting in a collective for
    the failed process would last until a timeout). Every process of a failed job then ends without
    JAX's shutdown barrier, which would wait for processes that are gone. A process that ends its run
    normally says so first, so that its exit is not taken for a loss."""

    def __init__(self, last_checkpoint: Callable[[], int | None], interval_s: float = 0.5):
        self.client = client()
        self.last_checkpoint = last_checkpoint
        run = _unique("run")  # a second run in the same job does not read the first one's keys
        self.failed, self.finished = f"{run}/failed/", f"{run}/finished/"
        self.done = threading.Event()
        threading.Thread(target=self._watch, args=(interval_s,), daemon=True, name="peer-failures").start()

    def announce(self, error: BaseException) -> None:
        """This process failed with `error`: the others stop, naming it. A collective that failed is
        first given time to be explained by a peer's failure or loss, which then stops this process
        with that reason instead (a peer killed during a collective closes its connections at once,
        long before the coordination service misses its heartbeats)."""
        if _may_be_a_lost_peer(error):
            self.done.wait(PEER_LOSS_NOTICED_S)  # the watcher ends the process if it finds the cause
        self.done.set()
        with contextlib.suppress(Exception):  # the service may be gone with process 0
            self.client.key_value_set(f"{self.failed}{jax.process_index()}", describe(error))

    def close(self) -> None:
        """This process's run ended normally: its exit is not a loss."""
        self.done.set()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{self.finished}{jax.process_index()}", "")

    def _watch(self, interval_s: float, unanswered_limit: int = 10) -> None:
        unanswered = 0
        while not self.done.wait(interval_s):
            try:
                failure = self._failed_peer() or self._lost_peer()
                unanswered = 0
            except Exception:  # for long: the service is gone with process 0's host, which ran it
                unanswered += 1
                failure = (0, "was lost (the job's coordination service, which ran on its host, stopped "
                              "answering)") if unanswered >= unanswered_limit else None
            if failure and not self.done.is_set():
                self._stop(*failure)

    def _failed_peer(self) -> tuple[int, str] | None:
        """(process, 'failed (its reason)') of another process that announced its failure."""
        for process, reason in self._announced(self.failed).items():
            if process != jax.process_index():
                return process, f"failed ({reason})"
        return None

    def _lost_peer(self) -> tuple[int, str] | None:
        """(process, 'was lost (...)') of a process that left the job's live processes without ending
        its run. Returns once every live process's watcher has asked too (the service answers them together)."""
        everyone = list(range(jax.process_count()))
        live = self.client.get_live_nodes(everyone)
        finished = self._announced(self.finished)
        lost = [process for process in everyone if process not in live and process not in finished]
        return (lost[0], "was lost (killed, or its host gone: the job's coordination service stopped hearing "
                         "from it)") if lost else None

    def _announced(self, directory: str) -> dict[int, str]:
        return {int(key.rsplit("/", 1)[-1]): value for key, value in self.client.key_value_dir_get(directory)}

    def _stop(self, process: int, what: str) -> None:
        below_progress_bar = "\n" if jax.process_index() == 0 else ""
        print(below_progress_bar + stop_line(f"process {process} {what}", self.last_checkpoint()), file=sys.stderr,
              flush=True)
        end_failed_job(1)


def stop_line(what: str, last_checkpoint: int | None) -> str:
    """The last line of a process that stops because `what` happened elsewhere in the job."""
    return f"error: {what}; {checkpoint_phrase(last_checkpoint)}; this process stops too"


def checkpoint_phrase(last_checkpoint: int | None) -> str:
    """What a run that stops has on disk to resume from."""
    return ("no checkpoint was written yet" if last_checkpoint is None
            else f"the last complete checkpoint is step {last_checkpoint}")


# How the runtime's errors begin when a peer went away in a collective (gloo: UNKNOWN; NCCL and gRPC:
# UNAVAILABLE, ...), unlike this process's own failures (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...).
_PEER_LOSS_STATUSES = ("UNKNOWN", "UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL")


def _may_be_a_lost_peer(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is the XLA runtime's with a status a lost peer gives."""
    while error is not None:
        if isinstance(error, jax.errors.JaxRuntimeError) and str(error).startswith(_PEER_LOSS_STATUSES):
            return True
        error = error.__cause__ or error.__context__
    return False


def end_failed_job(code: int) -> None:
    """End this process of a failed multi-process job at once (see PeerFailures): without the interpreter's
    shut-down, which would wait for the failed peers, but with the data workers stopped first (os._exit alone
    left them running, orphaned, each holding memory and this process's stderr) and the job's coordination
    service left (_leave_failed_job)."""
    input_pipeline.close_worker_iterators()
    stop_data_workers()
    _leave_failed_job(timeout_s=15.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop_data_workers(timeout_s: float = 10.0) -> None:
    """Terminate this process's data workers (grain's: multiprocessing children), wait for them, and release
    the named semaphores of their queues as a normal exit would: else Python's resource tracker, which
    outlives this process, warns about them after its last line. Unlinking only the names leaves the
    semaphores this process still holds (TensorBoard's writer's queue) working."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
    for finalizer in list(multiprocessing.util._finalizer_registry.values()):
        if getattr(finalizer, "_callback", None) is multiprocessing.synchronize.SemLock._cleanup:
            finalizer()


if __name__ == "__main__":  # _start_service_host's process
    serve(sys.argv[1], int(sys.argv[2]))
