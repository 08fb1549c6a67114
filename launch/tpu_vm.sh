#!/usr/bin/env bash
# Cloud TPU VMs, one host or a pod slice: create one, install this package on every worker, run a config on
# all workers at once, follow a worker's log, copy results out, delete the VM.
#
# Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [CONFIG [--config.key=value ...]]
#   create     create the VM; with --queued, wait until the request is granted
#   install    copy the --src checkout to ~/selfimprove_jax on every worker, pip install -e '.[tpu]' there
#   run        start CONFIG on every worker under nohup, appending to ~/selfimprove_jax_logs/run.log
#   logs       follow one worker's log (Ctrl-C stops following, not the run)
#   stop       stop the run on every worker
#   copy-out   copy worker 0's log, and the workdir unless it is on gs://, into --dest
#   delete     delete the VM (asks first unless --yes)
#   all        create, install, run, logs
# Options (a command ignores those it does not use, so one set of flags can serve every command):
#   --name NAME              TPU VM name: lowercase letters, digits and hyphens (required)
#   --zone ZONE              e.g. us-west4-a (required)
#   --project PROJECT        default: gcloud's core/project property
#   --accelerator-type TYPE  e.g. v5litepod-8 (one host), v5litepod-16 or v4-32 (pod slices)
#   --runtime-version V      default by generation: v2-alpha-tpuv5-lite (v5litepod), v2-alpha-tpuv5 (v5p),
#                            v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v2, v3, v4)
#   --spot | --preemptible   cheaper capacity that can be reclaimed at any time
#   --queued                 create and delete through a queued resource (takes --spot, not --preemptible)
#   --src DIR                git checkout to install: tracked and untracked files, no ignored ones
#                            (default: the checkout holding this script)
#   --python PY              interpreter for the workers' venv, Python >= 3.11 (default: python3)
#   --workdir DIR            passed to the run as --workdir=DIR; on pod slices use gs:// (one disk per worker)
#   --env KEY=VALUE          extra environment for the run, repeatable
#   --worker N               the worker whose log `logs` follows (default: 0)
#   --dest DIR               where copy-out puts the log and workdir (default: .)
#   --yes                    delete without asking
#   --dry-run                print the commands, one per line, and run nothing
# CONFIG and a relative --workdir are relative to the source tree on the workers.
# Example, a v5e slice of several hosts:
#   launch/tpu_vm.sh all --name sharpen --zone us-west4-a --accelerator-type v5litepod-16 --spot \
#     --workdir gs://BUCKET/runs/sharpen configs/sft_sharpening.py --config.task.name=gsm8k
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$here/_common.sh"

commands="create install run logs stop copy-out delete all"
if [[ $# -eq 0 ]]; then
  print_help >&2
  exit 2
fi
case $1 in
  -h|--help) print_help; exit 0 ;;
  create|install|run|logs|stop|copy-out|delete|all) command=$1; shift ;;
  *) die "unknown command '$1'; one of: $commands" ;;
esac

name='' zone='' project='' accelerator='' runtime='' capacity='' queued=0 src=$(dirname "$here")
python=python3 workdir='' worker=0 dest=. yes=0 run_env=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator=$2; shift 2 ;;
    --runtime-version) need_value "$@"; runtime=$2; shift 2 ;;
    --src) need_value "$@"; src=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --env) need_value "$@"; run_env+=("$2"); shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --dest) need_value "$@"; dest=$2; shift 2 ;;
    --spot|--preemptible)
      [[ -z $capacity || $capacity == "$1" ]] || die "--spot and --preemptible exclude each other"
      capacity=$1; shift ;;
    --queued) queued=1; shift ;;
    --yes) yes=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) print_help; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown flag $1 (see --help; --config.* overrides go after CONFIG)" ;;
    *) break ;;
  esac
done

# Everything is checked before the first command runs, so `all` never stops half-way on a typo.
[[ -n $name ]] || die "--name is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lowercase letters, digits and hyphens, starting with a letter; got '$name'"
[[ -n $zone ]] || die "--zone is required"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone must look like us-west4-a; got '$zone'"
[[ -z $accelerator || $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type must look like v5litepod-8, v5p-16, v6e-8 or v4-32; got '$accelerator'"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...); got '$worker'"
for assignment in ${run_env[@]+"${run_env[@]}"}; do
  [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env must be KEY=VALUE; got '$assignment'"
done
[[ $queued == 0 || $capacity != --preemptible ]] || die "--queued takes --spot, not --preemptible"
if [[ $command == create || $command == all ]]; then
  [[ -n $accelerator ]] || die "--accelerator-type is required to create a TPU VM"
  if [[ -z $runtime ]]; then
    case $accelerator in
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      v2-*|v3-*|v4-*) runtime=tpu-ubuntu2204-base ;;
      *) die "--runtime-version has no default for --accelerator-type $accelerator; pass one" ;;
    esac
  fi
fi
if [[ $command == run || $command == all ]]; then
  [[ $# -gt 0 ]] || die "CONFIG is required to $command (e.g. configs/smoke.py)"
  [[ -n $workdir ]] || die "--workdir is required to $command"
elif [[ $# -gt 0 ]]; then
  die "unexpected argument '$1': only run and all take CONFIG"
fi
[[ $command != copy-out || -n $workdir ]] || die "--workdir is required to copy-out"

where=("--zone=$zone")
if [[ -n $project ]]; then where+=("--project=$project"); fi
tpu_vm=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)

on_workers() {  # WORKERS SHELL_TEXT
  emit "${tpu_vm[@]}" ssh "$name" "${where[@]}" "--worker=$1" "--command=$2"
}

wait_until_active() {
  local describe=("${queued_resources[@]}" describe "$name" "${where[@]}" '--format=value(state.state)')
  local state
  if [[ $DRY_RUN == 1 ]]; then
    emit "${describe[@]}"
    return
  fi
  while state=$("${describe[@]}"); do
    case $state in
      ACTIVE) return ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING) echo "queued resource $name is $state" >&2; exit 1 ;;
    esac
    echo "queued resource $name is $state; asking again in a minute" >&2
    sleep 60
  done
  exit 1
}

do_create() {
  local extra=()
  if [[ -n $capacity ]]; then extra=("$capacity"); fi
  if [[ $queued == 1 ]]; then
    emit "${queued_resources[@]}" create "$name" "${where[@]}" "--node-id=$name" \
      "--accelerator-type=$accelerator" "--runtime-version=$runtime" ${extra[@]+"${extra[@]}"}
    wait_until_active
  else
    emit "${tpu_vm[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator" \
      "--version=$runtime" ${extra[@]+"${extra[@]}"}
  fi
}

do_install() {
  local tarball=${TMPDIR:-/tmp}/selfimprove_jax-$name.tar.gz
  pack_source "$src" "$tarball"
  emit "${tpu_vm[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" "${where[@]}" --worker=all
  emit rm -f "$tarball"
  on_workers all "$(unpack_and_install_snippet "$python" tpu)"
}

do_run() {  # CONFIG [OVERRIDES...]
  local config=$1
  shift
  # --distributed=on: jax.distributed.initialize() finds the other workers by itself on TPU VMs
  # (one process per worker); no addresses to pass.
  local cmd=(env PYTHONUNBUFFERED=1 ${run_env[@]+"${run_env[@]}"} .venv/bin/python -m selfimprove_jax.main
             "--config=$config" "--workdir=$workdir" --distributed=on "$@")
  on_workers all "$(detached_run_snippet "$REMOTE_LOGS" "$REMOTE_TREE" "${cmd[@]}")"
}

do_logs() {
  on_workers "$worker" "tail -n 100 -F $REMOTE_LOGS/run.log"
}

do_stop() {
  on_workers all "kill \"\$(cat $REMOTE_LOGS/run.pid)\" && echo \"stopped the run on \$(hostname)\""
}

do_copy_out() {
  emit mkdir -p "$dest"
  emit "${tpu_vm[@]}" scp "$name:$REMOTE_LOGS/run.log" "$dest/$name-worker0.log" "${where[@]}" --worker=0
  if is_gcs "$workdir"; then
    echo "the workdir $workdir is in Cloud Storage already: nothing to copy from the workers" >&2
    return
  fi
  local remote=$workdir
  [[ $remote == /* ]] || remote=$REMOTE_TREE/$remote
  emit "${tpu_vm[@]}" scp --recurse "$name:$remote" "$dest" "${where[@]}" --worker=0
}

do_delete() {
  if [[ $DRY_RUN == 0 && $yes == 0 ]]; then
    local answer=''
    read -r -p "Delete TPU VM $name in $zone, and everything on its disks? [y/N] " answer || true
    [[ $answer == [yY]* ]] || { echo "not deleted (pass --yes to skip this question)" >&2; exit 1; }
  fi
  # --quiet: the question above replaces gcloud's own.
  if [[ $queued == 1 ]]; then
    emit "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    emit "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

case $command in
  create) do_create ;;
  install) do_install ;;
  run) do_run "$@" ;;
  logs) do_logs ;;
  stop) do_stop ;;
  copy-out) do_copy_out ;;
  delete) do_delete ;;
  all) do_create; do_install; do_run "$@"; do_logs ;;
esac
