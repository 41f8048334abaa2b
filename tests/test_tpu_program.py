"""The train step compiled for a TPU slice (v5e, 2x2 chips) on a machine without a TPU
(benchmarks/tpu_aot.py): under FSDP each chip holds a share of the state, the gradients are
reduce-scattered and the parameters all-gathered, and the program fits the chip. Skipped unless libtpu is
installed (`pip install 'jax[tpu]==<jax's version>'`)."""
import dataclasses
import sys

import pytest
from commands import ROOT

pytest.importorskip("libtpu", reason="needs libtpu: pip install 'jax[tpu]'")
sys.path.insert(0, str(ROOT / "benchmarks"))
import tpu_aot  # noqa: E402

# Small: compiling for a TPU on a CPU takes about 30 s for this step.
MODEL = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
             num_groups=8, image_size=16)


@pytest.fixture(scope="module")
def reports(monkeypatch_module):
    cifar10 = tpu_aot.PRESETS["cifar10"]
    monkeypatch_module.setitem(tpu_aot.PRESETS, "small", dataclasses.replace(
        cifar10, model=dataclasses.replace(cifar10.model, **MODEL)))
    return {parallel: tpu_aot.analyse(tpu_aot.Case("small", "v5e:2x2", parallel, 16)) for parallel in ("jit", "fsdp")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_fsdp_holds_a_share_of_the_state_per_chip(reports):
    replicated, sharded = (reports[p]["per_chip_bytes"]["arguments"] for p in ("jit", "fsdp"))
    assert sharded < replicated / 2, (sharded, replicated)
    assert reports["fsdp"]["fits"] and reports["jit"]["fits"]


def test_fsdp_gathers_parameters_and_scatters_gradients(reports):
    collectives = reports["fsdp"]["collectives"]
    assert collectives["all-gather"]["count"] > 0 and collectives["reduce-scatter"]["count"] > 0, collectives
    assert reports["jit"]["collectives"]["all-gather"]["count"] == 0
