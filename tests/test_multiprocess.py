"""train.py as several processes and under signals: two processes on localhost (gloo) stopped by
SIGTERM, to one of them or to both a moment apart, under either driver; each resumed and compared
with one process that ran the same steps; a bad image that only one process reads stopping both;
and SIGTERM to a single-process run."""
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import psutil  # orbax-checkpoint's dependency
import pytest
from commands import (
    ROOT,
    TINY,
    command_line,
    images_with_a_truncated_row,
    params_at,
    run_train,
    start_processes,
    summary,
    wait_for,
)
from parity import rel_error, without_key_biases

# Until a signal stops it. A checkpoint every step slows the steps to about one a second, so the run
# stops within a few steps of the signal: the rounding the comparisons allow grows with the steps.
UNTIL_STOPPED = ["--steps", "100000", "--save-every", "1"]


def assert_same_state(a, b, tolerance):
    """Parameters, EMA and optimiser state agree to `tolerance` (key biases aside: see without_key_biases)."""
    for name in ("params", "ema_params", "opt_state"):
        errors = jax.tree_util.tree_map(rel_error, without_key_biases(a[name]), without_key_biases(b[name]))
        assert max(jax.tree_util.tree_leaves(errors)) <= tolerance, name
    assert int(a["step"]) == int(b["step"])


def stop_with_sigterm(procs: list[subprocess.Popen], signalled: tuple[int, ...], apart_s: float) -> int:
    """SIGTERM to the `signalled` processes once training has logged: the step every process stopped
    at, after checking that each exited 0 within 60 s and said why it stopped."""
    for i in signalled:
        procs[i].send_signal(signal.SIGTERM)
        time.sleep(apart_s)
    sent = time.time()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert time.time() - sent < 60
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "SIGTERM: saved step" in err, err[-3000:]
    steps = {json.loads(out.strip().splitlines()[-1])["step"] for out, _ in outputs}
    assert len(steps) == 1, steps
    return steps.pop()


def resume_in_two_processes(workdir, steps: int, driver: str) -> tuple[dict, list[str]]:
    """The run continued by two processes (no --preset: each reads the saved config first); the
    summary and both processes' stderr."""
    procs = start_processes(workdir, 2, "--steps", steps, "--parallel", driver)
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return json.loads(outputs[0][0].strip().splitlines()[-1]), [err for _, err in outputs]


def children_of(pids) -> set[int]:
    """The multiprocessing descendants (data workers, the resource tracker) of `pids`."""
    children = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "multiprocessing" in " ".join(child.cmdline()):
                        children.add(child.pid)
    return children


@pytest.mark.parametrize("driver,signalled,apart_s,resume_processes", [
    ("pmap", (1,), 0.0, 1), ("jit", (0, 1), 0.5, 2)],
    ids=["pmap, one process signalled, resumed by one", "jit, both signalled apart, newest damaged, resumed by two"])
def test_two_processes_stop_together_resume_and_match_one_process(tmp_path, driver, signalled, apart_s,
                                                                  resume_processes):
    """2 processes x 2 CPU devices (gloo): whichever of them get SIGTERM, both save the same step and
    exit 0 within 60 s; resumed for two more steps (by one process; or by two, the newest checkpoint
    damaged, which both set aside once and both pass over), the run equals 1 process x 4 devices that
    ran all of them without a stop."""
    workdir = tmp_path / "two_processes"
    procs = start_processes(workdir, 2, *UNTIL_STOPPED, "--parallel", driver)
    wait_for(workdir / "metrics.jsonl", procs)
    stopped = stop_with_sigterm(procs, signalled, apart_s)
    assert (workdir / "checkpoints" / str(stopped)).is_dir()

    if resume_processes == 2:
        (workdir / "checkpoints" / str(stopped) / "state" / "_METADATA").unlink()
        resumed, stderr = resume_in_two_processes(workdir, stopped + 2, driver)
        warning = f"warning: checkpoint step {stopped} is damaged"
        assert stderr[0].count(warning) == 1 and warning not in stderr[1]  # process 0 says it, once
        assert (workdir / "checkpoints" / f"{stopped}.damaged").is_dir()
        assert resumed["resumed_from"] == stopped - 1 and resumed["step"] == stopped + 2
    else:
        resumed = summary(run_train(workdir, "--steps", str(stopped + 2)))
        assert resumed["resumed_from"] == stopped and resumed["step"] == stopped + 2
    one_process = tmp_path / "one_process"
    run_train(one_process, "--steps", str(stopped + 2))
    # The two runs sum gradients in different orders (gloo across processes, one process's all-reduce), and
    # Adam turns the rounding of nearly cancelling bias gradients into differences of 5e-6 to 1.03e-5 of a
    # leaf's largest value at step 4 (conv2 and skip biases; which leaves depends on how the norm is summed).
    assert_same_state(params_at(workdir, stopped + 2), params_at(one_process, stopped + 2), 2e-5)


def test_sigterm_saves_and_the_next_run_resumes(tmp_path):
    """The signal a cluster sends before preemption: finish the step, save, print the summary, exit 0."""
    proc = subprocess.Popen(command_line("train.py", "--workdir", tmp_path, *TINY, *UNTIL_STOPPED),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(tmp_path / "metrics.jsonl", [proc])
    stopped = stop_with_sigterm([proc], (0,), 0.0)
    assert stopped >= 2 and (tmp_path / "checkpoints" / str(stopped)).is_dir()
    resumed = summary(run_train(tmp_path, "--steps", str(stopped + 2)))
    assert resumed["resumed_from"] == stopped


def test_a_bad_image_in_one_process_stops_both_within_60_s(tmp_path):
    """Process 1's rows hold a truncated image, process 0's do not: process 1 names the file in one line,
    process 0 says which process failed and why, and both exit 1 within 60 s of the first, with their data
    workers (the default for image folders) stopped: none left running, no leak warned about after."""
    data = tmp_path / "images"
    # Global batch k of 8 is the shuffled rows 8k..8k+7: process 0 reads the first 4, process 1 the
    # last 4. Row 20 is process 1's, in the third batch.
    broken = images_with_a_truncated_row(data, 40, 20, seed=1)
    procs = start_processes(tmp_path / "run", 2, "--data", data, "--steps", "20")
    first_exit, workers = None, set()
    while any(proc.poll() is None for proc in procs):
        workers |= children_of(proc.pid for proc in procs if proc.poll() is None)
        if first_exit is None and any(proc.poll() is not None for proc in procs):
            first_exit = time.time()
        assert first_exit is None or time.time() - first_exit < 60, "the other process did not stop in 60 s"
        time.sleep(0.2)
    assert workers, "no data workers were seen"
    # Python's resource tracker (a child too) ends on its own once its parent is gone; workers left
    # running would stay.
    deadline = time.time() + 15
    while [pid for pid in workers if Path(f"/proc/{pid}").exists()] and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "data workers outlived their process"
    errors = [proc.communicate()[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [1, 1], errors
    assert errors[1].strip().splitlines()[-1] == f"error: cannot read image {broken}: image file is truncated"
    assert errors[0].strip().splitlines()[-1] == (
        f"error: process 1 failed (DataError: cannot read image {broken}: image file is truncated); "
        "no checkpoint was written yet; this process stops too")
