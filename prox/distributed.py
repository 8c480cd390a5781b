"""Multi-host set-up: one call before anything touches a device.

``initialize()`` wraps ``jax.distributed.initialize``. With no arguments it does nothing on a single
machine and lets JAX detect the cluster where one is present (SLURM, Cloud TPU pods, Open MPI, or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, read here). On CPU hosts it
selects gloo collectives, so several local processes can stand in for a pod in tests.

After it, ``jax.devices()`` lists every device of every process; ``prox.step.data_mesh()`` spans them,
each process loads its own rows of the global batch (``process_index``/``process_count``), and
``prox.step.shard_batch`` assembles the global batch with ``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax

__all__ = ["initialize", "is_main_process"]


def _in_cluster() -> bool:
  """Whether the environment describes a job of several processes that JAX can join by itself."""
  env = os.environ
  return bool(
      env.get("JAX_COORDINATOR_ADDRESS")
      or int(env.get("SLURM_NTASKS", "1")) > 1             # srun; jax reads SLURM_* itself
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")         # Cloud TPU pod slices
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)     # mpirun


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, cpu_collectives: str = "gloo") -> bool:
  """Joins this process to a multi-process JAX job; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0; ``None`` lets JAX detect it from the cluster.
    num_processes, process_id: likewise.
    local_device_ids: the local devices this process uses (``None``: all).
    cpu_collectives: the CPU collectives implementation (``gloo`` or ``mpi``) used across processes.
  Call it once, before any other JAX call that touches devices.
  """
  env = os.environ
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = int(env["JAX_NUM_PROCESSES"]) if num_processes is None else num_processes
    process_id = int(env["JAX_PROCESS_ID"]) if process_id is None else process_id
  explicit = coordinator_address is not None or num_processes is not None
  if (not explicit and not _in_cluster()) or num_processes == 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  return True


def is_main_process() -> bool:
  """True on the process that writes files and logs (process 0)."""
  return jax.process_index() == 0
