#!/usr/bin/env bash
# One process on this machine, all local devices in the mesh. Runs from the repository root,
# so CONFIG and a relative WORKDIR are taken relative to it.
#
#   launch/local.sh experiments/gpt/pretrain.py:size=tiny runs/x [--config.key=value ...]
#   launch/local.sh --dry-run ...    # print the command instead of running it
set -euo pipefail

usage() {
  echo "usage: launch/local.sh [--dry-run] CONFIG[:args] WORKDIR [--config.key=value ...]"
}

fail() {
  echo "local.sh: error: $1" >&2
  usage >&2
  exit 2
}

# Quotes one word for a POSIX shell (what Python's shlex.quote does).
quote() {
  local sq="'" rep="'\\''"
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//"$sq"/"$rep"}"
  fi
}

quote_command() {
  local sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=" "
  done
  printf '\n'
}

dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) fail "unknown option $1" ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  fail "CONFIG and WORKDIR are required"
fi
config=$1
workdir=$2
shift 2

root=$(cd "$(dirname "$0")/.." && pwd)
command=(.venv/bin/python -m kiln.main --config "$config" --workdir "$workdir" "$@")
if [[ $dry_run == 1 ]]; then
  quote_command cd "$root"
  quote_command "${command[@]}"
  exit 0
fi
cd "$root"
exec "${command[@]}"
