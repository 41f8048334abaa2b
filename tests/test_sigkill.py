"""SIGKILL, what an out-of-memory killer or a lost machine does: no handler runs, and the next run
must resume from what is on disk as if nothing had happened; with several processes, the others must
stop and say which process was lost."""
import json
import re
import signal
import socket
import subprocess
import time

import psutil  # orbax-checkpoint's dependency
import pytest
from commands import (
    ROOT,
    TINY,
    assert_bit_identical,
    command_line,
    free_port,
    params_at,
    run_train,
    start_processes,
    summary,
)

from unet_flax import supervisor
from unet_flax.checkpoint import complete_steps

# One kill during the first checkpoint write, then one after each of two later saves: each costs a
# process start (imports, the cached program, the state) of several seconds.
KILLS = 3


def test_sigkill_at_three_moments_resumes_bit_identically(tmp_path):
    """SIGKILL during checkpoint writes and between steps: each restart resumes from the newest complete
    checkpoint, every checkpoint left restores, and the end equals the uninterrupted run bit for bit."""
    command = command_line("train.py", "--workdir", tmp_path, *TINY, "--steps", "6", "--save-every", "1")
    checkpoints = tmp_path / "checkpoints"

    kills = []
    while len(kills) < KILLS:
        before = complete_steps(checkpoints)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            writing = checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())
            if (not kills and writing) or (kills and complete_steps(checkpoints) != before):
                proc.send_signal(signal.SIGKILL)
                kills.append("during a checkpoint write" if writing
                             else f"after step {complete_steps(checkpoints)[-1]}")
                break
            time.sleep(0.02)
        _, err = proc.communicate()
        if proc.returncode == 0:  # finished before it could be killed
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        restarted_from = complete_steps(checkpoints)
        assert not before or restarted_from[-1] >= before[-1]
    assert len(kills) == KILLS and kills[0] == "during a checkpoint write", kills
    newest = complete_steps(checkpoints)[-1]
    final = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert final.returncode == 0, final.stderr[-2000:]
    for step in complete_steps(checkpoints):  # nothing left behind that fails to restore
        params_at(tmp_path, step)

    reference = tmp_path.parent / "never-killed"  # in this process: the same programs, bit for bit
    run_train(reference, "--steps", "6")  # saving changes nothing that is trained
    assert_bit_identical(params_at(tmp_path, 6), params_at(reference, 6))
    finished = json.loads(final.stdout.strip().splitlines()[-1])
    assert finished["step"] == 6 and finished["resumed_from"] == newest


LOST = {
    "process": r"process 0 was lost \(killed, or its host gone: the job's coordination service stopped hearing from "
               r"it\)",
    "host": r"process 0 was lost \(its host, which ran the job's coordination service, stopped answering; JAX's "
            r"coordination client ended this process, above\)",
}


@pytest.mark.parametrize("lost", sorted(LOST))
def test_a_lost_process_or_host_stops_the_other_within_60_s_and_the_restart_resumes(tmp_path, lost):
    """Two processes of a SLURM job step (told which process each is by the environment, not by flags).
    Process 0 gets SIGKILL while the second checkpoint is written, when process 1 waits in the save's
    collectives, which fail at once: the process alone (its supervising parent, whose child follows it;
    the job's coordination service, a process of its own, lives on), or its whole host (every process of
    it, the service too, which makes JAX's client abort process 1's training process). Process 1 stops
    within 60 s, exit 1, its last line naming process 0 and the newest complete checkpoint; nothing of the
    job is left running; the restart resumes from that checkpoint."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    procs = start_processes(workdir, 2, "--steps", "100000", "--save-every", "2", slurm=True)
    while not (complete_steps(checkpoints) and any("tmp" in path.name for path in checkpoints.iterdir())):
        assert all(proc.poll() is None for proc in procs), [proc.communicate()[1][-2000:] for proc in procs]
        time.sleep(0.01)
    process_0 = psutil.Process(procs[0].pid)
    descendants = process_0.children(recursive=True)  # its training process and the service's
    for process in [process_0, *(descendants if lost == "host" else [])]:
        process.kill()
    killed = time.time()
    _, err = procs[1].communicate(timeout=120)
    assert time.time() - killed < 60, f"process 1 stopped {time.time() - killed:.0f} s after process 0 was killed"
    assert procs[1].returncode == 1, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    match = re.fullmatch(f"error: {LOST[lost]}; the last complete checkpoint is step (\\d+); this process stops too",
                         last_line)
    assert match, err[-3000:]
    procs[0].communicate()
    last_saved = int(match.group(1))
    assert last_saved == complete_steps(checkpoints)[-1]
    resumed = summary(run_train(workdir, "--steps", last_saved + 1))
    assert resumed["resumed_from"] == last_saved and resumed["step"] == last_saved + 1
    # Process 0's training process followed its parent at once; the service outlived them long enough
    # for the others (30 s), then ended.
    _, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive


@pytest.mark.parametrize("ending,service", [
    ("sys.exit(3)", None), ("os.kill(os.getpid(), signal.SIGSEGV)", None),
    ("os.abort()", "gone"), ("os.abort()", "answering")])
def test_the_supervisor_passes_exit_codes_on_and_names_what_ended_its_child(tmp_path, monkeypatch, capfd, ending,
                                                                             service):
    """train.py --distributed's parent (unet_flax.supervisor) around a child that exits, crashes, or aborts as
    JAX's coordination client does when the job's service is gone (nothing listening at the coordinator's
    address) or for another reason (the service answers): the child's code, or one line, last, exit 1."""
    (tmp_path / "ending.py").write_text(f"import os, signal, sys\n{ending}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "6").mkdir(parents=True)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1] if service == "answering" else free_port()
        code = supervisor.supervise("ending", [], str(workdir), f"127.0.0.1:{port}")
    last_line = (capfd.readouterr().err.strip().splitlines() or [""])[-1]
    if ending == "sys.exit(3)":
        assert code == 3 and last_line == ""
        return
    assert code == 1
    if service == "gone":
        assert last_line.startswith("error: process 0 was lost (its host, which ran the job's coordination service, "
                                    "stopped answering;") and last_line.endswith(
                                    "the last complete checkpoint is step 6; this process stops too"), last_line
    else:
        signal_name = "SIGSEGV" if "SIGSEGV" in ending else "SIGABRT"
        assert last_line == (f"error: the training process was ended by {signal_name}; the last complete "
                             f"checkpoint is step 6"), last_line
