"""Running the project's commands as a user does, and reading what they wrote.

`run_main` runs a command's `main(argv)` in this process: what `python train.py ...` runs, without
starting an interpreter, importing JAX and re-tracing every small program again (10-15 s a run on
a 2-core CPU). What needs a process of its own (signals, several processes, another environment,
a crash's traceback) starts one with `run_process` or `start_processes`."""
import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
# A tiny network on the digits. A constant learning rate (the digits preset's decays to 0 at --steps)
# keeps --steps out of the compiled step: runs of every length share one program.
TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--num-groups", "4",
        "--num-heads", "2", "--attention-resolutions", "4", "--image-size", "8", "--batch-size", "8",
        "--num-samples", "10", "--sampling-steps", "2", "--log-every", "2", "--warmup-steps", "2",
        "--lr-schedule", "constant"]


def command_line(command: str, *args) -> list[str]:
    """`command` is a script (train.py, sample.py, ...) or a module run with -m (unet_flax.scripts.convert)."""
    program = [str(ROOT / command)] if command.endswith(".py") else ["-m", command]
    return [sys.executable, *program, *map(str, args)]


def import_command(command: str):
    """The module of a script (train.py, ...) or of a module run with -m (unet_flax.scripts.convert)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(command.removesuffix(".py"))


def run_main(command: str, *args, check: bool = False) -> subprocess.CompletedProcess:
    """`python command args` as `main(args)` in this process: its exit code, stdout and stderr, with
    the matmul precision a fresh process has (conftest's "highest" would make other programs)."""
    module = import_command(command)
    stdout, stderr = io.StringIO(), io.StringIO()
    xla_flags, sigterm = os.environ["XLA_FLAGS"], signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                jax.default_matmul_precision(None):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as exit_:  # argparse: usage errors and --help
                code = exit_.code
    finally:  # what the command changed for its own process
        os.environ["XLA_FLAGS"] = xla_flags
        signal.signal(signal.SIGTERM, sigterm)
    result = subprocess.CompletedProcess([command, *args], code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_process(command: str, *args, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python command args` in a process of its own, with this one's environment (conftest's 4 CPU
    devices) and `env`."""
    result = subprocess.run(command_line(command, *args), capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_train(workdir, *flags, check: bool = True) -> subprocess.CompletedProcess:
    """train.py on the tiny network, in this process."""
    return run_main("train.py", "--workdir", workdir, *TINY, *flags, check=check)


def run_sample(workdir, *flags, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """sample.py, in this process; in a process of its own where `env` changes the environment."""
    if env is None:
        return run_main("sample.py", "--workdir", workdir, *flags, check=check)
    return run_process("sample.py", "--workdir", workdir, *flags, env=env, check=check)


def snapshot(folder) -> dict:
    """Every file under `folder` with its modification time: equal snapshots, nothing written."""
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


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


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A port nothing listens on: any, or the first free one in [low, high]."""
    for port in [0] if low is None else range(low, high + 1):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("localhost", port))
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def start_processes(workdir, count: int, *flags, slurm: bool = False) -> list[subprocess.Popen]:
    """train.py as `count` processes on localhost (2 CPU devices each), one JAX distributed job: told which
    process each is by flags, or (`slurm`) by the environment a SLURM job step gives its tasks."""
    xla_flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=4",
                                                "--xla_force_host_platform_device_count=2")
    environment = {**os.environ, "XLA_FLAGS": xla_flags}
    command = command_line("train.py", "--workdir", workdir, *TINY, *flags, "--distributed")
    if slurm:  # JAX's SLURM support takes the coordinator's port from the job id: 61440 + id % 4096
        job_id = free_port(61440, 65535) - 61440
        return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={
            **environment, "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(count), "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(count)]
    port = free_port()
    return [subprocess.Popen(
        [*command, "--coordinator-address", f"localhost:{port}", "--num-processes", str(count), "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=ROOT)
        for i in range(count)]


def wait_for(path: Path, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until `path` exists (training has logged), or fail naming why."""
    deadline = time.time() + timeout_s
    while not path.exists():
        assert all(proc.poll() is None for proc in procs), [proc.communicate()[1][-2000:] for proc in procs]
        assert time.time() < deadline, f"{path} did not appear in {timeout_s} s"
        time.sleep(0.2)



def images_with_a_truncated_row(folder: Path, count: int, row: int, seed: int) -> Path:
    """`count` random 12x12 grey PNGs in ten class folders (the tiny runs' network, whose programs are
    compiled), and the file at `row` of the seed-0 shuffle (the order training reads the sorted files
    in) cut to 60 bytes: that file's path."""
    import grain
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = [folder / f"class{i % 10}" / f"{i:03d}.png" for i in range(count)]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(path)
    broken = sorted(files)[list(grain.MapDataset.range(count).shuffle(seed=0))[row]]
    broken.write_bytes(broken.read_bytes()[:60])
    return broken
