"""Mesh, shardings, host batch -> global array, and the per-replica step wrapper.

Every step is written per replica with collectives over :data:`AXIS` and mapped
onto all devices of all processes with ``jax.jit(jax.shard_map(...))``.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def check_global_batch(global_batch: int, mesh,
                       field: str = 'config.global_batch_size') -> int:
  """Returns the per-process batch; a clear error when it does not divide."""
  devices = mesh.devices.size
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(
        f'{field}={global_batch} must be a positive multiple of '
        f'the number of devices ({devices}: {jax.process_count()} process(es) x '
        f'{jax.local_device_count()} local device(s)); try '
        f'{max(devices, global_batch // devices * devices)}.')
  return global_batch // jax.process_count()


def local_device_positions(mesh) -> list[int]:
  """Positions along the data axis of this process's devices, in row order.

  A process's local batch fills exactly these positions of the global batch, so
  the data module can give each device its own shard of the dataset.
  """
  return sorted(i for i, d in enumerate(mesh.devices.flat)
                if d.process_index == jax.process_index())


def host_to_global(local_batch, mesh):
  """Each process's numpy slice -> one global array split along the data axis."""
  sharding = sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def host_copy(tree):
  """A replicated global array tree as numpy, on any process (each holds a copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def per_replica(fn, mesh, in_specs, out_specs, donate_argnums=()):
  """``fn`` written for one replica, run on every device of ``mesh``."""
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 donate_argnums=donate_argnums)
