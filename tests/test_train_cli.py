"""train.py as a user runs it: flags, resume, bit-exact continuation, sampling, export, errors
(several processes and signals: test_multiprocess.py). The run the others continue is a process of
its own; the rest run in this process (commands.run_main), and must continue it bit for bit."""
import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from commands import (
    ROOT,
    TINY,
    assert_bit_identical,
    import_command,
    params_at,
    run_main,
    run_process,
    run_sample,
    run_train,
    snapshot,
    summary,
)
from parity import rel_error, without_key_biases

from unet_flax import train_loop
from unet_flax.config import PRESETS, SamplerConfig, SamplingConfig
from unet_flax.errors import ConfigError
from unet_flax.sampling import class_labels


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_process("train.py", "--workdir", workdir, *TINY, "--steps", "6", "--save-every", "3", check=True)
    return workdir, summary(result)


def test_a_run_writes_what_it_promises(uninterrupted):
    workdir, final = uninterrupted
    assert final["step"] == 6 and final["resumed_from"] is None and final["workdir"] == str(workdir)
    assert np.isfinite(final["loss"]) and final["wall_s"] > 0
    for name in ("samples.png", "loss.png", "metrics.jsonl"):
        assert (workdir / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # every --log-every steps, and at each save
    assert tensorboard_scalars(workdir / "tensorboard", "train/loss") == [(r["step"], r["loss"]) for r in rows]
    assert {"loss", "grad_norm", "lr", "img_per_s"} <= rows[0].keys()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]


def tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the TensorBoard event files under `folder`: TFRecord framing (length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return scalars


def test_train_py_imports_neither_pytorch_nor_scikit_learn():
    """Seconds of every start (more with CUDA's PyTorch): the event writer and the digits without them."""
    check = ("import sys, train; from unet_flax import input_pipeline, train_loop; train_loop.summary_writer_class(); "
             "input_pipeline.load(None, 8); print(sorted({'torch', 'sklearn', 'scipy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["[]"], result.stdout + result.stderr


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory):
    """The uninterrupted run's first half (pmap, the default driver), to be resumed by the tests."""
    workdir = tmp_path_factory.mktemp("stopped_at_3")
    run_train(workdir, "--steps", "3", "--save-every", "3")
    return workdir


def test_interrupted_and_resumed_is_bit_identical(uninterrupted, stopped_at_3, tmp_path):
    """Stop at step 3, resume to step 6: the same bits as the run that was never stopped."""
    shutil.copytree(stopped_at_3, tmp_path, dirs_exist_ok=True)
    resumed = summary(run_train(tmp_path, "--steps", "6", "--save-every", "3"))
    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    assert_bit_identical(params_at(tmp_path, 6), params_at(uninterrupted[0], 6))


def test_resume_under_the_other_driver(uninterrupted, stopped_at_3, tmp_path):
    shutil.copytree(stopped_at_3, tmp_path, dirs_exist_ok=True)
    resumed = summary(run_train(tmp_path, "--steps", "6", "--save-every", "3", "--parallel", "jit"))
    assert resumed["resumed_from"] == 3
    errors = jax.tree_util.tree_map(rel_error, without_key_biases(params_at(tmp_path, 6)["params"]),
                                    without_key_biases(params_at(uninterrupted[0], 6)["params"]))
    assert max(jax.tree_util.tree_leaves(errors)) <= 1e-5  # the same run, up to summation order


def test_a_bfloat16_run_resumes_bit_identically(tmp_path):
    """A bfloat16 state's copy of its weights in bfloat16 is not saved: the resumed run casts the restored
    weights again and continues with the same bits."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    bf16 = ("--dtype", "bfloat16", "--weight-copy", "on", "--save-every", "1")
    run_train(whole, *bf16, "--steps", "3")
    run_train(stopped, *bf16, "--steps", "1")
    resumed = summary(run_train(stopped, *bf16, "--steps", "3"))
    assert resumed["resumed_from"] == 1 and resumed["step"] == 3
    saved = params_at(stopped, 3)
    assert "params" in saved and "compute_params" not in saved
    assert_bit_identical(saved, params_at(whole, 3))


def test_steps_at_or_below_the_checkpoint_train_nothing(uninterrupted):
    workdir, _ = uninterrupted
    before = snapshot(workdir)
    result = run_train(workdir, "--steps", "6")
    assert "already at step 6 >= --steps 6: nothing to train" in result.stderr
    assert snapshot(workdir) == before


def test_incompatible_resume_names_the_fields_and_changes_nothing(uninterrupted):
    workdir, _ = uninterrupted
    before = snapshot(workdir)
    result = run_train(workdir, "--steps", "9", "--base-channels", "12", "--seed", "4", check=False)
    assert result.returncode == 2
    assert "model.base_channels (8 -> 12)" in result.stderr and "seed (0 -> 4)" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(workdir) == before


def test_no_resume_refuses_a_workdir_with_checkpoints(uninterrupted):
    result = run_train(uninterrupted[0], "--steps", "9", "--no-resume", check=False)
    assert result.returncode == 1 and "holds checkpoints up to step 6" in result.stderr


def test_the_python_api_trains_what_train_py_trains(uninterrupted, tmp_path):
    """train_loop.train with a TrainConfig written in Python, not through a command line: the same bits
    as the `python train.py` process with TINY's flags."""
    digits = PRESETS["digits"]
    model = dataclasses.replace(digits.model, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4,
                                num_heads=2, attention_resolutions=(4,), image_size=8)
    config = dataclasses.replace(digits, model=model, batch_size=8, num_samples=10, sampling_steps=2, log_every=2,
                                 warmup_steps=2, lr_schedule="constant", steps=6, save_every=3)
    with jax.default_matmul_precision(None):  # a fresh process's, as train.py ran with
        result = train_loop.train(config, workdir=tmp_path)
    assert result["step"] == 6 and result["workdir"] == str(tmp_path) and (tmp_path / "samples.png").exists()
    assert_bit_identical(params_at(tmp_path, 6), params_at(uninterrupted[0], 6))


def test_installed_commands_are_the_scripts():
    """`pip install` gives the README's commands as unet-flax-train, -sample, -evaluate, -convert and -pack."""
    installed = {entry.name: entry for entry in importlib.metadata.entry_points(group="console_scripts")}
    for name, command in (("unet-flax-train", "train.py"), ("unet-flax-sample", "sample.py"),
                          ("unet-flax-evaluate", "evaluate.py"), ("unet-flax-convert", "unet_flax.scripts.convert"),
                          ("unet-flax-pack", "unet_flax.scripts.pack")):
        assert installed[name].load() is import_command(command).main, name
    result = subprocess.run([shutil.which("unet-flax-train"), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--preset" in result.stdout and "usage: unet-flax-train" in result.stdout


def test_help_lists_every_field():
    result = run_main("train.py", "--help", check=True)
    for flag in ("--preset", "--workdir", "--steps", "--batch-size", "--lr", "--parallel", "--dtype", "--seed",
                 "--data", "--image-size", "--class-conditional", "--save-every", "--sample-every",
                 "--resume", "--no-resume", "--channel-mults", "--ema-decay", "--min-snr-gamma"):
        assert flag in result.stdout, flag


def test_sample_is_reproducible_and_writes_npz(uninterrupted, tmp_path):
    workdir, _ = uninterrupted
    for name in ("a", "b"):
        run_sample(workdir, "--num-samples", "6", "--sampling-steps", "3", "--labels", "1,7", "--seed", "5",
                   "--npz", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.png"))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (6, 8, 8, 1) and a["images"].dtype == np.uint8
    assert a["labels"].tolist() == [1, 7, 1, 7, 1, 7]
    np.testing.assert_array_equal(a["images"], b["images"])
    assert (tmp_path / "a.png").stat().st_size > 0


def test_ddpm_sampler_runs_every_training_step(uninterrupted, tmp_path):
    result = json.loads(run_sample(uninterrupted[0], "--sampler", "ddpm", "--num-samples", "2", "--out",
                                   str(tmp_path / "d.png")).stdout.splitlines()[-1])
    assert result["sampler"] == "ddpm" and result["sampling_steps"] == 1000 and result["model_evaluations"] == 1000


@pytest.mark.parametrize("flags,message", [
    (["--labels", "3,12"], "label 12 out of range: this model has classes 0..9"),
    (["--step", "4"], "no checkpoint for step 4"),
    (["--sampling-steps", "0"], "sampling_steps must be a positive integer, got 0"),
    (["--eta", "nan"], "eta must be a finite number, got nan"),
    (["--sampling-steps", "1001"], "sampling_steps must be in 1..1000 (the model's timesteps), got 1001"),
    (["--labels", ","], "labels is empty: name at least one class"),
])
def test_sample_errors(uninterrupted, flags, message):
    result = run_sample(uninterrupted[0], *flags, check=False)
    assert result.returncode in (1, 2) and message in result.stderr and "Traceback" not in result.stderr


def test_sample_without_a_checkpoint_creates_nothing(tmp_path):
    result = run_sample(tmp_path / "missing", check=False)
    assert result.returncode == 1 and "no checkpoint in" in result.stderr
    assert not (tmp_path / "missing").exists()


def test_labels_for_an_unconditional_model():
    with pytest.raises(ConfigError, match="labels given, but this model is unconditional"):
        class_labels(SamplingConfig(labels=(1,)), None)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    """A learning rate of 1e30 sends the loss to inf within a few steps."""
    result = run_train(tmp_path, "--steps", "6", "--save-every", "1", "--lr", "1e30", "--warmup-steps", "0",
                       "--grad-clip", "0", check=False)
    assert result.returncode == 1 and "non-finite loss or gradient at step" in result.stderr, result.stderr[-2000:]
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad_step - 1
    state = params_at(tmp_path, max(saved))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state))


def test_export_to_pytorch_and_back(uninterrupted, tmp_path):
    """Export a trained checkpoint, load it into the reference: same denoiser outputs (1e-5) and
    DDIM from the same noise gives the same samples (1e-4); import it back: sample.py and train.py accept it."""
    import torch

    from unet_flax import UNet, reference, samplers
    from unet_flax.checkpoint import load_params
    from unet_flax.config import TrainConfig

    workdir, _ = uninterrupted
    out = tmp_path / "model.pt"
    run_main("unet_flax.scripts.convert", "export", "--workdir", workdir, "--out", out, check=True)
    config = TrainConfig.from_dict(json.loads(out.with_suffix(".json").read_text()))
    torch_model = reference.UNet(config.model).eval()
    torch_model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    params, _, _ = load_params(workdir)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 1)).astype(np.float32)
    t, y = np.array([0, 10, 500, 999]), np.array([0, 4, 9, 10])
    with jax.default_matmul_precision("highest"):
        flax_out = UNet(config.model).apply({"params": params}, x, t, y)
        with torch.no_grad():
            torch_out = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y))
        assert rel_error(flax_out, torch_out.numpy().transpose(0, 2, 3, 1)) <= 1e-5

        labels = np.array([1, 2, 3, 4])
        from unet_flax.sampling import guided_denoiser
        denoise = guided_denoiser(UNet(config.model), params, labels, 2.0)
        plan = samplers.make_plan(SamplerConfig("ddim"), 20, config.noise_schedule, config.timesteps, config.prediction)
        flax_samples = samplers.run(denoise, plan, x)
        torch_samples = reference.ddim_sample(torch_model, reference.alphas_cumprod(config.noise_schedule,
                                                                                    config.timesteps),
                                              torch.from_numpy(x.transpose(0, 3, 1, 2)), 20,
                                              torch.from_numpy(labels), guidance_scale=2.0)
        assert rel_error(flax_samples, torch_samples.numpy().transpose(0, 2, 3, 1)) <= 1e-4

    imported = tmp_path / "imported"
    run_main("unet_flax.scripts.convert", "import", "--state-dict", out, "--config", out.with_suffix(".json"),
             "--workdir", imported, check=True)
    restored, _, step = load_params(imported)
    assert step == 0
    assert_bit_identical(restored, params)
    run_sample(imported, "--num-samples", "2", "--sampling-steps", "2")
    assert summary(run_train(imported, "--steps", "2"))["resumed_from"] == 0


def test_export_refuses_to_overwrite(uninterrupted, tmp_path):
    out = tmp_path / "model.pt"
    out.write_text("precious")
    result = run_main("unet_flax.scripts.convert", "export", "--workdir", uninterrupted[0], "--out", out)
    assert result.returncode == 1 and "exists" in result.stderr and out.read_text() == "precious"


def test_training_on_packed_records(tmp_path):
    """`pack` an .npz into ArrayRecord shards; train.py reads them through grain worker processes."""
    rng = np.random.default_rng(3)
    # Ten classes: the network of the other tiny runs, whose programs are compiled.
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), labels=np.arange(40) % 10)
    run_main("unet_flax.scripts.pack", tmp_path / "d.npz", "--out", tmp_path / "packed", "--image-size", "8",
             "--examples-per-shard", "16", check=True)
    result = summary(run_train(tmp_path / "run", "--data", str(tmp_path / "packed"), "--class-conditional",
                               "--steps", "2", "--data-workers", "2"))
    assert result["step"] == 2 and np.isfinite(result["loss"])
    config = params_at(tmp_path / "run", 2)["params"]["label_embedding"]["embedding"]
    assert config.shape[0] == 11  # 10 classes from the packed labels, and the null label
