"""How this process's JAX runs, set before its backends start: XLA:CPU's own convolutions, and the
persistent compilation cache that lets a restarted run skip compiling."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import mmap
import os
import pkgutil
from pathlib import Path

import jax

DEFAULT_COMPILATION_CACHE = Path.home() / ".cache" / "unet_flax" / "xla"


def use_compilation_cache() -> None:
    """Compiled programs cached on disk (UNET_FLAX_COMPILATION_CACHE, else ~/.cache/unet_flax/xla): a
    restarted run does not compile again, small programs (placing the state, checkpointing) included."""
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("UNET_FLAX_COMPILATION_CACHE", str(DEFAULT_COMPILATION_CACHE)))
    # Also the many small programs, about 30 ms each to compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


YNNPACK_OPTION = "xla_cpu_experimental_ynn_fusion_type"
ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu")


def use_xla_cpu_convolutions() -> None:
    """Keep XLA:CPU's own convolutions instead of YNNPACK's, before JAX starts its CPU backend.

    XLA hands convolutions to YNNPACK by default, which runs each of this U-Net's small ones on a
    single core; XLA's own use every core: the digits train step goes from 278 to 197 ms on 2 cores
    (docs/benchmarks.md). Set only where JAX will compute on the CPU and the installed jaxlib knows
    the option (XLA aborts at start-up on a flag it does not know); a user's XLA_FLAGS naming it wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNNPACK_OPTION in flags or not cpu_is_the_backend() or not jaxlib_knows_flag(YNNPACK_OPTION):
        return
    os.environ["XLA_FLAGS"] = f"{flags} --{YNNPACK_OPTION}=".strip()


def cpu_is_the_backend() -> bool:
    """Whether JAX will compute on the CPU, decided without starting it: JAX_PLATFORMS names the CPU
    first, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    plugins = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins
        plugins |= {module.name for module in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        plugins.add("tpu")
    return not any(platform in name for name in plugins for platform in ACCELERATOR_PLATFORMS)


@functools.cache
def jaxlib_knows_flag(name: str) -> bool:
    """Whether the installed jaxlib's XLA defines the flag `name`: its name is in XLA's library."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = name.encode()
    libraries = Path(next(iter(spec.submodule_search_locations))).glob("*.so*")
    for library in sorted(path for path in libraries if path.stat().st_size):
        with open(library, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) >= 0:
                return True
    return False
