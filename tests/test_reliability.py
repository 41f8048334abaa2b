"""Damaged checkpoints: resume falls back to the newest good one with a warning naming the damaged
one, keeps it (renamed N.damaged), and never starts from scratch silently."""
import shutil

import pytest

from test_train_cli import run_train, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    run_train(workdir, "--steps", "4", "--save-every", "2")
    return workdir


def _damage(step_dir, how):
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "file deleted":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "bytes overwritten":
        biggest = files[-1]
        data = bytearray(biggest.read_bytes())
        data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
        biggest.write_bytes(bytes(data))
        for f in files:
            if f.name == "_METADATA":
                f.write_text("{ not json")
    elif how == "step directory truncated":
        shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["file deleted", "bytes overwritten", "step directory truncated"])
def test_resume_falls_back_past_a_damaged_checkpoint(trained, tmp_path, how):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    _damage(workdir / "checkpoints" / "4", how)
    result = run_train(workdir, "--steps", "6", "--save-every", "2")
    assert "warning: checkpoint step 4 is damaged" in result.stderr and "4.damaged" in result.stderr
    assert summary(result)["resumed_from"] == 2
    assert (workdir / "checkpoints" / "4.damaged").is_dir()  # kept
    assert (workdir / "checkpoints" / "6").is_dir()


def test_all_checkpoints_damaged_stops_and_keeps_them(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for step in (2, 4):
        _damage(workdir / "checkpoints" / str(step), "step directory truncated")
    result = run_train(workdir, "--steps", "6", check=False)
    assert result.returncode == 1 and "no checkpoint in" in result.stderr and "could be restored" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if "damaged" in p.name) == \
        ["2.damaged", "4.damaged"]
