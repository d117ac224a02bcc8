#!/usr/bin/env bash
# One GPU, under 8 minutes: tokens/s, MFU against the card's bf16 dense peak (kiln/flops.py) and
# peak device memory of the train step, bf16 compute with float32 master weights, for the
# decoder at 125M, 350M and 1B, BERT-base and T5-base. Appends to benchmarks/RESULTS.md.
#   bash benchmarks/gpu_check.sh            (on the GPU machine, from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ ! -x $PY ]]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r requirements.txt "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)"
  .venv/bin/pip install --quiet --no-deps -e .
fi
"$PY" -c "import jax; print(jax.devices())"
# Per config: sequences per step sized for one GPU (tokens/step ~16-32k), remat where the
# activations would not fit, 5 timed steps x 2 repeats after compilation.
run() {
  local spec=$1
  shift
  timeout 150 "$PY" benchmarks/train_throughput.py --configs "$spec" --steps 5 --repeats 2 \
    --set model.dtype=bfloat16 model.param_dtype=float32 "$@" || echo "$spec: failed or timed out"
}
run gpt:base data.global_batch_size=32
run gpt:medium data.global_batch_size=32
run gpt:1b data.global_batch_size=16 model.remat=dots
run bert:base data.global_batch_size=64
run t5:base data.global_batch_size=64
