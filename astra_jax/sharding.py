"""The device mesh and host -> device transfers of the data-parallel step.

One 1-D mesh axis, `'data'`, over every device of every process: batches are split along it and
the train state is replicated (the pmap layout, written with `jax.shard_map`). Each host feeds
its own rows of a global batch; `to_global` assembles them into one global array.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  """A 1-D `'data'` mesh over `devices` (default: all devices of all processes).

  Built with `Mesh` directly, so the axis is of the Auto type that `shard_map` with an explicit
  `lax.pmean` expects (`jax.make_mesh` defaults to Explicit axes).
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state and of the step's RNG key: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a global batch: axis 0 split along `'data'`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows of a batch (a dict of arrays, axis 0 = examples) -> global arrays sharded
  along `'data'`; the global batch is the concatenation of every host's rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def check_global_batch(global_batch: int, what: str = "config.batch_size") -> int:
  """The per-device batch of `global_batch` split evenly over every device of every process.

  Any per-device batch >= 1 is allowed; raises ValueError naming the numbers otherwise.
  """
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch < devices or global_batch % devices:
    lower = max(devices, global_batch // devices * devices)
    raise ValueError(
        f"{what}={global_batch} is invalid: the global batch must be a multiple of the device "
        f"count {devices} ({processes} process(es) x {jax.local_device_count()} local "
        f"device(s)), with at least 1 example per device; e.g. {lower} or {lower + devices}")
  return global_batch // devices


def prefetch_to_device(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
                       ) -> Iterator[dict[str, jax.Array]]:
  """`to_global` of each host batch, `size` batches ahead of the consumer.

  The transfers are asynchronous: while the device runs step k, the batches of steps k+1 ..
  k+size are already on their way, so the step never waits on the host -> device copy.
  """
  queue = collections.deque()
  iterator = iter(batches)
  def enqueue(n):
    for batch in iterator:
      queue.append(to_global(batch, mesh))
      if len(queue) >= n:
        return
  enqueue(size)
  while queue:
    batch = queue.popleft()
    enqueue(size)  # Before handing `batch` out: `size` more are in flight while it is used.
    yield batch
