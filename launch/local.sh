#!/usr/bin/env bash
# Run one prox experiment on this machine (CPU, or the local GPU/TPU JAX finds).
#
#   launch/local.sh [flags...]        e.g. launch/local.sh --config.num_steps=200 --workdir=runs/try
#
# Extra flags go to `python -m prox.experiments.main` after the defaults; absl keeps the last value of a
# repeated flag, so `--workdir=...` or `--config=...` given here replaces the default.
#
# Variables:
#   PROX_CONFIG        config file            (default: prox/experiments/configs/classify.py in this checkout)
#   PROX_WORKDIR       run directory          (default: runs/local, relative to the current directory)
#   PROX_FAKE_DEVICES  N >= 1: present the CPU as N devices to try data parallelism on a laptop; sets
#                      XLA_FLAGS=--xla_force_host_platform_device_count=N (kept: any other XLA_FLAGS) and
#                      JAX_PLATFORMS=cpu unless JAX_PLATFORMS is already set
#   PROX_FSDP          devices per parameter shard: a data x fsdp mesh (--config.fsdp; default: the config's)
#   PYTHON             interpreter            (default: python)
#   PROX_DRY_RUN=1     print the environment and command instead of running them
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${PROX_CONFIG:-$root/prox/experiments/configs/classify.py}"
workdir="${PROX_WORKDIR:-runs/local}"
python="${PYTHON:-python}"

env_vars=()
if [[ -n "${PROX_FAKE_DEVICES:-}" ]]; then
  if ! [[ "$PROX_FAKE_DEVICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: PROX_FAKE_DEVICES must be a positive integer, got '$PROX_FAKE_DEVICES'" >&2
    exit 2
  fi
  env_vars+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$PROX_FAKE_DEVICES")
  env_vars+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}")
fi

mesh=()
if [[ -n "${PROX_FSDP:-}" ]]; then
  if ! [[ "$PROX_FSDP" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: PROX_FSDP must be a positive integer, got '$PROX_FSDP'" >&2
    exit 2
  fi
  mesh=(--config.fsdp="$PROX_FSDP")
fi

cmd=("$python" -m prox.experiments.main --config="$config" --workdir="$workdir" ${mesh[@]+"${mesh[@]}"} "$@")

if [[ "${PROX_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' ${env_vars[@]+"${env_vars[@]}"} "${cmd[@]}"
  echo
  exit 0
fi
for assignment in ${env_vars[@]+"${env_vars[@]}"}; do
  export "${assignment?}"
done
exec "${cmd[@]}"
