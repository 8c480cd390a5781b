#!/usr/bin/env bash
#SBATCH --job-name=prox
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Run one prox experiment on SLURM GPU nodes: `srun` starts the processes, and each one's
# `jax.distributed.initialize()` (no arguments) reads SLURM's variables (SLURM_JOB_ID,
# SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID): process 0's node is the coordinator.
#
#   sbatch launch/gpu_slurm.sh [flags...]                       # from the repository root
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh --config.num_steps=10000
#
# Layouts (sbatch options override the #SBATCH lines above):
#   one task per GPU  (default; JAX's default on SLURM): --ntasks-per-node equal to --gpus-per-node.
#                     Every task sees all GPUs of its node and JAX takes GPU number SLURM_LOCALID, so
#                     do not add --gpus-per-task (it would hide the other GPUs from each task).
#   one task per node: --ntasks-per-node=1; this script then sets JAX_LOCAL_DEVICE_IDS=0,...,G-1 so the
#                     one process drives all G GPUs of its node (G = SLURM_GPUS_ON_NODE).
#
# Variables:
#   PROX_CONFIG     config file      (default: prox/experiments/configs/classify.py)
#   PROX_WORKDIR    run directory    (default: runs/slurm-$SLURM_JOB_ID); on a file system every node
#                   sees (checkpoints are written by all processes), or a gs:// URL
#   PROX_DIR        repository root  (default: the directory sbatch was called from, SLURM_SUBMIT_DIR)
#   PROX_FSDP       devices per parameter shard: the mesh is (devices / PROX_FSDP) x PROX_FSDP, parameters
#                   and optimizer state fully sharded over the second axis (--config.fsdp; default: the
#                   config's, 1 = data parallel). Keep it within a node (it divides the GPUs per node) so
#                   the gathers stay on NVLink.
#   PYTHON          interpreter      (default: python; activate the environment before sbatch, or point
#                   PYTHON at the venv's python: srun passes the environment on)
#   PROX_DRY_RUN=1  print the command instead of running it, then the command each host runs
# Extra flags go to `python -m prox.experiments.main` after the defaults (absl: the last value wins).
set -euo pipefail

cd "${PROX_DIR:-${SLURM_SUBMIT_DIR:-.}}"
config="${PROX_CONFIG:-prox/experiments/configs/classify.py}"
workdir="${PROX_WORKDIR:-runs/slurm-${SLURM_JOB_ID:-0}}"
python="${PYTHON:-python}"

if [[ "${SLURM_NTASKS_PER_NODE:-}" == 1 && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi

mesh=()
if [[ -n "${PROX_FSDP:-}" ]]; then
  if ! [[ "$PROX_FSDP" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_slurm.sh: PROX_FSDP must be a positive integer, got '$PROX_FSDP'" >&2
    exit 2
  fi
  mesh=(--config.fsdp="$PROX_FSDP")
fi
program=("$python" -m prox.experiments.main --config="$config" --workdir="$workdir" ${mesh[@]+"${mesh[@]}"} "$@")
cmd=(srun --kill-on-bad-exit=1 "${program[@]}")

if [[ "${PROX_DRY_RUN:-0}" == 1 ]]; then
  [[ -n "${JAX_LOCAL_DEVICE_IDS:-}" ]] && printf 'JAX_LOCAL_DEVICE_IDS=%q ' "$JAX_LOCAL_DEVICE_IDS"
  printf '%q ' "${cmd[@]}"
  echo
  # What srun starts on each host (process ids from SLURM; outside a job, the #SBATCH defaults).
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  per_node="${SLURM_NTASKS_PER_NODE:-8}"
  per_node="${per_node%%(*}"
  for ((node = 0; node < nodes; node++)); do
    first=$((node * per_node)); last=$((first + per_node - 1))
    printf '# host %d: SLURM_PROCID=%d..%d: ' "$node" "$first" "$last"
    printf '%q ' "${program[@]}"
    echo
  done
  exit 0
fi
exec "${cmd[@]}"
