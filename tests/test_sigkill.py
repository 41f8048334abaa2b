"""SIGKILL, what an out-of-memory killer or a lost machine does: no handler runs, and the next run
must resume from what is on disk as if nothing had happened."""
import json
import signal
import subprocess
import time

from commands import ROOT, TINY, assert_bit_identical, command_line, params_at, run_train

# One kill during the first checkpoint write, then one after each of two later saves: each costs a
# process start (imports, the cached program, the state) of several seconds.
KILLS = 3


def test_sigkill_at_three_moments_resumes_bit_identically(tmp_path):
    """SIGKILL during checkpoint writes and between steps: each restart resumes from the newest complete
    checkpoint, every checkpoint left restores, and the end equals the uninterrupted run bit for bit."""
    command = command_line("train.py", "--workdir", tmp_path, *TINY, "--steps", "6", "--save-every", "1")
    checkpoints = tmp_path / "checkpoints"

    def steps_saved():
        return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []

    kills = []
    while len(kills) < KILLS:
        before = steps_saved()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            writing = checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())
            if (not kills and writing) or (kills and steps_saved() != before):
                proc.send_signal(signal.SIGKILL)
                kills.append("during a checkpoint write" if writing else f"after step {steps_saved()[-1]}")
                break
            time.sleep(0.02)
        _, err = proc.communicate()
        if proc.returncode == 0:  # finished before it could be killed
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        restarted_from = steps_saved()
        assert not before or restarted_from[-1] >= before[-1]
    assert len(kills) == KILLS and kills[0] == "during a checkpoint write", kills
    newest = steps_saved()[-1]
    final = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert final.returncode == 0, final.stderr[-2000:]
    for step in steps_saved():  # nothing left behind that fails to restore
        params_at(tmp_path, step)

    reference = tmp_path.parent / "never-killed"  # in this process: the same programs, bit for bit
    run_train(reference, "--steps", "6")  # saving changes nothing that is trained
    assert_bit_identical(params_at(tmp_path, 6), params_at(reference, 6))
    finished = json.loads(final.stdout.strip().splitlines()[-1])
    assert finished["step"] == 6 and finished["resumed_from"] == newest
