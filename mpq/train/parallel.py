"""Data parallelism over all visible JAX devices, and multi-host start-up.

One mesh axis, `data`. The train state is replicated (`P()`); each batch is split over `data`
(`P('data')`). Each process reads its own shard of the examples and contributes its rows with
`jax.make_array_from_process_local_data`, so the same code runs on one CPU, on several local
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) and on several hosts.

Multi-host: set `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every
host (or run under a cluster that `jax.distributed.initialize()` detects by itself, e.g. SLURM with
`MPQ_DISTRIBUTED=1`), then start the same `train.py` command on each host.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mpq.errors import UserError

_initialized = False


def maybe_initialize_distributed() -> None:
  global _initialized
  if _initialized:
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
  elif os.environ.get("MPQ_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  _initialized = True


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise UserError(f"config.{what}={batch_size} is not divisible by the {n} devices; "
                    f"use a multiple of {n}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays split over the `data` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
