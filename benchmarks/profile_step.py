"""Where the train step's time goes: UNet forward and gradient, and one 3x3 convolution, JAX vs PyTorch (CPU).

    PYTHONPATH=. python benchmarks/profile_step.py
"""
import time, statistics, jax, jax.numpy as jnp, numpy as np, torch
import bench
from unet_flax import UNet, reference
from unet_flax.convert import flax_to_torch
torch.set_num_threads(2)
def tm(f, n=10):
    f(); f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return statistics.median(ts)*1e3
config = bench.bench_config("digits", None, "float32")
m = config.model
model = UNet(m)
x = np.random.randn(64, 16, 16, 1).astype(np.float32); t = np.random.randint(0,1000,64); y = np.random.randint(0,10,64)
params = model.init(jax.random.PRNGKey(0), x, t, y)["params"]
fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, t, y))
grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x, t, y)**2)))
print("jax fwd", tm(lambda: fwd(params, x).block_until_ready()))
print("jax grad", tm(lambda: jax.block_until_ready(grad(params, x))))
tmod = reference.load_numpy_state_dict(reference.UNet(m), flax_to_torch(params))
xt = torch.from_numpy(x.transpose(0,3,1,2)); tt=torch.from_numpy(t); yt=torch.from_numpy(y)
with torch.no_grad(): print("torch fwd", tm(lambda: tmod(xt, tt, yt)))
def tg():
    tmod.zero_grad(); (tmod(xt, tt, yt)**2).sum().backward()
print("torch grad", tm(tg))
# single conv
for (H, C) in [(16, 32), (8, 64)]:
    conv = jax.jit(jax.grad(lambda w, x: jnp.sum(jax.lax.conv_general_dilated(x, w, (1,1), ((1,1),(1,1)), dimension_numbers=('NHWC','HWIO','NHWC'))**2), argnums=(0,1)))
    w = np.random.randn(3,3,C,C).astype(np.float32); xx = np.random.randn(64,H,H,C).astype(np.float32)
    cf = jax.jit(lambda w, x: jax.lax.conv_general_dilated(x, w, (1,1), ((1,1),(1,1)), dimension_numbers=('NHWC','HWIO','NHWC')))
    print(f"conv {H}x{H}x{C}: jax fwd", tm(lambda: cf(w, xx).block_until_ready()), "jax grad", tm(lambda: jax.block_until_ready(conv(w, xx))))
    c = torch.nn.Conv2d(C, C, 3, padding=1); xt2 = torch.randn(64, C, H, H, requires_grad=True)
    with torch.no_grad(): print("   torch fwd", tm(lambda: c(xt2)))
    def g():
        c.zero_grad(); xt2.grad=None; (c(xt2)**2).sum().backward()
    print("   torch grad", tm(g))
