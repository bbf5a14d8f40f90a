"""Multi-host start-up: `jax.distributed.initialize` from flags or the usual environment."""

import os

from absl import flags
from absl import logging
import jax

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (else JAX_COORDINATOR_ADDRESS, or "
    "what Cloud TPU / SLURM provide).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize():
  """Joins the process group when several processes are asked for; a no-op for one process.

  Flags win over `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; on Cloud TPU and
  under SLURM `jax.distributed.initialize()` finds everything itself (set ASTRA_DISTRIBUTED=1).
  """
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  if address and num and num > 1:
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif os.environ.get("ASTRA_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value else None
