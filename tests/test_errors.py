"""Bad configurations and inputs fail at init or trace time with a ValueError naming the value."""
import ast
import graphlib
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unet_flax as uf
from unet_flax import UNet, UNetConfig

SMALL = dict(in_channels=3, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
             attention_resolutions=(4,), image_size=16, num_heads=2, num_groups=4)


def trace(model, *args):
    """Initialise abstractly: the errors must come from tracing, before any computation."""
    return jax.eval_shape(model.init, jax.random.key(0), *args)


def images(height=16, width=16, channels=3):
    return jnp.zeros((2, height, width, channels))


T = jnp.zeros(2)


@pytest.mark.parametrize("fields,message", [
    (dict(base_channels=12, num_groups=8), r"channels \(12\) must be divisible by num_groups \(8\)"),
    (dict(base_channels=4, num_groups=8, channel_mults=(2, 3), attention_resolutions=(8,)),
     r"channels \(12\) must be divisible by num_groups \(8\)"),
    (dict(attention_resolutions=(4, 6)), r"attention_resolutions 6 matches no level: the levels' feature maps are "
                                         r"16, 8, 4 wide \(image_size 16, 3 levels\)"),
    (dict(base_channels=16, num_heads=3), r"channels \(16\) must be divisible by num_heads \(3\)"),
    (dict(image_size=18), r"image_size 18 is not divisible by 2\*\*\(levels-1\) = 4"),
    (dict(dtype="float64"), r"dtype must be one of .* got 'float64'"),
    (dict(attention_impl="flash"), r"attention_impl must be one of .* got 'flash'"),
    (dict(norm_backward="remat"), r"norm_backward must be one of .* got 'remat'"),
    (dict(num_res_blocks=0), r"num_res_blocks must be a positive integer, got 0"),
    (dict(base_channels=16.0), r"base_channels must be an integer, got 16.0"),
    (dict(dropout=float("nan")), r"dropout must be a finite number, got nan"),
])
def test_bad_config(fields, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**SMALL, **fields})


def test_block_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match=r"channels \(12\) must be divisible by num_groups \(8\)"):
        trace(uf.ResidualBlock(16, num_groups=8), images(channels=12))
    with pytest.raises(ValueError, match=r"channels \(10\) must be divisible by num_groups \(4\)"):
        trace(uf.ResidualBlock(10, num_groups=4), images(channels=12))


def test_block_channels_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"channels \(12\) must be divisible by num_heads \(5\)"):
        trace(uf.AttentionBlock(num_heads=5, num_groups=4), images(channels=12))
    with pytest.raises(ValueError, match=r"channels \(12\) must be divisible by num_heads \(8\)"):
        trace(uf.CrossAttentionBlock(num_heads=8, num_groups=4), images(channels=12), jnp.zeros((2, 3, 4)))


def test_t_emb_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"t_emb has width 7, expected time_emb_dim=5"):
        trace(uf.ResidualBlock(8, 5, num_groups=4), images(channels=8), jnp.zeros((2, 7)))


@pytest.mark.parametrize("height,width,bad", [(16, 14, "width 14"), (10, 16, "height 10")])
def test_spatial_size_not_divisible(height, width, bad):
    with pytest.raises(ValueError, match=rf"input {bad} is not divisible by 2\*\*\(levels-1\) = 4"):
        trace(UNet(UNetConfig(**SMALL)), images(height, width), T)


def test_nchw_input_is_named():
    with pytest.raises(ValueError, match=r"has 16 channels .* expected in_channels=3.*looks like NCHW"):
        trace(UNet(UNetConfig(**SMALL)), jnp.zeros((2, 3, 16, 16)), T)


def test_rank_and_timestep_shape():
    with pytest.raises(ValueError, match=r"x must be NHWC .* got shape \(16, 16, 3\)"):
        trace(UNet(UNetConfig(**SMALL)), jnp.zeros((16, 16, 3)), T)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\), got \(3,\)"):
        trace(UNet(UNetConfig(**SMALL)), images(), jnp.zeros(3))


def test_labels_without_num_classes():
    with pytest.raises(ValueError, match=r"labels y were given, but the model has num_classes=None"):
        trace(UNet(UNetConfig(**SMALL)), images(), T, jnp.zeros(2, int))


@pytest.mark.parametrize("label", [-1, 11])
def test_label_out_of_range(label):
    """Concrete labels are checked (a traced label cannot be; train.py and sample.py check theirs)."""
    model = UNet(UNetConfig(**SMALL, num_classes=10))
    with pytest.raises(ValueError, match=rf"label {label} out of range: labels are 0..9, and 10 is the null label"):
        model.init(jax.random.key(0), images(), T, np.array([0, label]))


def test_context_without_context_dim():
    with pytest.raises(ValueError, match=r"context was given, but the model has context_dim=None"):
        trace(UNet(UNetConfig(**SMALL)), images(), T, None, jnp.zeros((2, 3, 4)))


def test_context_of_the_wrong_width_or_missing():
    model = UNet(UNetConfig(**SMALL, context_dim=6))
    with pytest.raises(ValueError, match=r"context must have shape \(batch, length, 6\), got \(2, 3, 4\)"):
        trace(model, images(), T, None, jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"context_dim=6: pass context of shape \(batch, length, 6\)"):
        trace(model, images(), T)


def package_imports() -> dict[str, set[str]]:
    """Each unet_flax module -> the unet_flax modules it imports, at its top or inside functions."""
    root = Path(uf.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join(parts + ([node.module] if node.module else []))
                submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
                imported |= submodules or ({base} & modules.keys())
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names} & modules.keys()
        graph[name] = imported - {name}
    return graph


def test_imports_point_one_way():
    """No module imports one that imports it back (directly or round a longer circle); no library module
    imports a command (unet_flax.scripts), and no command imports another."""
    graph = package_imports()
    assert "unet_flax.train_loop" in graph["unet_flax.scripts.train"]  # the parse sees the imports
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle
    commands = {name for name in graph if name.startswith("unet_flax.scripts.")}
    for name, imported in graph.items():
        assert not imported & commands, f"{name} imports the command {sorted(imported & commands)}"


def test_the_documented_import_chain_is_the_code_s():
    """docs/architecture.md's `Imports point one way: a <- b <- ...` line: each module imports the one before
    it (directly or through others), never the one after it."""
    graph = package_imports()
    readme = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    sentence = re.search(r"^Imports point one way: ([^;]+);", readme, re.M | re.S).group(1)
    chain = [f"unet_flax.{name}" for name in re.findall(r"`([a-z_.]+)`", sentence)]
    assert len(chain) >= 5, sentence

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == goal or name.startswith(goal + "."):
                return True
            if name not in seen:
                seen.add(name)
                todo += graph.get(name,
                                  set()) | ({n for n in graph if n.startswith(name + ".")} if name == start else set())
        return False
    for lower, upper in zip(chain, chain[1:]):
        assert reaches(upper, lower), f"{upper} does not import {lower}"
        assert not reaches(lower, upper), f"{lower} imports {upper}"
