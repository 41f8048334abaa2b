"""The bf16 train step as XLA compiles it for an H100, on a machine without one (benchmarks/h100_aot.py):
attention in cuDNN's fused kernels, no layout changes or float32 feature maps, the scratch memory it
needs. Skipped unless the CUDA plugin is installed (`pip install 'jax[cuda12]==<jax's version>'`)."""
import dataclasses
import math
import sys

import jax
import pytest
from commands import ROOT

pytest.importorskip("jax_plugins.xla_cuda12", reason="needs the CUDA plugin: pip install 'jax[cuda12]'")
sys.path.insert(0, str(ROOT / "benchmarks"))
import h100_aot  # noqa: E402

BATCH = 16
# Attention at both levels, heads of 16 and 32 channels (sizes cuDNN takes); dropout on. Small, as the
# compilation for a GPU on a CPU takes about a minute for its ~1,000 kernels.
MODEL = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(16, 8),
             num_heads=2, num_groups=8, image_size=16, dropout=0.1)
ATTENTION_BLOCKS = 3 + 3 + 1  # per level 1 encoder and 2 decoder blocks; the middle
# XLA's scratch memory for this step (jax 0.12.0.1): 19.9 MB with GroupNorm -> modulation -> SiLU -> dropout
# fused, its backward pass recomputing the activation's slope; 24.2 MB keeping that slope (2 bytes a value),
# 20.6 MB with a GroupNorm-only custom_vjp, 24.8 MB when JAX differentiated GroupNorm op by op.
TEMP_BYTES_BOUND = 21e6


@pytest.fixture(scope="module")
def report():
    config = h100_aot.compiled_config("cifar10", BATCH, "bfloat16")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **MODEL))
    with jax.default_matmul_precision("default"):
        compiled = h100_aot.lower_train_step(config, h100_aot.gpu_device("H100")).compile()
    return h100_aot.program_report(compiled, BATCH)


def test_attention_is_cudnn_fused_forward_and_backward(report):
    assert report["attention"] == {"cudnn_fmha_forward": ATTENTION_BLOCKS, "cudnn_fmha_backward": ATTENTION_BLOCKS,
                                   "xla_softmax_fusions": 0}


def test_no_layout_changes_and_no_float32_feature_maps(report):
    convolutions = sum(report["custom_calls"].get(kind, 0) for kind in h100_aot.CONVOLUTION_CALLS)
    assert convolutions >= 3 * 9  # forward, input and filter gradients of each 3x3 conv, in cuDNN
    assert report["layout_changes_around_convolutions"] == []
    assert report["layout_changes_on_activations"] == []
    # Float32 (B, H, W, C) arrays besides the images' own (C = 3): only where XLA's cost model computes the
    # operand of a backward sum apart, for sums of few outputs (the up blocks' first GroupNorm here: 3 maps,
    # 2.5 MB). JAX differentiating GroupNorm op by op wrote 23 float32 feature maps of 32 to 128 channels per
    # step; with GroupNorm's two backward sums as two reductions, XLA wrote one per GroupNorm (20).
    feature_maps = {shape: n for shape, n in report["float32_activations"].items()
                    if h100_aot.dims(shape)[1] == h100_aot.dims(shape)[2] and h100_aot.dims(shape)[3] != 3}
    assert sum(4 * n * math.prod(h100_aot.dims(shape)) for shape, n in feature_maps.items()) <= 3e6, feature_maps
    assert sum(report["float32_activations"].values()) <= 30, report["float32_activations"]


def test_dropout_draws_its_mask_where_it_is_used(report):
    """No activation-sized random bits or masks written between kernels: dropout's mask is drawn inside the
    fused GroupNorm's kernel (22 boolean masks per step on the cifar10 preset before)."""
    assert report["integer_activations"] == {}


def test_scratch_memory_within_bound(report):
    assert report["memory_bytes"]["temp"] <= TEMP_BYTES_BOUND, report["memory_bytes"]


def test_the_update_writes_the_donated_state_in_place(report):
    """No copies of optimiser state, parameters or EMA: the update runs in the state's own layout, which XLA
    chooses (157 copies per step on this U-Net before the gradients' layout was set; the one left is the
    step counter's)."""
    assert report["other_kernels"].get("copy", 0) <= 1, report["other_kernels"]


def test_kernels_and_traffic_within_bounds(report):
    """Kernels launched and bytes moved by memory-bound kernels per step (jax 0.12.0.1): 1027 kernels and
    0.165 GB before GroupNorm's block was fused; 878 after it and the gradients' layout; 797 and 0.132 GB with
    the state in XLA's layout and the small leaves' gradient norm as one sum; 811 and 0.127 GB with the
    activation's slope recomputed and the norm's sums per leaf over all but the last axis; 795 with each
    dropout layer's seed the last word of its key; 790 with no zeros passed for a GroupNorm's missing scale
    and shift; 714 and 0.126 GB with the weights' bf16 copy in the state (no cast of each weight every step)
    and one dropout key for the whole U-Net. A regression shows here."""
    assert report["kernels"] <= 720, report["kernels"]
    assert report["bytes"]["memory_kernels"] <= 0.130e9, report["bytes"]
