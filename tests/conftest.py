"""Test set-up: 4 fake CPU devices, float32 at the highest matmul precision on both sides."""
import os

# Must precede the first `import jax` of the session: data-parallel tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import collections  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch
except ImportError:  # the PyTorch-free tests still run
    torch = None
else:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(torch.float32)

# Worst relative error seen per (module, quantity), printed after the run for the README's table.
PARITY_ERRORS: dict[tuple[str, str], float] = collections.defaultdict(float)


@pytest.fixture
def record_error():
    def record(module: str, quantity: str, error: float) -> None:
        PARITY_ERRORS[module, quantity] = max(PARITY_ERRORS[module, quantity], float(error))
    return record


def pytest_terminal_summary(terminalreporter):
    if not PARITY_ERRORS:
        return
    terminalreporter.section("parity: worst max|flax - torch| / max|torch|")
    for (module, quantity), error in sorted(PARITY_ERRORS.items()):
        terminalreporter.write_line(f"{module:<28} {quantity:<14} {error:.2e}")
