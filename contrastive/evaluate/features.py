"""Frozen-encoder features of a whole split, sharded over all devices.

The last batch is padded and masked, and processes that run out of batches early
feed masked padding until all are done, so every process takes part in every
collective.
"""

import numpy as np
from jax.experimental import multihost_utils

from contrastive import parallel
from contrastive.data import evaluation


def extract_features(encode_step, state, batches, mesh, local_batch: int,
                     image_shape: tuple[int, int, int]):
  """All processes' features and labels, on every process.

  ``encode_step(state, images)`` is a per-replica function from
  :func:`parallel.per_replica`; ``batches`` yields this process's batches.
  """
  blank = evaluation.pad_batch(np.zeros((0, *image_shape), np.uint8),
                             np.zeros(0, np.int32), local_batch)
  features, labels = [], []
  for batch in evaluation.lockstep(batches, blank):
    global_batch = parallel.host_to_global(batch, mesh)
    output = encode_step(state, global_batch['image'])
    gathered = multihost_utils.process_allgather(
        {'features': output, 'label': global_batch['label'],
         'mask': global_batch['mask']}, tiled=True)
    keep = np.asarray(gathered['mask'])
    features.append(np.asarray(gathered['features'])[keep])
    labels.append(np.asarray(gathered['label'])[keep])
  return np.concatenate(features), np.concatenate(labels)
