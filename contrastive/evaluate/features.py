"""Frozen-encoder features of a whole split, sharded over all devices.

The last batch is padded and masked, and processes that run out of batches early
feed masked padding until all are done, so every process takes part in every
collective.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from contrastive import parallel
from contrastive.data import evaluation
from contrastive.data import padding


def _encoded(encode_step, state, batches, mesh, local_batch: int,
             image_shape: tuple[int, int, int]):
  """(features, global batch) of each batch, in lockstep across processes."""
  blank = padding.pad_batch(np.zeros((0, *image_shape), np.uint8), np.zeros(0, np.int32),
                            local_batch)
  for batch in evaluation.lockstep(batches, blank):
    global_batch = parallel.host_to_global(batch, mesh)
    yield encode_step(state, global_batch['image']), global_batch


def extract_features(encode_step, state, batches, mesh, local_batch: int,
                     image_shape: tuple[int, int, int]):
  """All processes' features and labels, on every process's host.

  ``encode_step(state, images)`` is a per-replica function from
  :func:`parallel.per_replica`; ``batches`` yields this process's batches.
  """
  features, labels = [], []
  for output, global_batch in _encoded(encode_step, state, batches, mesh, local_batch,
                                       image_shape):
    gathered = multihost_utils.process_allgather(
        {'features': output, 'label': global_batch['label'],
         'mask': global_batch['mask']}, tiled=True)
    keep = np.asarray(gathered['mask'])
    features.append(np.asarray(gathered['features'])[keep])
    labels.append(np.asarray(gathered['label'])[keep])
  return np.concatenate(features), np.concatenate(labels)


def sharded_features(encode_step, state, batches, mesh, local_batch: int,
                     image_shape: tuple[int, int, int]):
  """Features and labels of a whole split as global arrays split along the data
  axis, label -1 on padding rows: a kNN bank too large for one device or host.

  Each device keeps the rows it encoded, its batches stacked in order, so no
  feature moves between devices or to a host. Arguments as for
  :func:`extract_features`.
  """
  features, labels = [], []
  for output, global_batch in _encoded(encode_step, state, batches, mesh, local_batch,
                                       image_shape):
    features.append(output)
    labels.append(jnp.where(global_batch['mask'], global_batch['label'], -1))
  return _stack_local(features), _stack_local(labels)


def _stack_local(arrays):
  """Global arrays split along the data axis -> one, each device's own shards
  concatenated on that device."""
  shards = [{s.device: s.data for s in a.addressable_shards} for a in arrays]
  local = [jnp.concatenate([shard[device] for shard in shards]) for device in shards[0]]
  shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
  return jax.make_array_from_single_device_arrays(shape, arrays[0].sharding, local)
