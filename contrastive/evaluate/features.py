"""Frozen-encoder features of a whole split, sharded over all devices.

The last batch is padded and masked, and processes that run out of batches early
feed masked padding until all are done, so every process takes part in every
collective.
"""

import numpy as np
from jax.experimental import multihost_utils

from contrastive import parallel
# Only the batching helper; TensorFlow is imported inside pipeline's functions.
from contrastive.data import pipeline


def padded_batches(images, labels, local_batch: int):
  """In-memory split -> ``{'image', 'label', 'mask'}`` batches, the last padded."""
  labels = np.full(len(images), -1, np.int32) if labels is None else labels
  for start in range(0, len(images), local_batch):
    yield pipeline.pad_batch(images[start:start + local_batch],
                             labels[start:start + local_batch], local_batch)


def extract_features(encode_step, state, batches, mesh, local_batch: int,
                     image_shape: tuple[int, int, int]):
  """All processes' features and labels, on every process.

  ``encode_step(state, images)`` is a per-replica function from
  :func:`parallel.per_replica`; ``batches`` yields this process's batches.
  """
  blank = pipeline.pad_batch(np.zeros((0, *image_shape), np.uint8),
                             np.zeros(0, np.int32), local_batch)
  features, labels = [], []
  batches = iter(batches)
  while True:
    batch = next(batches, None)
    have = np.asarray(batch is not None)
    if not multihost_utils.process_allgather(have).any():
      break
    batch = blank if batch is None else batch
    global_batch = parallel.host_to_global(batch, mesh)
    output = encode_step(state, global_batch['image'])
    gathered = multihost_utils.process_allgather(
        {'features': output, 'label': global_batch['label'],
         'mask': global_batch['mask']}, tiled=True)
    keep = np.asarray(gathered['mask'])
    features.append(np.asarray(gathered['features'])[keep])
    labels.append(np.asarray(gathered['label'])[keep])
  return np.concatenate(features), np.concatenate(labels)
