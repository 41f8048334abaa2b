"""Helpers for comparing the Flax modules with the PyTorch reference."""
import jax
import numpy as np
import torch

from unet_flax.torch_format import torch_to_flax


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Non-default weights, so a transposed kernel, a swapped axis or an ignored bias cannot hide:
    normal(0, std) everywhere, GroupNorm scales 1 + normal(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator) * std
                offset = 1.0 if isinstance(sub, torch.nn.GroupNorm) and name == "weight" else 0.0
                param.copy_(offset + noise)
    return module


def flax_params(torch_module: torch.nn.Module, flax_module, *example_args) -> dict:
    """The torch module's weights as Flax params, checked key by key against the Flax module's own."""
    target = jax.eval_shape(flax_module.init, jax.random.key(0), *example_args)
    return torch_to_flax(torch_module.state_dict(), target)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    # An all-zero reference (an unused parameter's gradient) makes this the absolute error.
    scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
    return float(np.abs(actual - expected).max() / scale)


def torch_grads_as_flax(torch_module: torch.nn.Module) -> dict:
    # torch leaves .grad None on a parameter the forward did not use; its gradient is zero.
    return torch_to_flax({name: torch.zeros_like(p) if p.grad is None else p.grad
                          for name, p in torch_module.named_parameters()})


def without_key_biases(params):
    """The params with the attention key biases zeroed, for comparing two training runs.

    softmax(q . (k + b)) = softmax(q . k): a key bias shifts every logit of a query equally, so its
    true gradient is exactly zero. Adam divides that zero's rounding noise (~1e-9) by its own
    magnitude and takes full +-lr steps, which differ between any two summation orders (devices,
    frameworks) while changing no output. Tests compare every other parameter, and the outputs.
    """
    def mask(path, value):
        names = [getattr(k, "key", None) for k in path]
        value = np.array(value)
        if names[-2:] == ["to_qkv", "bias"]:
            third = value.shape[0] // 3
            value[third:2 * third] = 0
        elif names[-2:] == ["to_kv", "bias"]:
            value[:value.shape[0] // 2] = 0
        return value
    return jax.tree_util.tree_map_with_path(mask, params)
