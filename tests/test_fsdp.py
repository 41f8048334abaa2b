"""FSDP (`--parallel fsdp`, `--mesh data=N,fsdp=M`): the same run as data parallelism on 8 devices, in one
process or several, and checkpoints that restore into any other mesh or driver."""
import json
import os
import subprocess
import sys

import jax
from commands import ROOT, TINY, params_at, run_process, run_train, start_processes, summary
from parity import rel_error, without_key_biases


def assert_close(a, b, tolerance: float) -> None:
    """Within `tolerance`, key biases aside (see without_key_biases)."""
    errors = jax.tree_util.tree_map(rel_error, without_key_biases(a), without_key_biases(b))
    assert max(jax.tree_util.tree_leaves(errors)) <= tolerance


def losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in sorted(rows, key=lambda row: row["step"])]


EIGHT_DEVICES = """
import json, sys
from pathlib import Path
from unet_flax.runtime import use_xla_cpu_convolutions
use_xla_cpu_convolutions()
from unet_flax.scripts.train import main
for name, flags in json.loads(sys.argv[1]).items():
    assert main(["--workdir", str(Path(sys.argv[2]) / name), *flags]) == 0
"""


def test_fsdp_on_8_devices_equals_data_parallelism(tmp_path):
    """20 steps on 8 CPU devices with fsdp=8, with data=2,fsdp=4 and with pmap: the loss at every
    step within 1e-5 (relative) and the parameters, EMA and optimiser state within 1e-4; only the order of
    the sums differs (jit's data parallelism equals pmap's: test_training). The network's dropout is off:
    FSDP's one step over the whole batch draws its dropout masks from one key, the data-parallel step from one
    key per device."""
    common = [*TINY, "--steps", "20", "--log-every", "1", "--save-every", "20", "--num-samples", "2"]
    runs = {"fsdp8": ["--parallel", "fsdp"], "data2_fsdp4": ["--mesh", "data=2,fsdp=4"],
            "pmap": ["--parallel", "pmap"]}
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=4",
                                            "--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps({name: common + extra for name, extra
                                                                            in runs.items()}), str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "XLA_FLAGS": flags},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = losses(tmp_path / "pmap")
    assert len(reference) == 20
    for name in runs:
        assert max(abs(a - b) / abs(b) for a, b in zip(losses(tmp_path / name), reference)) <= 1e-5, name
        state = params_at(tmp_path / name, 20)
        for tree in ("params", "ema_params", "opt_state"):
            assert_close(state[tree], params_at(tmp_path / "pmap", 20)[tree], 1e-4)


def test_a_checkpoint_restores_into_every_layout_and_sampling_reads_it(tmp_path):
    """fsdp=4 saves step 4 sharded; pmap resumes it to 6; data=2,fsdp=2 resumes that to 8: equal to a run
    never stopped (and each restore takes the data iterator's position). sample.py reads the sharded
    checkpoint on one device."""
    workdir = tmp_path / "resharded"
    assert summary(run_train(workdir, "--steps", "4", "--save-every", "2", "--parallel", "fsdp"))["step"] == 4
    assert summary(run_train(workdir, "--steps", "6", "--parallel", "pmap"))["resumed_from"] == 4
    assert summary(run_train(workdir, "--steps", "8", "--mesh", "data=2,fsdp=2"))["resumed_from"] == 6
    never_stopped = tmp_path / "never_stopped"
    run_train(never_stopped, "--steps", "8", "--save-every", "8")
    resumed, reference = params_at(workdir, 8), params_at(never_stopped, 8)
    for tree in ("params", "ema_params", "opt_state"):
        assert_close(resumed[tree], reference[tree], 1e-5)
    sampled = run_process("sample.py", "--workdir", workdir, "--num-samples", "2", "--sampling-steps", "2",
                          env={"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("count=4", "count=1")}, check=True)
    assert json.loads(sampled.stdout.splitlines()[-1])["step"] == 8


def test_two_processes_equal_one(tmp_path):
    """fsdp over 2 processes x 2 devices (each process writes its shards) equals fsdp over 1 process x 4."""
    procs = start_processes(tmp_path / "two", 2, "--steps", "4", "--save-every", "4", "--parallel", "fsdp")
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    run_train(tmp_path / "one", "--steps", "4", "--save-every", "4", "--parallel", "fsdp")
    two, one = params_at(tmp_path / "two", 4), params_at(tmp_path / "one", 4)
    for tree in ("params", "ema_params", "opt_state"):
        assert_close(two[tree], one[tree], 1e-5)
