"""Running the project's commands in subprocesses, as a user does, and reading what they wrote."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--num-groups", "4",
        "--num-heads", "2", "--attention-resolutions", "4", "--image-size", "8", "--batch-size", "8",
        "--num-samples", "10", "--sampling-steps", "2", "--log-every", "2", "--warmup-steps", "2"]


def run_train(workdir, *flags, devices=4, env=None, check=True):
    environment = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *TINY, *flags],
                            capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def params_at(workdir, step):
    """A checkpoint's train state, restored onto this process's first device whatever wrote it."""
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    checkpointer.metadata(path).item_metadata)
    return checkpointer.restore(path, target)["train_state"]


def assert_bit_identical(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(workdir, count: int, *flags) -> list[subprocess.Popen]:
    """train.py as `count` processes on localhost (2 CPU devices each), one JAX distributed job."""
    port = free_port()
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return [subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *TINY, *flags, "--distributed",
         "--coordinator-address", f"localhost:{port}", "--num-processes", str(count), "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=ROOT)
        for i in range(count)]


def wait_for(path: Path, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until `path` exists (training has logged), or fail naming why."""
    deadline = time.time() + timeout_s
    while not path.exists():
        assert all(proc.poll() is None for proc in procs), [proc.communicate()[1][-2000:] for proc in procs]
        assert time.time() < deadline, f"{path} did not appear in {timeout_s} s"
        time.sleep(0.2)


def run_sample(workdir, *flags, check=True, env=None):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--workdir", str(workdir), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
