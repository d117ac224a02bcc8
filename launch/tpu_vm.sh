#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or more hosts) with JAX's own multi-controller runtime:
# every worker runs the same command, and jax.distributed.initialize() (KILN_DISTRIBUTED=1)
# finds the other workers from the TPU VM metadata.
#
#   launch/tpu_vm.sh --tpu kiln-v4 --zone us-central2-b --accelerator-type v4-16 \
#       -- experiments/gpt/pretrain.py:size=base runs/gpt_base --config.optim.lr=6e-4
#   launch/tpu_vm.sh --dry-run ...    # print the commands (gcloud, git), run none of them
#
# Steps, each printed before it runs:
#   1. create the slice (`gcloud compute tpus tpu-vm create`) unless `describe` finds it;
#   2. copy HEAD (`git archive`: committed files only; uncommitted changes are not copied) to
#      every worker and unpack it into --repo-dir;
#   3. on every worker: a .venv with requirements.txt and jax[tpu] at the pinned jax version,
#      kiln installed editable;
#   4. on every worker: `python -m kiln.main ...`, output appended to WORKDIR/worker-HOST.log
#      (and streamed here). The run lasts as long as this launcher's ssh sessions: start long
#      runs inside tmux or screen;
#   5. with --fetch-logs DIR: copy the worker logs into DIR (also when the run failed).
# Re-running the same command resumes: the slice is reused, the code re-copied, pip is a no-op.
#
# WORKDIR (relative to --repo-dir unless absolute) must be one directory that all workers
# share: every worker writes its shards of each checkpoint there and reads them back on
# resume, and only worker 0 writes metrics and the summary. Per-worker local disk is enough for
# a single-host slice (v4-8, v5litepod-8, ...); on a multi-host slice mount a shared
# filesystem at the same path on every worker, e.g. a GCS bucket with gcsfuse or a Filestore
# (NFS) share, and pass a WORKDIR inside it.
#
# Software version (--version): by default the one Google recommends for JAX on the
# accelerator (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5litepod: v2-alpha-tpuv5-lite,
# v4 and older: tpu-ubuntu2204-base). These are Ubuntu 22.04 images, whose python3 is 3.10;
# kiln and the pinned jax need Python >= 3.11. Install one on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command 'sudo
#     add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11-venv'
# and pass --python python3.11 (the install step stops with that hint on an older python3).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [--dry-run] --tpu NAME --zone ZONE [--project PROJECT]
           [--accelerator-type TYPE] [--version VERSION] [--spot] [--repo-dir DIR]
           [--python PYTHON] [--fetch-logs DIR] -- CONFIG[:args] WORKDIR [--config.key=value ...]
  --accelerator-type  slice type, default v5litepod-16 (16 v5e chips on 2 hosts)
  --version           TPU software version, default: Google's JAX image for the type
  --spot              create the slice as Spot VMs (preemptible; re-run to resume)
  --repo-dir          where the code goes on the workers, default ~/kiln
  --python            interpreter that creates the workers' .venv (>= 3.11), default python3
  --fetch-logs DIR    copy WORKDIR/worker-*.log from the workers into DIR afterwards
EOF
}

fail() {
  echo "tpu_vm.sh: error: $1" >&2
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

# A path for the workers' shell: quoted, but a leading ~/ is left for the shell to expand.
# shellcheck disable=SC2088  # The ~ is meant literally here: the workers' shell expands it.
remote_path() {
  if [[ $1 == "~" ]]; then
    printf '~'
  elif [[ $1 == "~/"* ]]; then
    printf '~/%s' "$(quote "${1#"~/"}")"
  else
    quote "$1"
  fi
}

# A path for `gcloud ... scp` (whose remote paths start in the home directory): ~/ dropped.
scp_path() {
  if [[ $1 == "~" ]]; then
    printf '.'
  else
    printf '%s' "${1#"~/"}"
  fi
}

default_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

dry_run=0
tpu=""
zone=""
project=""
accelerator_type=v5litepod-16
version=""
spot=0
# shellcheck disable=SC2088  # Expanded by the workers' shell, not this one.
repo_dir="~/kiln"
python=python3
fetch_logs=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift; continue ;;
    --spot) spot=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    --*=*) option=${1%%=*}; value=${1#*=}; shift ;;
    --tpu | --zone | --project | --accelerator-type | --version | --repo-dir | --python | \
      --fetch-logs)
      [[ $# -ge 2 ]] || fail "$1 needs a value"
      option=$1; value=$2; shift 2 ;;
    -*) fail "unknown option $1" ;;
    *) break ;;
  esac
  [[ -n $value ]] || fail "$option needs a value"
  case $option in
    --tpu) tpu=$value ;;
    --zone) zone=$value ;;
    --project) project=$value ;;
    --accelerator-type) accelerator_type=$value ;;
    --version) version=$value ;;
    --repo-dir) repo_dir=$value ;;
    --python) python=$value ;;
    --fetch-logs) fetch_logs=$value ;;
    *) fail "unknown option $option" ;;
  esac
done
[[ -n $tpu ]] || fail "--tpu NAME is required"
[[ -n $zone ]] || fail "--zone ZONE is required"
[[ $# -ge 2 ]] || fail "CONFIG and WORKDIR are required (after --)"
config=$1
workdir=$2
shift 2
[[ -n $version ]] || version=$(default_version "$accelerator_type")

root=$(cd "$(dirname "$0")/.." && pwd)
jax_version=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$root/requirements.txt")
if [[ -z $jax_version ]]; then
  echo "tpu_vm.sh: error: no 'jax==VERSION' pin in $root/requirements.txt" >&2
  exit 1
fi
if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
  echo "tpu_vm.sh: warning: uncommitted changes are not copied (the workers get HEAD)" >&2
fi

# Prints a command; runs it unless --dry-run.
step() {
  if [[ $dry_run == 1 ]]; then
    quote_command "$@"
  else
    echo "+ $(quote_command "$@")" >&2
    "$@"
  fi
}

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n $project ]]; then
  where+=(--project "$project")
fi

# 1. The slice.
describe=("${tpu_vm[@]}" describe "$tpu" "${where[@]}")
create=("${tpu_vm[@]}" create "$tpu" "${where[@]}" --accelerator-type "$accelerator_type"
  --version "$version")
if [[ $spot == 1 ]]; then
  create+=(--spot)
fi
if [[ $dry_run == 1 ]]; then
  quote_command "${describe[@]}"
  echo "# (skipped when the VM exists)"
  quote_command "${create[@]}"
else
  echo "+ $(quote_command "${describe[@]}")" >&2
  if "${describe[@]}" >/dev/null 2>&1; then
    echo "# TPU VM $tpu exists in $zone: reusing it" >&2
  else
    step "${create[@]}"
  fi
fi

# 2. The code: HEAD as a tarball, unpacked on every worker.
tarball=${TMPDIR:-/tmp}/kiln-$tpu.tar.gz
if [[ $dry_run == 0 ]]; then
  trap 'rm -f "$tarball"' EXIT
fi
repo=$(remote_path "$repo_dir")
step git -C "$root" archive --format=tar.gz --output "$tarball" HEAD
step "${tpu_vm[@]}" scp "$tarball" "$tpu:kiln-src.tar.gz" "${where[@]}" --worker=all
step "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command \
  "mkdir -p $repo && tar -xzf kiln-src.tar.gz -C $repo && rm kiln-src.tar.gz"

# 3. The environment on every worker.
py=$(quote "$python")
step "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command \
  "cd $repo && $py -c \"import sys; sys.exit(sys.version_info < (3, 11) and \\\"kiln needs\
 Python >= 3.11 on the TPU VM: pass --python\\\")\" && $py -m venv .venv\
 && .venv/bin/pip install -r requirements.txt \"jax[tpu]==$jax_version\"\
 -f https://storage.googleapis.com/jax-releases/libtpu_releases.html\
 && .venv/bin/pip install --no-deps -e ."

# 4. The run: the same command on every worker.
remote_workdir=$(remote_path "$workdir")
run_words=".venv/bin/python -m kiln.main --config $(remote_path "$config")"
run_words+=" --workdir $remote_workdir"
for word in "$@"; do
  run_words+=" $(quote "$word")"
done
status=0
step "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command \
  "cd $repo && mkdir -p $remote_workdir && set -o pipefail && KILN_DISTRIBUTED=1 $run_words 2>&1\
 | tee -a $remote_workdir/worker-\$(hostname).log" || status=$?

# 5. The logs.
if [[ -n $fetch_logs ]]; then
  if [[ $workdir == /* || $workdir == "~"* ]]; then
    logs="$(scp_path "$workdir")/worker-*.log"
  else
    logs="$(scp_path "$repo_dir")/$workdir/worker-*.log"
  fi
  step mkdir -p "$fetch_logs"
  step "${tpu_vm[@]}" scp "$tpu:$logs" "$fetch_logs" "${where[@]}" --worker=all || status=$?
fi
exit "$status"
