"""Training batches from images held in host memory, a pure function of the step.

Because a batch depends only on ``(seed, step)``, a resumed run sees exactly the
batches an uninterrupted one would have, and no input state is checkpointed.
Both samplers return, on each process, the rows of that process's devices only.
"""

import itertools
from typing import Iterator

import numpy as np
from jax.experimental import multihost_utils

from contrastive import parallel
from contrastive.data import sources


class InMemoryTrainData:
  """Pretraining batches, each device drawing from its own block of the split.

  The split is cut into one contiguous block per device of the mesh, and each
  device draws its part of every global batch from its own block, in an order
  fixed by (seed, epoch, device position). A process therefore loads only its
  devices' blocks, and a 2-process x 4-device run sees the same global batches as
  a 1-process x 8-device one.
  """

  def __init__(self, data_config, mesh, per_device_batch: int, seed: int):
    num_devices = mesh.devices.size
    self._positions = parallel.local_device_positions(mesh)
    blocks = [sources.load_arrays(data_config, 'train', shard_index=d,
                                  shard_count=num_devices) for d in self._positions]
    self._blocks = blocks
    self._images = [block.images for block in blocks]
    self._labels = [np.full(len(block.images), -1, np.int32) if block.labels is None
                    else block.labels for block in blocks]
    self.num_classes = blocks[0].num_classes
    # Blocks are cut from the file list before decoding, so an unreadable file
    # shortens its block: sizes and starts come from every device's decoded block.
    lengths = np.zeros(num_devices, np.int64)
    lengths[self._positions] = [len(images) for images in self._images]
    lengths = np.asarray(multihost_utils.process_allgather(lengths)).reshape(
        -1, num_devices).sum(axis=0)
    self.num_examples = int(lengths.sum())
    skipped = sum(block.skipped for block in blocks)
    self.skipped = int(np.sum(multihost_utils.process_allgather(np.asarray(skipped))))
    # Where each device's block starts in the split: images carry their split index.
    starts = np.cumsum(lengths) - lengths
    self._starts = [int(starts[d]) for d in self._positions]
    # Every device draws the same number of images per epoch: the shortest block's.
    self._block_length = int(lengths.min())
    self._batch = per_device_batch
    self._seed = seed
    self.steps_per_epoch = self._block_length // per_device_batch
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'The training split has {self.num_examples} images, fewer than one global '
          f'batch of {per_device_batch * num_devices}: lower config.global_batch_size.')
    self._orders = (None, None)

  def _order(self, epoch: int):
    if self._orders[0] != epoch:
      self._orders = (epoch, [
          np.random.default_rng([self._seed, epoch, position]).permutation(
              self._block_length) for position in self._positions])
    return self._orders[1]

  def process_block(self) -> sources.ImageArrays:
    """This process's block of the split, in the split's order, for evaluation.

    The device blocks are nested in the process block, so concatenating them in
    position order gives exactly ``load_arrays(..., process_index, process_count)``.
    """
    labels = [block.labels for block in self._blocks]
    return sources.ImageArrays(
        images=np.concatenate(self._images),
        labels=None if labels[0] is None else np.concatenate(labels),
        num_classes=self._blocks[0].num_classes, skipped=self.skipped)

  def process_indices(self) -> np.ndarray:
    """Each row of :meth:`process_block`'s position in the split (``index``)."""
    return np.concatenate([start + np.arange(len(images), dtype=np.int32)
                           for start, images in zip(self._starts, self._images)])

  def batch(self, step: int) -> dict:
    """``image`` uint8 [b, H, W, 3], ``label`` (-1: none) and ``index`` (position
    in the split) of a step."""
    epoch, position = divmod(step, self.steps_per_epoch)
    window = slice(position * self._batch, (position + 1) * self._batch)
    rows = [order[window] for order in self._order(epoch)]
    return {
        'image': np.concatenate([images[r] for images, r in zip(self._images, rows)]),
        'label': np.concatenate([labels[r] for labels, r in zip(self._labels, rows)]),
        'index': np.concatenate([start + r for start, r in zip(self._starts, rows)]
                                ).astype(np.int32),
    }

  def batches(self, start_step: int) -> Iterator[dict]:
    """The batches of ``start_step`` and every step after it."""
    return map(self.batch, itertools.count(start_step))


class LabelledTrainData:
  """Labelled batches from a (small) set of images that every process holds.

  Global batch ``s`` is the window ``[s B, (s + 1) B)`` of an endless stream of
  per-epoch permutations drawn from ``(seed, epoch)``: the same for any number of
  processes, and a label subset smaller than one batch still works.
  """

  def __init__(self, images, labels, mesh, global_batch: int, seed: int):
    self._images, self._labels = images, labels
    self._per_device = global_batch // mesh.devices.size
    self._positions = parallel.local_device_positions(mesh)
    self._global_batch = global_batch
    self._seed = seed
    self._orders = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      # A batch spans at most a few epochs: keep only the latest orders.
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = np.random.default_rng([self._seed, epoch]).permutation(
          len(self._labels))
    return self._orders[epoch]

  def batch(self, step: int) -> dict:
    n = len(self._labels)
    stream = np.arange(step * self._global_batch, (step + 1) * self._global_batch)
    rows = np.empty(self._global_batch, np.int64)
    for epoch in np.unique(stream // n):
      here = stream // n == epoch
      rows[here] = self._order(int(epoch))[stream[here] % n]
    local = np.concatenate([rows[p * self._per_device:(p + 1) * self._per_device]
                            for p in self._positions])
    return {'image': self._images[local], 'label': self._labels[local]}

  def batches(self, start_step: int) -> Iterator[dict]:
    return map(self.batch, itertools.count(start_step))
