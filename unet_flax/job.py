"""What the processes of one JAX job tell each other outside their programs: barriers and small values,
through the job's coordination service (jax.distributed).

Not collectives: gloo, the collectives of CPU processes, gives up on the first collective over a set
of devices that one process reaches 30 s after another (a slower compile, a busy machine), whatever
the timeouts. The coordination service waits as long as it is told.
"""
from __future__ import annotations

import itertools

import jax

TIMEOUT_MS = 30 * 60 * 1000  # a peer that fails says so (trainer.PeerFailures); this is for hangs
# Every process makes the same calls in the same order, so the n-th call has the same key everywhere,
# and a second train() in the same job does not meet the first one's keys.
_calls = itertools.count()


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
