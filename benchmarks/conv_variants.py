"""A 3x3 convolution three ways on the XLA CPU backend: its conv emitter, im2col + matmul, and 9 shifted matmuls.

    python benchmarks/conv_variants.py
"""
import time, statistics, jax, jax.numpy as jnp, numpy as np
def tm(f, n=15):
    f(); f(); ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
def conv_xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1,1), ((1,1),(1,1)), dimension_numbers=('NHWC','HWIO','NHWC'))
def conv_im2col(x, w):
    b, h, ww, c = x.shape
    xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
    patches = jnp.concatenate([xp[:, i:i+h, j:j+ww, :] for i in range(3) for j in range(3)], axis=-1)
    return (patches.reshape(-1, 9*c) @ w.reshape(9*c, -1)).reshape(b, h, ww, -1)
def conv_shift_sum(x, w):
    b, h, ww, c = x.shape
    xp = jnp.pad(x, ((0,0),(1,1),(1,1),(0,0)))
    return sum(jnp.einsum('bhwc,cd->bhwd', xp[:, i:i+h, j:j+ww, :], w[i, j]) for i in range(3) for j in range(3))
for (H, C) in [(16, 32), (8, 64), (4, 64)]:
    w = np.random.randn(3,3,C,C).astype(np.float32); x = np.random.randn(64,H,H,C).astype(np.float32)
    ref = conv_xla(x, w)
    for name, f in [("xla", conv_xla), ("im2col", conv_im2col), ("shift", conv_shift_sum)]:
        fw = jax.jit(f); g = jax.jit(jax.grad(lambda w, x: jnp.sum(f(x, w)**2), argnums=(0,1)))
        err = float(jnp.abs(fw(x, w) - ref).max())
        print(f"{H}x{H}x{C} {name:7s} fwd {tm(lambda: fw(x, w).block_until_ready()):.2f} ms grad {tm(lambda: jax.block_until_ready(g(w, x))):.2f} ms err {err:.1e}")
