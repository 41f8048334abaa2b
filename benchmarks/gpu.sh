#!/usr/bin/env bash
# Everything this project measures and tests on a GPU, in one command, the most valuable first:
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. installs what the machine lacks from the wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them),
# 2. bench.py on the preset (cifar10) in bf16, then TF32: JAX against PyTorch's eager, torch.compile and
#    max-autotune variants (<preset>_<gpu>.json),
# 3. the profile of the JAX bf16 step, per kernel kind and the 20 longest kernels (profile_<gpu>_bf16.md),
# 4. float32 (TF32 off) with the sampling comparison, DDIM 50 steps x 64 images (<preset>_<gpu>_float32.json),
# 5. every sampler's images/s at 20 steps, bf16, batch 64 (sampler_speed_<gpu>.json),
# 6. the GPU tests (python -m pytest --gpu: parity on the GPU, cuDNN attention, bf16 training, sampling),
# 7. train.py's own img/s on packed data against bench.py's bf16 step (train_speed_<gpu>.json).
# Results (gpu_<gpu>_*.log and the files above) are written as they come into OUT_DIR (default docs/bench),
# so a run cut short keeps what it measured.
# PRESET (default cifar10) names the model; BENCH_ARGS, PROFILE_ARGS and PYTEST_ARGS add to bench.py's,
# profile_step.py's, pytest's and (TRAIN_ARGS) benchmarks/train_speed.py's arguments; SKIP lists steps to
# leave out (e.g. SKIP="profile tests").
# A CPU dry run (the script's paths, not GPU figures):
#   DEVICE=cpu PRESET=digits BENCH_ARGS="--steps 2 --batch-size 4 --cpu-devices 1" PROFILE_ARGS="--batch-size 4" \
#     PYTEST_ARGS=tests/test_gpu.py TRAIN_ARGS="--steps 6 --images 512 -- --batch-size 4" bash benchmarks/gpu.sh /tmp/gpuout
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
device=${DEVICE:-gpu}
preset=${PRESET:-cifar10}
skip=" ${SKIP:-} "
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E 'H100|H200|A100|L4|B200' | tr A-Z a-z)
gpu=${gpu:-$device}
{ date -u; nvidia-smi 2>/dev/null | head -15; lscpu | grep 'Model name'; nproc; python3 -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o, torch, sys;
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', o.__version__, 'torch', torch.__version__, 'devices', jax.devices())"; } > "$out/gpu_${gpu}_machine.log" 2>&1

status=0
run() {  # run NAME LOG COMMAND...: unless NAME is in SKIP, its output into LOG as it comes
  local name=$1 log=$2; shift 2
  [[ $skip == *" $name "* ]] && return
  "$@" 2>&1 | tee "$log"
  local code=${PIPESTATUS[0]}
  echo "$name exit $code" | tee -a "$out/gpu_${gpu}_status.log"
  (( code )) && status=1
}
run bench "$out/gpu_${gpu}_bench.log" python3 bench.py --preset "$preset" --device "$device" ${BENCH_ARGS:-} \
  --precision bfloat16 tensorfloat32 --no-sampling --json "$out/${preset}_${gpu}.json"
run profile "$out/gpu_${gpu}_profile.log" python3 benchmarks/profile_step.py --preset "$preset" --device "$device" \
  ${PROFILE_ARGS:-} --precision bfloat16 --out "$out/profile_${gpu}_bf16.md"
run float32 "$out/gpu_${gpu}_bench_float32.log" python3 bench.py --preset "$preset" --device "$device" \
  ${BENCH_ARGS:-} --precision float32 --json "$out/${preset}_${gpu}_float32.json"
run samplers "$out/gpu_${gpu}_samplers.log" python3 benchmarks/sampler_speed.py --preset "$preset" \
  --json "$out/sampler_speed_${gpu}.json"
run tests "$out/gpu_${gpu}_tests.log" python3 -m pytest --gpu -q -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-}
run train "$out/gpu_${gpu}_train.log" python3 benchmarks/train_speed.py --preset "$preset" \
  --bench-json "$out/${preset}_${gpu}.json" --json "$out/train_speed_${gpu}.json" ${TRAIN_ARGS:-}
exit $status
