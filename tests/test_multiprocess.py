"""train.py as several processes and under signals: two processes on localhost (gloo) against one,
under both drivers; SIGTERM to one process, to both a moment apart, and to a single-process run, each
followed by a resume."""
import json
import signal
import subprocess
import time

import jax
import pytest

from commands import ROOT, TINY, command_line, params_at, run_train, start_processes, summary, wait_for
from parity import rel_error, without_key_biases

# Two processes meet in gloo collectives with a fixed 30 s timeout: not beside another worker's tests.
pytestmark = pytest.mark.alone


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """What the processes must reach: one process with 4 CPU devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    run_train(workdir, "--steps", "6", "--save-every", "3")
    return workdir


def assert_same_state(a, b, tolerance):
    """Parameters, EMA and optimiser state agree to `tolerance` (key biases aside: see without_key_biases)."""
    for name in ("params", "ema_params", "opt_state"):
        errors = jax.tree_util.tree_map(rel_error, without_key_biases(a[name]), without_key_biases(b[name]))
        assert max(jax.tree_util.tree_leaves(errors)) <= tolerance, name
    assert int(a["step"]) == int(b["step"])


@pytest.mark.parametrize("driver", ["pmap", "jit"])
def test_two_processes_match_one_process(one_process, tmp_path, driver):
    """2 processes x 2 CPU devices (gloo) reach the state 1 process x 4 devices reaches, under either driver."""
    procs = start_processes(tmp_path, 2, "--steps", "6", "--save-every", "3", "--parallel", driver)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert_same_state(params_at(tmp_path, 6), params_at(one_process, 6), 1e-5)


@pytest.mark.parametrize("signalled,apart_s", [((1,), 0.0), ((0, 1), 0.5)], ids=["one process", "both, apart"])
def test_sigterm_in_a_two_process_run_stops_both_at_one_step(tmp_path, signalled, apart_s):
    """Whichever processes get SIGTERM, both save the same step, exit 0 within 60 s, and the run resumes."""
    procs = start_processes(tmp_path, 2, "--steps", "100000", "--save-every", "100000")
    wait_for(tmp_path / "metrics.jsonl", procs)
    for i in signalled:
        procs[i].send_signal(signal.SIGTERM)
        time.sleep(apart_s)
    sent = time.time()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert time.time() - sent < 60
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    steps = {json.loads(out.strip().splitlines()[-1])["step"] for out, _ in outputs}
    assert len(steps) == 1
    stopped = steps.pop()
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()
    resumed = summary(run_train(tmp_path, "--steps", str(stopped + 2)))
    assert resumed["resumed_from"] == stopped and resumed["step"] == stopped + 2


def test_sigterm_saves_and_the_next_run_resumes(tmp_path):
    """The signal a cluster sends before preemption: finish the step, save, print the summary, exit 0."""
    proc = subprocess.Popen(command_line("train.py", "--workdir", tmp_path, *TINY, "--steps", "100000",
                                         "--save-every", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(tmp_path / "metrics.jsonl", [proc])
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - sent < 30
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["step"] >= 2 and (tmp_path / "checkpoints" / str(stopped["step"])).is_dir()
    resumed = summary(run_train(tmp_path, "--steps", str(stopped["step"] + 2)))
    assert resumed["resumed_from"] == stopped["step"]
