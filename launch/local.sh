#!/usr/bin/env bash
# One process on this machine, all local devices in the mesh.
# Usage: launch/local.sh experiments/gpt/pretrain.py:size=tiny runs/x [--config.key=value ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:args] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
exec .venv/bin/python -m kiln.main --config "$config" --workdir "$workdir" "$@"
