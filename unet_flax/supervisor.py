"""Each process of a multi-process train.py job runs as the child of a small parent on its host, as
torchrun's workers do: the parent is what can still speak when JAX ends the child.

JAX's coordination client aborts its process (SIGABRT, a C++ stack trace, no line of the project's) the
moment the job's coordination service is gone, which is what losing process 0's host does: the service
runs there. PeerFailures cannot help, being inside the aborted process. The parent then prints the
reason and the last complete checkpoint as the job's last line, exit 1.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

from . import job
from .checkpoint import last_complete_step

SUPERVISOR_ENV = "UNET_FLAX_SUPERVISOR_PID"  # in the child: its parent's pid


def follow_supervisor(interval_s: float = 0.2) -> bool:
    """In a supervised process (see supervise): end it, as SIGKILL would, the moment its parent is gone (killed,
    as a lost host's processes are). Whether this process is supervised."""
    parent = os.environ.pop(SUPERVISOR_ENV, None)  # not inherited by this process's own children
    if parent is None:
        return False

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="supervisor-watch").start()
    return True


def supervise(module: str, argv: list[str], workdir: str, coordinator_address: str | None) -> int:
    """Run `python -m module argv` as this process's child and wait for it: its exit code; or, when a signal
    ended it, one line saying why (see explain_signal) and exit 1. SIGTERM, a cluster's notice of
    preemption, is passed on; SIGINT, which a terminal sends to both, is left to the child."""
    child = job.start_module(module, *argv, env={SUPERVISOR_ENV: str(os.getpid())})
    handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM)),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        code = child.wait()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if code >= 0:
        return code
    if -code == signal.SIGINT:  # Ctrl-C: the child's KeyboardInterrupt said enough
        return 128 + signal.SIGINT
    print(explain_signal(-code, workdir, coordinator_address), file=sys.stderr, flush=True)
    return 1


def explain_signal(number: int, workdir: str, coordinator_address: str | None) -> str:
    """The line for a child that `number` ended: process 0's host lost with the job's coordination service (the
    usual SIGABRT), or the signal by name (an out-of-memory kill, a crash)."""
    last = last_complete_step(workdir)
    if number == signal.SIGABRT and not _answers(coordinator_address):
        return job.stop_line("process 0 was lost (its host, which ran the job's coordination service, stopped "
                             "answering; JAX's coordination client ended this process, above)", last)
    return f"error: the training process was ended by {signal.Signals(number).name}; {job.checkpoint_phrase(last)}"


def _answers(address: str | None, timeout_s: float = 5.0) -> bool:
    """Whether something accepts connections at `address` (HOST:PORT; None: the cluster's environment's)."""
    with contextlib.suppress(Exception):  # no address to be found: nothing answers there
        address = address or job.cluster_coordinator_address()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    return False
