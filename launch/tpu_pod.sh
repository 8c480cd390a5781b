#!/usr/bin/env bash
# Run one prox experiment on every worker of a Cloud TPU VM (a pod slice or a single host), from your
# own machine through `gcloud compute tpus tpu-vm ssh --worker=all`. On each worker,
# `jax.distributed.initialize()` (no arguments) finds the other workers from the TPU metadata.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROX_WORKDIR=gs://my-bucket/prox/run1 launch/tpu_pod.sh [flags...]
#
# Variables:
#   TPU_NAME        (required) the TPU VM's name
#   ZONE            (required) its zone
#   PROJECT         GCP project (default: gcloud's configured project)
#   PROX_WORKDIR    (required) run directory every worker can write: a gs:// URL for pods
#                   (checkpoints through orbax; metrics.jsonl / TensorBoard need gcsfs and
#                   google-cloud-storage, which PROX_INSTALL=1 installs)
#   PROX_CONFIG     config file, relative to the checkout (default: prox/experiments/configs/classify.py)
#   PROX_REMOTE_DIR the checkout on each worker, relative to the home directory (default: prox)
#   PROX_INSTALL=1  first, on all workers: clone PROX_REPO into PROX_REMOTE_DIR if it is missing, then
#                   pip install the checkout with jax[tpu] (run once per new TPU VM)
#   PROX_REPO       git URL to clone (needed with PROX_INSTALL=1 when the checkout is missing); or copy
#                   the code yourself: gcloud compute tpus tpu-vm scp --recurse --worker=all ...
#   PYTHON          interpreter on the workers (default: python3)
#   PROX_FSDP       devices per parameter shard: the mesh is (devices / PROX_FSDP) x PROX_FSDP, parameters
#                   and optimizer state fully sharded over the second axis (--config.fsdp; default: the
#                   config's, 1 = data parallel)
#   PROX_DRY_RUN=1  print the gcloud command(s) instead of running them, then the command each worker runs
#                   (PROX_WORKERS=N workers; default 1)
# Extra flags go to `python -m prox.experiments.main` after the defaults (absl: the last value wins).
# The run lasts as long as the ssh session: start this script inside tmux/screen for long runs, and rerun
# it to resume from the latest checkpoint in PROX_WORKDIR.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
: "${PROX_WORKDIR:?set PROX_WORKDIR to a directory all workers can write, e.g. gs://bucket/prox/run1}"
config="${PROX_CONFIG:-prox/experiments/configs/classify.py}"
remote_dir="${PROX_REMOTE_DIR:-prox}"
python="${PYTHON:-python3}"

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  ssh_cmd+=(--project="$PROJECT")
fi

q() { printf '%q ' "$@"; }   # quote words for the remote shell

install="set -e; "
if [[ -n "${PROX_REPO:-}" ]]; then
  install+="[ -d $(q "$remote_dir")] || git clone $(q "$PROX_REPO" "$remote_dir"); "
fi
install+="cd $(q "$remote_dir")&& $(q "$python" -m pip install -U -e . "jax[tpu]>=0.10,<0.11" gcsfs google-cloud-storage)"
mesh=()
if [[ -n "${PROX_FSDP:-}" ]]; then
  if ! [[ "$PROX_FSDP" =~ ^[1-9][0-9]*$ ]]; then
    echo "tpu_pod.sh: PROX_FSDP must be a positive integer, got '$PROX_FSDP'" >&2
    exit 2
  fi
  mesh=(--config.fsdp="$PROX_FSDP")
fi
run="cd $(q "$remote_dir")&& $(q "$python" -m prox.experiments.main --config="$config" --workdir="$PROX_WORKDIR" ${mesh[@]+"${mesh[@]}"} "$@")"

commands=()
if [[ "${PROX_INSTALL:-0}" == 1 ]]; then
  commands+=("$install")
fi
commands+=("$run")

for remote in "${commands[@]}"; do
  if [[ "${PROX_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${ssh_cmd[@]}" --command="$remote"
    echo
  else
    "${ssh_cmd[@]}" --command="$remote"
  fi
done
if [[ "${PROX_DRY_RUN:-0}" == 1 ]]; then
  # Every worker runs the same command; jax.distributed.initialize() gives worker i its process index.
  for ((worker = 0; worker < ${PROX_WORKERS:-1}; worker++)); do
    echo "# worker $worker: $run"
  done
fi
