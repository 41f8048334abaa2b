"""The public API: every exported name, the version, a light `import unet_flax`, and the module paths of
earlier releases forwarding, with a warning, to where their names and commands live now."""
import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
import warnings

import numpy as np
import pytest
from commands import ROOT

import unet_flax
from unet_flax.moved import MOVED_COMMANDS, MOVED_NAMES, REMOVED_IN, run_moved_command


def test_every_exported_name_resolves_to_the_object_of_its_module():
    for name in unet_flax.__all__:
        assert getattr(unet_flax, name) is not None, name
    assert unet_flax.train is importlib.import_module("unet_flax.train_loop").train
    assert unet_flax.run is importlib.import_module("unet_flax.samplers").run
    assert unet_flax.to_diffusers is importlib.import_module("unet_flax.diffusers_format").to_diffusers
    assert set(unet_flax.__all__) <= set(dir(unet_flax))
    with pytest.raises(AttributeError, match="has no attribute 'nowhere'"):
        unet_flax.nowhere


def test_the_version_is_the_installed_metadata_s():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert unet_flax.__version__ == importlib.metadata.version("unet_flax") == project["version"]


def test_importing_the_package_imports_neither_torch_nor_the_training_stack():
    heavy = ["torch", "transformers", "diffusers", "orbax", "grain", "tensorboardX", "sklearn"]
    code = f"import sys, unet_flax; loaded = [m for m in {heavy!r} if m in sys.modules]; assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("old,name,new", [(old, name, new) for old, names in MOVED_NAMES.items()
                                          for name, new in names.items()])
def test_an_old_module_path_warns_and_forwards(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"^{old}\.{name} has moved to {new}\.{name}; .*{REMOVED_IN}"):
        forwarded = getattr(importlib.import_module(old), name)
    assert forwarded is getattr(importlib.import_module(new), name)


def test_from_import_of_an_old_path_warns_at_the_importing_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("from unet_flax.convert import torch_to_flax", "user_script.py", "exec"), {})
    assert [(w.category, w.filename) for w in caught] == [(DeprecationWarning, "user_script.py")]
    with pytest.raises(ImportError, match="cannot import name 'nowhere'"):
        exec("from unet_flax.convert import nowhere", {})


@pytest.mark.parametrize("old,args", [("unet_flax.convert", ["export", "--help"]),
                                      ("unet_flax.input_pipeline", ["pack", "--help"]),
                                      ("unet_flax.evaluation", ["--help"])])
def test_an_old_command_warns_and_runs_the_new_one(old, args):
    """`python -m OLD ...` in a process of its own, with Python's default warning filters, as a user runs it."""
    new = MOVED_COMMANDS[old][0]
    done = subprocess.run([sys.executable, "-m", old, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout
    assert f"DeprecationWarning: python -m {old} has moved to python -m {new}" in done.stderr


def test_the_old_pack_command_packs(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", images=rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    with pytest.warns(DeprecationWarning, match="python -m unet_flax.scripts.pack"):
        code = run_moved_command("unet_flax.input_pipeline", ["pack", str(tmp_path / "images.npz"), "--out",
                                                              str(tmp_path / "shards"), "--image-size", "8",
                                                              "--workers", "1"])
    assert code == 0
    assert (tmp_path / "shards" / "unet_flax_records.json").exists()
