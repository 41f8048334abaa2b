#!/usr/bin/env bash
# Fetch, where there is network, the wheels that benchmarks/gpu.sh installs on a GPU machine that
# has none: what its image (Python 3.12, jax, flax, optax, orbax, torch) lacks for this project.
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
ls -l .whl
