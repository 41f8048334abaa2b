"""Bad input across train.py, sample.py, evaluate.py, bench.py and the convert CLI: a one-line message naming the
bad value, exit code 2 for usage errors and 1 for failures, no traceback (unless --debug), and nothing
in the workdir overwritten or deleted.

The table runs each command's `main(argv)` in this process (commands.run_main); the tests below it
start real processes, whose tracebacks are what they check."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from commands import ROOT, TINY, run_main, run_process, run_train, snapshot


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    trained = root / "trained"
    run_train(trained, "--steps", "2", "--save-every", "2")
    (root / "empty").mkdir()
    np.savez(root / "no_images.npz", pictures=np.zeros((4, 8, 8, 1), np.uint8))
    np.savez(root / "float.npz", images=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(root / "rank3.npz", images=np.zeros((4, 8, 8), np.uint8))
    np.savez(root / "unlabelled.npz", images=np.zeros((8, 8, 8, 1), np.uint8))
    (root / "corrupt.json").write_text('{"model": {"in_channels": 1,')
    for name, channels in (("empty_channels", []), ("zero_channels", [0, 32])):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel",
                                                             "block_out_channels": channels}))
    (root / "pndm_pipeline" / "unet").mkdir(parents=True)
    (root / "pndm_pipeline" / "scheduler").mkdir()
    (root / "pndm_pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (root / "pndm_pipeline" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (root / "pndm_pipeline" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", "skip_prk_steps": True}))
    (root / "corrupt_diffusers").mkdir()
    (root / "corrupt_diffusers" / "config.json").write_text("{'_class_name': 'UNet2DModel'}")
    run_main(CONVERT, "export", "--workdir", trained, "--out", root / "model.pt", check=True)
    state_dict = torch.load(root / "model.pt", weights_only=True)
    missing = dict(state_dict)
    del missing["conv_out.weight"]
    torch.save(missing, root / "missing.pt")
    torch.save({**state_dict, "extra.weight": torch.zeros(2, 2)}, root / "extra.pt")
    torch.save({**state_dict, "conv_in.weight": torch.zeros(8, 2, 3, 3)}, root / "misshaped.pt")
    torch.save({"model": state_dict, "step": 2}, root / "checkpoint.pt")
    torch.save({"weight": _RunsCode()}, root / "runs_code.pt")
    (root / "foreign_diffusers").mkdir()
    (root / "foreign_diffusers" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel",
                                                                        "sample_size": 32}))
    torch.save([torch.zeros(2)], root / "foreign_diffusers" / "diffusion_pytorch_model.bin")
    return root


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


T, CONVERT = "train.py", "unet_flax.scripts.convert"
CASES = [
    # (script, args, exit code, message); {root} is the fixture's folder, {w} a fresh workdir
    (T, ["--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    (T, ["--preset", "imagenet"], 2, "invalid choice: 'imagenet'"),
    (T, ["--parallel", "vmap"], 2, "argument --parallel: invalid choice: 'vmap'"),
    (T, ["--mesh", "data=2,model=2"], 2, "mesh must be like data=2,fsdp=4 (axes data and fsdp, each once, sizes "
                                         "positive integers), got 'data=2,model=2'"),
    (T, ["--mesh", "data=3"], 2, "mesh data=3 has 3 x 1 = 3 devices; there are 4"),
    (T, ["--mesh", "fsdp=2", "--parallel", "pmap"], 2, "mesh fsdp=2 is fsdp's: pass --parallel fsdp (or leave "
                                                        "--parallel out), got parallel 'pmap'"),
    (T, ["--lr", "fast"], 2, "argument --lr: invalid value 'fast'"),
    (T, ["--batch-size", "6"], 2, "batch size 6 is not divisible by the 4 devices"),
    (T, ["--image-size", "7"], 2, "image_size 7 is not divisible by 2**(levels-1) = 2"),
    (T, ["--base-channels", "12", "--num-groups", "8"], 2, "channels (12) must be divisible by num_groups (8)"),
    (T, ["--num-heads", "3"], 2, "channels (8) must be divisible by num_heads (3)"),
    (T, ["--data", "{root}/nowhere"], 1, "data path '{root}/nowhere' does not exist"),
    (T, ["--data", "{root}/empty"], 1, "{root}/empty holds no images (files Pillow reads: .png"),
    (T, ["--data", "{root}/no_images.npz"], 1, "has no 'images' array (found: pictures)"),
    (T, ["--data", "{root}/float.npz"], 1, "'images' must be uint8 NHWC with 1 or 3 channels, got float32"),
    (T, ["--data", "{root}/rank3.npz"], 1, "got uint8 with shape (4, 8, 8)"),
    (T, ["--data", "{root}/unlabelled.npz", "--class-conditional"], 2,
     "class_conditional needs labels, and {root}/unlabelled.npz has none"),
    (T, ["--workdir", "{root}/model.pt/run"], 1, "cannot create workdir {root}/model.pt/run"),
    (T, ["--lr", "0"], 2, "lr must be positive, got 0.0"),
    (T, ["--ema-decay", "1"], 2, "ema_decay must be in [0, 1), got 1.0"),
    (T, ["--adam-b1", "-0.5"], 2, "adam_b1 must be in [0, 1), got -0.5"),
    (T, ["--adam-b2", "1.5"], 2, "adam_b2 must be in [0, 1), got 1.5"),
    (T, ["--min-snr-gamma", "0"], 2, "min_snr_gamma must be positive or None, got 0.0"),
    (T, ["--weight-decay", "-0.1"], 2, "weight_decay must be >= 0, got -0.1"),
    (T, ["--grad-clip", "-1"], 2, "grad_clip must be >= 0, got -1.0"),
    (T, ["--attention-resolutions", "3"], 2, "attention_resolutions 3 matches no level: the levels' feature maps "
                                             "are 8, 4 wide (image_size 8, 2 levels)"),
    ("sample.py", ["--workdir", "{root}/trained", "--labels", "3,12"], 2, "label 12 out of range"),
    ("sample.py", ["--workdir", "{root}/nowhere"], 1, "no checkpoint in {root}/nowhere/checkpoints"),
    ("sample.py", ["--workdir", "{root}/trained", "--num-samples", "0"], 2,
     "num_samples must be a positive integer, got 0"),
    ("sample.py", ["--workdir", "{root}/trained", "--sampler", "plms"], 2,
     "argument --sampler: invalid choice: 'plms'"),
    ("sample.py", ["--workdir", "{root}/trained", "--sampler", "euler_ancestral", "--use-karras-sigmas"], 2,
     "use_karras_sigmas = True does not apply to sampler 'euler_ancestral': it is read by dpm_solver, euler, heun, "
     "unipc"),
    ("sample.py", ["--workdir", "{root}/trained", "--sampler", "unipc", "--solver-order", "4"], 2,
     "solver_order must be in [1, 3], got 4"),
    ("sample.py", ["--workdir", "{root}/trained", "--sampler", "dpm_solver", "--sampling-steps", "1000"], 2,
     "sampling_steps 1000 gives dpm_solver (linspace spacing) two steps at the same noise level over the model's "
     "1000 timesteps: use fewer steps"),
    ("evaluate.py", ["--workdir", "{root}/nowhere"], 1, "no checkpoint in {root}/nowhere/checkpoints"),
    ("evaluate.py", ["--workdir", "{root}/trained", "--num-samples", "1"], 2,
     "num_samples must be >= 2 for a Frechet distance, got 1"),
    ("evaluate.py", ["--workdir", "{root}/trained", "--sampling-steps", "2000"], 2,
     "sampling_steps must be in 1..1000 (the model's timesteps), got 2000"),
    ("bench.py", ["--cpu-devices", "0"], 2, "--cpu-devices must be >= 1, got 0"),
    ("bench.py", ["--steps", "0"], 2, "--steps must be >= 1, got 0"),
    (CONVERT, ["export", "--workdir", "{root}/trained", "--out", "{root}/model.pt"], 1, "{root}/model.pt exists"),
    (CONVERT, ["import", "--state-dict", "{root}/missing.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     2, "missing key 'conv_out.weight'"),
    (CONVERT, ["import", "--state-dict", "{root}/extra.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     2, "unknown key 'extra.weight' with shape (2, 2)"),
    (CONVERT, ["import", "--state-dict", "{root}/misshaped.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     2, "key 'conv_in.weight' has shape (8, 2, 3, 3), the model expects (8, 1, 3, 3)"),
    (CONVERT, ["import", "--state-dict", "{root}/nowhere.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     1, "nowhere.pt"),
    (CONVERT, ["import", "--state-dict", "{root}/runs_code.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     2, "{root}/runs_code.pt is not a file of tensors that loads without running code (torch.load with "
        "weights_only=True: Unsupported global: GLOBAL "),
    (CONVERT, ["import", "--state-dict", "{root}/checkpoint.pt", "--config", "{root}/model.json", "--workdir", "{w}"],
     2, "{root}/checkpoint.pt is not a state_dict: model, step hold no tensors (a training checkpoint? pass its "
        "model's state_dict)"),
    (CONVERT, ["import-diffusers", "--model", "{root}/foreign_diffusers", "--workdir", "{w}"], 2,
     "{root}/foreign_diffusers/diffusion_pytorch_model.bin holds a list, not a state_dict"),
    (CONVERT, ["import", "--state-dict", "{root}/model.pt", "--config", "{root}/model.json",
                 "--workdir", "{root}/trained"], 1, "already holds checkpoints"),
    (CONVERT, ["import", "--state-dict", "{root}/model.pt", "--config", "{root}/corrupt.json", "--workdir", "{w}"],
     2, "--config {root}/corrupt.json is not valid JSON (Expecting property name enclosed in double quotes at "
        "line 1, column 29)"),  # just after the 28 characters written
    (CONVERT, ["import-diffusers", "--model", "{root}/pndm_pipeline", "--workdir", "{w}"], 2,
     "scheduler PNDMScheduler cannot be expressed: unet_flax's samplers equal DDIMScheduler, DDPMScheduler, "
     "DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, "
     "UniPCMultistepScheduler"),
    (CONVERT, ["export-diffusers", "--workdir", "{root}/trained", "--out", "{w}", "--pipeline"], 2,
     "a class-conditional model cannot be a DDPMPipeline (it passes no class labels): export the U-Net alone "
     "(without --pipeline)"),
    (CONVERT, ["export-diffusers", "--workdir", "{root}/trained", "--out", "{w}", "--use-karras-sigmas"], 2,
     "--use-karras-sigmas chooses the scheduler of a pipeline: add --pipeline (a lone UNet2DModel has none)"),
    (CONVERT, ["import-diffusers", "--model", "{root}/corrupt_diffusers", "--workdir", "{w}"], 2,
     "diffusers config {root}/corrupt_diffusers/config.json is not valid JSON"),
    (CONVERT, ["import-diffusers", "--model", "{root}/empty_channels", "--workdir", "{w}"], 2,
     "block_out_channels = []: must be a non-empty list of positive channel counts"),
    (CONVERT, ["import-diffusers", "--model", "{root}/zero_channels", "--workdir", "{w}"], 2,
     "block_out_channels = [0, 32]: must be a non-empty list"),
]


@pytest.mark.parametrize("script,args,code,message", CASES, ids=[f"{c[0]} {' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input(files, tmp_path, script, args, code, message):
    fill = {"root": str(files), "w": str(tmp_path / "w")}
    args = [a.format(**fill) for a in args]
    if script == T and "--workdir" not in args:
        args = ["--workdir", str(tmp_path / "w"), *TINY, *args]
    before = snapshot(files / "trained")
    result = run_main(script, *args)
    assert result.returncode == code, result.stderr[-2000:]
    assert message.format(**fill) in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert snapshot(files / "trained") == before
    assert not (tmp_path / "w" / "checkpoints").exists() or script == T  # a refused import creates nothing


NON_FINITE = [("--lr", "inf"), ("--weight-decay", "inf"), ("--adam-eps", "inf"), ("--grad-clip", "nan"),
              ("--ema-decay", "nan"), ("--min-snr-gamma", "inf"), ("--guidance-scale", "inf"), ("--dropout", "nan"),
              ("--norm-eps", "inf"), ("--mid-block-scale-factor", "inf")]


@pytest.mark.parametrize("flag,value", NON_FINITE, ids=[f"{f} {v}" for f, v in NON_FINITE])
def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path, flag, value):
    """inf and NaN pass a check written as a comparison the wrong way round (`not lr > 0` lets inf in):
    each numeric field goes through unet_config.check_range, one line naming the field, exit 2, no workdir."""
    result = run_main(T, "--workdir", str(tmp_path / "w"), *TINY, flag, value)
    field = flag[2:].replace("-", "_")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field} must be a finite number"), lines
    assert lines[0].endswith(f", got {float(value)!r}"), lines
    assert not (tmp_path / "w").exists()


def test_distributed_without_a_coordinator_or_cluster(tmp_path):
    """A process of its own: JAX joins a job only before its backends start, which this one's have."""
    result = run_process("train.py", "--workdir", tmp_path, *TINY, "--distributed")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --distributed: coordinator_address should be defined. JAX found no cluster to read it from: pass "
        "--coordinator-address HOST:PORT --num-processes N --process-id I"]
    assert not tmp_path.joinpath("checkpoints").exists()


def test_debug_shows_the_traceback(files, tmp_path):
    result = run_process(T, "--workdir", tmp_path / "w", *TINY, "--data", files / "nowhere", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "DataError" in result.stderr


def test_an_internal_error_keeps_its_traceback(tmp_path):
    """A ValueError from inside the program (here injected into the data pipeline) is no user mistake:
    it is not shortened to a usage line but shows its traceback, exit code 1."""
    inject = ("import sys, train; from unet_flax import input_pipeline\n"
              "def broken(*args, **kwargs): raise ValueError('internal: shapes disagree')\n"
              "input_pipeline.make_dataset = broken\n"
              "sys.exit(train.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", inject, "--workdir", str(tmp_path / "w"), *TINY, "--steps", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: internal: shapes disagree" in result.stderr
    assert "error: internal" not in result.stderr
