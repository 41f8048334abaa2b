"""bench.py as a user runs it, shortened to one timed step: both JAX variants and PyTorch are timed
and the JSON carries the fields docs/benchmarks.md is built from."""
import json
import subprocess
import sys

from commands import ROOT


def test_bench_digits_cpu_writes_the_documented_json(tmp_path):
    out = tmp_path / "digits.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "digits", "--steps", "1",
                             "--cpu-devices", "2", "--no-sampling", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    run = json.loads(out.read_text())["runs"]["float32"]
    assert run["timed"] == ["jax_1-device", "jax_2-cpu-devices", "torch_eager"]
    for name in run["timed"]:
        assert run[f"{name}_step_s"] > 0 and len(run[f"{name}_step_s_repeats"]) == 2
        assert abs(run[f"{name}_img_per_s"] * run[f"{name}_step_s"] - 64) < 1e-6
    assert run["jax_step_s"] == min(run["jax_1-device_step_s"], run["jax_2-cpu-devices_step_s"])
    assert summary["jax_over_torch_step_time"] == run["jax_step_s"] / run["torch_step_s"]
    assert summary["jax_compile_s"] > 0 and run["jax_flops_per_step"] > 1e9
