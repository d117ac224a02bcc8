#!/usr/bin/env bash
# One GPU, under 8 minutes: tokens/s, MFU against the card's bf16 dense peak (kiln/flops.py) and
# peak device memory of the train step, bf16 compute with float32 master weights, for the
# decoder at 1B, 350M and 125M, BERT-base and T5-base (the issue's targets first). Appends to
# benchmarks/RESULTS.md (and copies it to $OUT when the device tool runs it).
#   bash benchmarks/gpu_check.sh                         (on the GPU machine, repository root)
#   KILN_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh  (tiny configs, any machine: checks the
#                                                         script itself; appends nothing)
# Python: $PY, else the first of .venv/bin/python and python3 that imports jax; kiln is read from
# src/, so nothing is installed where jax is already there (the device tool's machine has jax
# with CUDA and no network). Where that Python lacks grain, ml-collections or tensorboardX, they
# come from the wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them here; carry .whl there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [[ -z $PY ]]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import jax" 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
fi
if [[ -z $PY ]]; then  # No jax anywhere: a fresh GPU machine with network access.
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r requirements.txt "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)"
  PY=.venv/bin/python
fi
if [[ -d .whl ]] && ! "$PY" -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kiln-wheels .whl/*.whl
  export PYTHONPATH=/tmp/kiln-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$PY" -c "import kiln.tools.fits"  # Fails at once, naming any missing package.

smoke=${KILN_GPU_CHECK_SMOKE:-0}
results=benchmarks/RESULTS.md
limit=${KILN_GPU_CHECK_TIMEOUT:-100}  # Seconds per config: 5 configs fit the tool's 10 minutes.
[[ $smoke == 1 ]] && results=/dev/null
# Per config: sequences per step sized for one GPU (tokens/step ~16-64k), remat where the
# activations would not fit, 5 timed steps x 2 repeats after compilation.
run() {
  local spec=$1
  shift
  local steps=5 repeats=2
  if [[ $smoke == 1 ]]; then  # The script's plumbing only: one timed step of a tiny config.
    spec=${spec%%:*}:tiny
    steps=1 repeats=1
    set -- data.global_batch_size=8
  fi
  timeout "$limit" "$PY" benchmarks/train_throughput.py --configs "$spec" --steps $steps --repeats $repeats \
    --results "$results" --set model.dtype=bfloat16 model.param_dtype=float32 "$@" ||
    echo "$spec: failed or timed out after $limit s"
}
run gpt:1b data.global_batch_size=16 model.remat=dots
run bert:base data.global_batch_size=64
run t5:base data.global_batch_size=64
run gpt:base data.global_batch_size=32
run gpt:medium data.global_batch_size=32
if [[ -n ${OUT:-} && $smoke != 1 ]]; then
  cp "$results" "$OUT/RESULTS.md"
fi
