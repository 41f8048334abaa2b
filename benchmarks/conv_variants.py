"""One 3x3 convolution (stride 1, padding 1, NHWC) written four ways for XLA:CPU, against PyTorch's.

    python benchmarks/conv_variants.py

XLA's convolution; im2col (9 shifted copies concatenated, one matmul); a sum of 9 shifted 1x1
matmuls; Winograd F(2x2, 3x3) (16 batched matmuls on transformed 4x4 tiles: 2.25x fewer
multiplications). Each prints its forward and forward+backward medians (ms) and its largest
difference from XLA's convolution relative to the output's largest value; PyTorch's conv2d (oneDNN)
on the same shapes closes each block.
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(64, 16, 32), (64, 8, 64), (64, 4, 64), (8, 32, 128)]  # (batch, height = width, channels)


def median_ms(fn, calls: int = 15) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def conv_xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, w):
    b, h, width, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + width] for i in range(3) for j in range(3)], axis=-1)
    return (patches.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(b, h, width, -1)


def conv_shifted_matmuls(x, w):
    _, h, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i:i + h, j:j + width] @ w[i, j] for i in range(3) for j in range(3))


def _winograd_data(d):  # B^T d B along one axis: rows of 4 -> 4
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_kernel(g):  # G g G^T along one axis: rows of 3 -> 4
    return [g[0], (g[0] + g[1] + g[2]) * 0.5, (g[0] - g[1] + g[2]) * 0.5, g[2]]


def _winograd_output(m):  # A^T m A along one axis: rows of 4 -> 2
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def conv_winograd(x, w):
    b, h, width, c = x.shape
    tiles_h, tiles_w = -(-h // 2), -(-width // 2)
    padded = jnp.pad(x, ((0, 0), (1, 2 * tiles_h - h + 1), (1, 2 * tiles_w - width + 1), (0, 0)))
    rows = _winograd_data([padded[:, i:i + 2 * tiles_h:2] for i in range(4)])
    tiles = [v for r in rows for v in _winograd_data([r[:, :, j:j + 2 * tiles_w:2] for j in range(4)])]
    data = jnp.stack(tiles).reshape(16, b * tiles_h * tiles_w, c)
    kernel = jnp.stack([v for r in _winograd_kernel(list(w)) for v in _winograd_kernel(list(r))])
    products = jnp.einsum("knc,kcd->knd", data, kernel).reshape(4, 4, b, tiles_h, tiles_w, -1)
    out_rows = jnp.stack(_winograd_output(list(products)))
    out = jnp.stack(_winograd_output([out_rows[:, j] for j in range(4)]), axis=1)
    return out.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * tiles_h, 2 * tiles_w, -1)[:, :h, :width]


def main() -> None:
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    for batch, size, channels in SHAPES:
        x = rng.standard_normal((batch, size, size, channels), np.float32)
        w = (rng.standard_normal((3, 3, channels, channels)) * 0.1).astype(np.float32)
        with jax.default_matmul_precision("highest"):
            reference = jax.jit(conv_xla)(x, w)
            for name, conv in [("xla", conv_xla), ("im2col", conv_im2col), ("shifted", conv_shifted_matmuls),
                               ("winograd", conv_winograd)]:
                forward = jax.jit(conv)
                grad = jax.jit(jax.grad(lambda w, x, conv=conv: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
                error = float(jnp.abs(forward(x, w) - reference).max() / jnp.abs(reference).max())
                print(f"{batch}x{size}x{size}x{channels} {name:9s} forward "
                      f"{median_ms(lambda: forward(x, w).block_until_ready()):7.2f}  forward+backward "
                      f"{median_ms(lambda: jax.block_until_ready(grad(w, x))):7.2f}  error {error:.1e}")
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()

        def torch_grad():
            conv.zero_grad()
            x_torch.grad = None
            (conv(x_torch) ** 2).sum().backward()
        with torch.no_grad():
            torch_forward = median_ms(lambda: conv(x_torch))
        print(f"{batch}x{size}x{size}x{channels} {'pytorch':9s} forward {torch_forward:7.2f}  forward+backward "
              f"{median_ms(torch_grad):7.2f}")


if __name__ == "__main__":
    main()
