#!/usr/bin/env bash
# Everything this project tests and measures on a GPU, in one command:
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. installs what the machine lacks from the wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them),
# 2. runs the GPU tests (python -m pytest --gpu: parity on the GPU, cuDNN attention, bf16 training, sampling),
# 3. runs bench.py on the cifar10 preset (float32 and bf16, JAX against PyTorch eager and torch.compile).
# Results (gpu_<gpu>_*.log, cifar10_<gpu>.json) are written as they come into OUT_DIR (default docs/bench),
# so a run cut short keeps what it measured.
# BENCH_ARGS replaces bench.py's arguments, PYTEST_ARGS adds to pytest's (a CPU dry run uses both).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench}
mkdir -p "$out"
if ! python3 -c "import grain, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/unet_flax_site .whl/*.whl || { echo "error: no wheels in .whl/ (run benchmarks/gpu_wheels.sh)"; exit 1; }
  export PYTHONPATH=/tmp/unet_flax_site
fi
# JAX and PyTorch share the GPU in one process, and the tests' train.py processes share it with pytest's:
# no process takes 75% of it up front.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E 'H100|H200|A100|L4|B200' | tr A-Z a-z)
gpu=${gpu:-gpu}
{ date -u; nvidia-smi 2>/dev/null | head -15; lscpu | grep 'Model name'; nproc; python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o, torch, sys;
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', o.__version__, 'torch', torch.__version__, 'devices', jax.devices())"; } > "$out/gpu_${gpu}_machine.log" 2>&1

python3 -m pytest --gpu -q -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-} 2>&1 | tee "$out/gpu_${gpu}_tests.log"
tests=${PIPESTATUS[0]}
python3 bench.py ${BENCH_ARGS:---preset cifar10 --device gpu} --json "$out/cifar10_${gpu}.json" 2>&1 \
  | tee "$out/gpu_${gpu}_bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
