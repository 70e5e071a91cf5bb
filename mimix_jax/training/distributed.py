"""Multi-host start-up: `jax.distributed.initialize` from flags, environment variables or SLURM.

One process per host (all local GPUs); every process runs the same command. Sources, in order:
--coordinator_address/--num_processes/--process_id flags, MIMIX_COORDINATOR/MIMIX_NUM_PROCESSES/MIMIX_PROCESS_ID,
then SLURM (jax auto-detects it when SLURM_NTASKS > 1). Nothing is initialised for a single process.
"""

from __future__ import annotations

import argparse
import os

import jax


def add_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--coordinator_address", default=os.environ.get("MIMIX_COORDINATOR"),
                 help="host:port of process 0 (env MIMIX_COORDINATOR)")
  p.add_argument("--num_processes", type=int, default=_env_int("MIMIX_NUM_PROCESSES"),
                 help="number of processes (env MIMIX_NUM_PROCESSES)")
  p.add_argument("--process_id", type=int, default=_env_int("MIMIX_PROCESS_ID"),
                 help="this process's index (env MIMIX_PROCESS_ID)")


def initialize(args: argparse.Namespace) -> None:
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not args.coordinator_address and not slurm:
    return
  if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator_hint():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need gloo collectives
  if args.coordinator_address:
    if args.num_processes is None or args.process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id (or MIMIX_* env variables)")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  else:
    jax.distributed.initialize()  # the coordinator, process count and index from SLURM_*
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices, "
        f"{jax.device_count()} in total", flush=True)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def _has_accelerator_hint() -> bool:
  return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")
