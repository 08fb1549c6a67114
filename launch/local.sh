#!/usr/bin/env bash
# Runs a config on this machine's CPU split into N fake devices, to try sharding without an accelerator.
#
# Usage: launch/local.sh [--devices N] [--dry-run] CONFIG [--config.key=value ...]
#   launch/local.sh --devices 8 configs/smoke.py --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
# Cloud TPU VM and GPU launchers live next to this script as they are added.
set -euo pipefail

devices=8
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--devices N] [--dry-run] CONFIG [--config.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
if ! [[ "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "--devices must be a positive integer, got '$devices'" >&2
  exit 2
fi

cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}"
     python -m selfimprove_jax.main "--config=${config}" "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
