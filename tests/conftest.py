"""Test set-up: 4 fake CPU devices, float32 at the highest matmul precision on both sides.

`python -m pytest` runs everything on the CPU, also on a machine with a GPU: comparisons with
PyTorch at float32 need JAX's CPU backend, and train.py's GPU default (bfloat16) would change
what the subprocess tests compare. `python -m pytest --gpu` runs the tests marked `gpu` with JAX
on the GPU: the parity suite, cuDNN attention, bf16 training and sampling.
"""
import os
import shutil
import tempfile

# Must precede the first `import jax` of the session: data-parallel tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# One compilation cache for the session, shared with the train.py processes the tests start and with
# pytest-xdist's workers (started after this runs in the main process, they inherit the variable):
# each program compiles once per run of the suite, small ones included.
WORKER = "PYTEST_XDIST_WORKER" in os.environ
COMPILATION_CACHE = (os.environ["UNET_FLAX_COMPILATION_CACHE"] if WORKER
                     else tempfile.mkdtemp(prefix="unet_flax_test_xla_"))
os.environ["UNET_FLAX_COMPILATION_CACHE"] = COMPILATION_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import collections  # noqa: E402
import importlib.util  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from unet_flax.runtime import use_xla_cpu_convolutions  # noqa: E402

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


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true",
                     help="run only the tests marked gpu, with JAX on the GPU (default: everything on the CPU)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: also runs under --gpu with JAX on the GPU; skipped there without one")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out files in LONGEST_FIRST's order
        config.option.loadscopereorder = False
    # Before any backend starts; subprocesses inherit the variables.
    if config.getoption("--gpu"):
        # train.py and sample.py subprocesses share the GPU with this process: no up-front 75% grab.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
        # LLVM's optimisations off for XLA:CPU's programs (here and in the processes the tests start):
        # they compile about a third faster, and the tests' small programs run in milliseconds either way.
        if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:  # xdist's workers inherit it
            os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
            # And XLA:CPU's older emitters, which compile the U-Net's train step in 6 s instead of 10.
            # Later jaxlibs have only the new ones, and stop at a flag they do not know.
            if jax.__version_info__ < (0, 11):
                os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
        # XLA's convolutions, as the commands choose on the CPU: the commands the tests run in this
        # process (commands.run_main) and in their own compute the same programs, bit for bit.
        use_xla_cpu_convolutions()


# The test files by how long they take (8 s to 3 min each on 2 cores with AVX-512, `--durations`),
# longest first: pytest-xdist hands out files in this order (its own reordering, by the number of tests in
# a file, is turned off in pytest_configure), and the workers then finish at about the same time instead of
# one running the last long file alone.
LONGEST_FIRST = ("test_sigkill.py", "test_multiprocess.py", "test_training.py", "test_fsdp.py", "test_train_cli.py",
                 "test_diffusers.py", "test_unet_parity.py", "test_reliability.py", "test_blocks_parity.py",
                 "test_bench.py", "test_data.py", "test_nnx.py", "test_samplers.py", "test_bad_inputs.py",
                 "test_evaluation.py", "test_docs.py", "test_convert.py", "test_public_api.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))  # stable: the other files, and the tests in each, keep their order
    if config.getoption("--gpu"):
        selected = [item for item in items if item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=[item for item in items if item not in selected])
        items[:] = selected


def pytest_ignore_collect(collection_path, config):
    # --gpu runs none of the diffusers tests, and a GPU machine's image may lack that dev-only package;
    # without --gpu a missing diffusers stays an error.
    missing = config.getoption("--gpu") and collection_path.name == "test_diffusers.py" \
        and importlib.util.find_spec("diffusers") is None
    return True if missing else None  # None: pytest's other rules decide


@pytest.fixture(scope="session")
def gpu():
    """The GPU that JAX computes on under --gpu; the test is skipped where there is none."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU and --gpu")
    return jax.devices()[0]


@pytest.fixture
def record_error():
    def record(module: str, quantity: str, error: float) -> None:
        PARITY_ERRORS[module, quantity] = max(PARITY_ERRORS[module, quantity], float(error))
    return record


def pytest_unconfigure(config):
    if not WORKER:
        shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def pytest_sessionfinish(session):
    if WORKER:  # hand this worker's errors to the main process, which prints the table
        session.config.workeroutput["parity_errors"] = [[*key, error] for key, error in PARITY_ERRORS.items()]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    # `-n auto`: one worker per core, at most 4: each holds PyTorch, JAX and the train.py processes
    # its tests start (about 2 GB together). One worker more than the cores was slower (679 s against
    # 634 s on 2 cores): the time the multi-process tests wait is less than what the workers lose sharing.
    return max(1, min(4, os.cpu_count() or 1))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for module, quantity, value in getattr(node, "workeroutput", {}).get("parity_errors", []):
        PARITY_ERRORS[module, quantity] = max(PARITY_ERRORS[module, quantity], value)


def pytest_terminal_summary(terminalreporter):
    if not PARITY_ERRORS:
        return
    terminalreporter.section("parity: worst max|flax - torch| / max|torch|")
    backend = "the GPU" if jax.default_backend() == "gpu" else "the CPU"
    terminalreporter.write_line(f"(JAX on {backend}; the PyTorch reference on the CPU)")
    for (module, quantity), error in sorted(PARITY_ERRORS.items()):
        terminalreporter.write_line(f"{module:<28} {quantity:<14} {error:.2e}")
