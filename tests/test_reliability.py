"""Damaged checkpoints: resume falls back to the newest good one with a warning naming the damaged
one, keeps it (renamed N.damaged), and never starts from scratch silently; unreadable images, full
disks and partial metrics lines (SIGKILL: test_sigkill.py)."""
import errno
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from commands import (
    assert_bit_identical,
    images_with_a_truncated_row,
    params_at,
    run_process,
    run_train,
    snapshot,
    summary,
)
from parity import rel_error, without_key_biases

from unet_flax.checkpoint import Checkpoints, damage_description, is_damage, load_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    run_train(workdir, "--steps", "8", "--save-every", "1", "--keep-checkpoints", "8")
    return workdir


def _data_files(step_dir):
    """The checkpoint's array data files (TensorStore's OCDBT), smallest first."""
    return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _damage(step_dir, how):
    state = step_dir / "state"
    if how == "largest data file cut in half":
        _cut_in_half(_data_files(step_dir)[-1])
    elif how == "second-largest data file cut in half":
        _cut_in_half(_data_files(step_dir)[-2])
    elif how == "array index cut in half":
        _cut_in_half(state / "manifest.ocdbt")
    elif how == "array index overwritten":
        _overwrite_middle(state / "manifest.ocdbt")
    elif how == "metadata deleted":
        (state / "_METADATA").unlink()
    elif how == "metadata not JSON":
        (state / "_METADATA").write_text("{ not json")
    elif how == "step directory truncated":
        shutil.rmtree(state)


DAMAGE = {8: "largest data file cut in half", 7: "second-largest data file cut in half", 6: "array index cut in half",
          5: "array index overwritten", 4: "metadata deleted", 3: "metadata not JSON", 2: "step directory truncated"}
PROGRESS_BAR = re.compile(r"\s*\d+%\|")


def test_resume_falls_back_past_damaged_checkpoints(trained, tmp_path):
    """Steps 8 to 2 each damaged another way: each is named in one warning line, kept, and passed over;
    step 1 resumes. Nothing else reaches the process's stderr but the progress bar: the errors of orbax's
    reads still in flight (thousands of lines where a data file is cut short) go to the workdir's
    restore_errors.log."""
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for step, how in DAMAGE.items():
        _damage(workdir / "checkpoints" / str(step), how)
    result = run_process("train.py", "--workdir", workdir, "--steps", "10", "--save-every", "2", check=True)
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == len(DAMAGE), lines[:5]
    for line, step in zip(lines, DAMAGE):
        assert re.fullmatch(rf"warning: checkpoint step {step} is damaged \(.+\); kept as .*/{step}\.damaged, trying "
                            rf"the previous one \(the reads' errors: .*restore_errors\.log\)", line), line
        assert (workdir / "checkpoints" / f"{step}.damaged").is_dir()  # kept
    assert summary(result)["resumed_from"] == 1
    assert (workdir / "checkpoints" / "10").is_dir()
    assert "Traceback" in (workdir / "restore_errors.log").read_text()


def test_a_damaged_array_is_named_by_its_path_in_the_state(tmp_path):
    """The warning says which array could not be read, in words, not TensorStore's spec: a real orbax save
    of a small tree, its largest data file cut in half, restored."""
    tree = {"params": {"conv": np.arange(20000, dtype=np.float32), "bias": np.ones(7, np.float32)}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "c", tree)
    checkpointer.wait_until_finished()
    biggest = max((p for p in (tmp_path / "c").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(Exception) as failure:
        checkpointer.restore(tmp_path / "c", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree))
    assert re.fullmatch(r"cannot read params\.conv \([A-Z_]+\)", damage_description(failure.value))


def test_all_checkpoints_damaged_stops_and_keeps_them(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for step in range(1, 9):
        _damage(workdir / "checkpoints" / str(step), "step directory truncated")
    result = run_train(workdir, "--steps", "10", check=False)
    assert result.returncode == 1 and "no checkpoint in" in result.stderr and "could be restored" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if "damaged" in p.name) == \
        [f"{step}.damaged" for step in range(1, 9)]

    # Requeued as a preempted job would be: it must not begin again from step 0 over the kept ones.
    before = snapshot(workdir)
    again = run_train(workdir, "--steps", "10", check=False)
    assert again.returncode == 1 and "holds only checkpoints set aside as damaged" in again.stderr
    assert "to start afresh, move" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert snapshot(workdir) == before


@pytest.mark.parametrize("error,damage", [
    (MemoryError("out of host memory"), False),
    (PermissionError(errno.EACCES, "Permission denied", "checkpoints/4/state/manifest.ocdbt"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"), False),
    (ValueError('PERMISSION_DENIED: Error opening "checkpoints/4/state/_METADATA"'), False),
    (TimeoutError("Barrier timed out"), False),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "checkpoints/4/state/_METADATA"), True),
    (ValueError("NOT_FOUND: Error opening file: checkpoints/4/state/d/1f2e"), True),
    (ValueError("DATA_LOSS: Error reading manifest: Unexpected end of input"), True),
    (json.JSONDecodeError("Expecting value", "{ not json", 2), True),
    (KeyError("train_state"), True),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_damage_is_told_from_what_the_machine_refused(error, damage):
    assert is_damage(error) == damage
    chained = RuntimeError("orbax: restore failed")
    chained.__cause__ = error
    assert is_damage(chained) == damage  # the cause decides, however deep


def test_a_failure_that_is_not_damage_stops_and_renames_nothing(trained, tmp_path, monkeypatch):
    """Restoring fails for a reason outside the checkpoint's files: one line, exit 1, nothing renamed."""
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)

    def failing_restore(self, step, abstract):
        raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    monkeypatch.setattr(Checkpoints, "restore", failing_restore)
    result = run_train(workdir, "--steps", "10", check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: cannot restore checkpoint step 8 (ValueError: RESOURCE_EXHAUSTED: Out of memory while trying to "
        "allocate 1.2GiB); nothing was renamed or changed: fix the cause and run again"]
    assert snapshot(workdir) == before


def test_skip_nonfinite_counts_the_skipped_steps(tmp_path):
    """With --skip-nonfinite a NaN/inf step changes nothing but is counted; the run finishes."""
    result = run_train(tmp_path, "--steps", "4", "--save-every", "2", "--lr", "1e30", "--warmup-steps", "0",
                       "--grad-clip", "0", "--skip-nonfinite")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["nonfinite_total"] >= 1
    assert summary(result)["step"] == 4
    # The steps that did go through left parameters (about 1e30) whose samples are NaN: said, not hidden.
    assert "samples hold NaN or inf" in result.stderr, result.stderr[-2000:]
    for step in (2, 4):  # what was saved holds no NaN or inf, and counts the skipped steps
        state = params_at(tmp_path, step)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state))
    assert int(state["skipped_steps"]) == rows[-1]["nonfinite_total"]
    assert int(state["step"]) - int(state["skipped_steps"]) == int(np.max([
        np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
        if "count" in jax.tree_util.keystr(path)]))


def test_an_unreadable_image_mid_run_stops_in_one_line_and_can_be_skipped(tmp_path):
    """Training reads images as it needs them: a broken one, met at some step, stops the run with one
    line naming it (exit 1) and leaves the last checkpoint; --skip-bad-images resumes, passing over it."""
    data = tmp_path / "images"
    broken = images_with_a_truncated_row(data, 24, 16, seed=0)  # the first file of the third batch of 8
    workdir = tmp_path / "run"
    stopped = run_train(workdir, "--data", str(data), "--steps", "12", "--save-every", "1", "--data-workers", "2",
                        check=False)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == f"error: cannot read image {broken}: image file is truncated"
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == 2  # the steps before the broken image's batch

    resumed = summary(run_train(workdir, "--data", str(data), "--steps", "12", "--skip-bad-images"))
    assert resumed["resumed_from"] == max(saved) and resumed["step"] == 12
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_images_total"] >= 1


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_checkpoints_before(tmp_path, monkeypatch):
    """The write of step 4 fails as orbax reports a full disk (the message of a real one): the run ends
    with exit 1 and one line naming the folder, and step 2 restores."""
    real_save = ocp.CheckpointManager.save

    def save_until_full(self, step, *args, **kwargs):
        if step >= 4:
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{self.directory}/{step}.orbax-'
                             f'checkpoint-tmp/state/_sharding": Failed to write 139898 bytes to file 7: No space '
                             f"left on device [os_error_code='28']")
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
    result = run_train(tmp_path, "--steps", "6", "--save-every", "2", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: writing a checkpoint in {tmp_path}/checkpoints failed (No space left on device); the complete "
        f"ones are intact (steps: 2)")
    assert "Traceback" not in result.stderr
    assert int(params_at(tmp_path, 2)["step"]) == 2


def test_a_partial_metrics_line_is_skipped_and_the_next_rows_start_their_own(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    metrics = workdir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 9, "loss": 0.')  # killed mid-write
    result = run_train(workdir, "--steps", "10")
    assert f"warning: {metrics} line" in result.stderr and "skipped" in result.stderr
    lines = metrics.read_text().splitlines()
    partial = lines.index('{"step": 9, "loss": 0.')
    rows = [json.loads(line) for line in lines[:partial] + lines[partial + 1:]]
    assert rows[-1]["step"] == 10 and (workdir / "loss.png").is_file()


def test_a_checkpoint_of_the_previous_layout_restores_and_resumes(tmp_path):
    """tests/fixtures/previous_layout: the tiny run's checkpoints at steps 2 and 4, written before the modules
    were reorganised (when the loop was `trainer`, the step `training` and the config `train_config`).
    Sampling's restore reads step 4's EMA parameters bit for bit; with step 4 removed, the run resumes from
    step 2 and reaches step 4's state to float32 rounding (XLA:CPU's code, and so the last bits, differ
    between CPUs; the attention key biases aside, whose zero gradients' rounding noise Adam amplifies: see
    without_key_biases)."""
    fixture = Path(__file__).parent / "fixtures" / "previous_layout"
    saved = params_at(fixture, 4)
    ema, _, step = load_params(fixture, 4)
    assert step == 4
    assert_bit_identical(ema, saved["ema_params"])
    workdir = tmp_path / "w"
    shutil.copytree(fixture, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    resumed = summary(run_train(workdir, "--steps", "4"))
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4
    errors = jax.tree_util.tree_map(rel_error, without_key_biases(params_at(workdir, 4)), without_key_biases(saved))
    assert max(jax.tree_util.tree_leaves(errors)) <= 1e-5
