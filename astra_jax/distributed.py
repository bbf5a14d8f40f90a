"""Multi-host start-up and preemption: `jax.distributed.initialize` from flags or the usual
environment, and the step at which every process stops when one of them is preempted."""

from __future__ import annotations

import os
import signal

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (else JAX_COORDINATOR_ADDRESS, or "
    "what Cloud TPU / SLURM provide).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_joined = False  # Whether `initialize` joined a process group (JAX's preemption service runs).


def initialize():
  """Joins the process group when several processes are asked for; a no-op for one process.

  Flags win over `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; on Cloud TPU and
  under SLURM `jax.distributed.initialize()` finds everything itself (set ASTRA_DISTRIBUTED=1).
  """
  global _joined
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  if address and num and num > 1:
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif os.environ.get("ASTRA_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  else:
    return
  _joined = True
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value else None


class Preemption:
  """Whether to stop now because a process was preempted; every process gets the same answer.

  In a process group (`jax.distributed.initialize`), JAX's preemption service does it: the
  SIGTERM of any process reaches every other through the coordination service, and
  `multihost_utils.reached_preemption_sync_point(step)`, asked at every step, is True on all of
  them at the same step (the one after the furthest step any process had reached). No Python
  SIGTERM handler is installed then: it would replace JAX's and leave the others training.
  A lone process (no group) sets a flag in its own SIGTERM handler, read at the next step.

  Use as a context manager around the training loop; `reached(step)` after each step.
  """

  def __init__(self):
    self.collective = _joined or jax.process_count() > 1
    self._signal = None
    self._previous = None

  def __enter__(self) -> Preemption:
    if not self.collective:
      self._previous = signal.signal(signal.SIGTERM, self._note)
    return self

  def __exit__(self, *exc):
    if not self.collective:
      signal.signal(signal.SIGTERM, self._previous)

  def _note(self, signum, frame):
    del frame
    self._signal = signum

  def reached(self, step: int) -> bool:
    """True when every process is to save `step` and stop (call once per step, on all)."""
    if self.collective:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None


class Preempted(SystemExit):
  """Raised by `train.train_and_evaluate` once every process has saved `step` after a preemption
  notice; the same command resumes from `step`. Exit status 0: the run stopped as it was told
  and nothing failed (a scheduler that must restart it requeues on its own signal, e.g. SLURM's
  --requeue). A SystemExit, so that a script ends quietly; a notebook can catch it.
  """

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step

  def __str__(self) -> str:
    return (f"Preempted at step {self.step}: checkpoint saved; rerun the same command to "
            "resume")
