#!/usr/bin/env bash
# N processes on this machine joined by JAX's distributed runtime (CPU collectives over gloo):
# a simulation of N hosts. Each process gets KILN_DEVICES_PER_PROCESS CPU devices (default 4);
# process 0 prints to the terminal, process i > 0 to WORKDIR/process_i.log. Other XLA_FLAGS in
# the environment are kept. The coordinator listens on localhost:$KILN_COORDINATOR_PORT (random
# by default).
# Usage: launch/cpu_cluster.sh [--dry-run] N CONFIG[:args] WORKDIR [--config.key=value ...]
set -euo pipefail
usage() {
  echo "usage: $0 [--dry-run] N CONFIG[:args] WORKDIR [--config.key=value ...]" >&2
  exit 2
}
dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
[[ $# -ge 3 ]] || usage
[[ $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1
config=$2
workdir=$3
shift 3
cd "$(dirname "$0")/.."
devices=${KILN_DEVICES_PER_PROCESS:-4}
port=${KILN_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}

overrides=("$@")

# Sets `cmd` to the command of process $1.
process_command() {
  cmd=(env "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
    .venv/bin/python -m kiln.main --config "$config" --workdir "$workdir"
    --config.distributed.initialize=True
    "--config.distributed.coordinator_address=localhost:$port"
    "--config.distributed.num_processes=$n" "--config.distributed.process_id=$1"
    "${overrides[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < n; i++)); do
    process_command "$i"
    printf '%q ' "${cmd[@]}"
    echo
  done
  exit 0
fi

mkdir -p "$workdir"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 1; i < n; i++)); do
  process_command "$i"
  "${cmd[@]}" >"$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
process_command 0
"${cmd[@]}" || status=$?
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
