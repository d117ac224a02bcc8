#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/gpu_check.sh needs on a GPU machine that has
# jax, flax, optax, orbax-checkpoint, sentencepiece and numpy for Python 3.12 but no network (the
# device tool's H200): the packages kiln imports that such a machine lacks, pinned as in
# requirements.txt. Run here (with network), then carry .whl to that machine.
#   bash benchmarks/gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
pin() { grep -i "^$1==" requirements.txt; }
packages=(
  "$(pin grain)" "array-record==0.8.6" "portpicker==1.6.0"
  "$(pin ml-collections)" "$(pin tensorboardX)"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d .whl "${packages[@]}"
ls .whl
