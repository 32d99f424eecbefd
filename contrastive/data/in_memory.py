"""Training batches from images held in host memory, a pure function of the step.

Global batch ``s`` is a window of a permutation of the images drawn from
``(seed, epoch)``: it depends on neither the number of devices nor the number of
processes, so a run resumed on another layout sees exactly the batches an
uninterrupted one would have, and no input state is checkpointed. Each process
returns only its devices' rows of the global batch, in device-position order.
"""

import dataclasses
import itertools
from typing import Iterator

import jax
import numpy as np

from contrastive import parallel
from contrastive.data import source_base
from contrastive.data import sources


class _Sampler:
  """Per-epoch permutations of a set of rows, and a global batch's local rows."""

  def __init__(self, num_rows: int, mesh, global_batch: int, seed: int):
    self._num_rows = num_rows
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
          self._num_rows)
    return self._orders[epoch]

  def _local(self, rows: np.ndarray) -> np.ndarray:
    """This process's devices' part of a global batch's rows, in position order."""
    return np.concatenate([rows[p * self._per_device:(p + 1) * self._per_device]
                           for p in self._positions])

  def batches(self, start_step: int) -> Iterator[dict]:
    """The subclass's ``batch`` of ``start_step`` and of every step after it."""
    return map(self.batch, itertools.count(start_step))


class InMemoryTrainData(_Sampler):
  """Pretraining batches from the whole training split, which every process holds.

  Epoch ``e`` is a permutation of the split drawn from ``(seed, e)``, cut into
  ``steps_per_epoch = N // global batch`` windows (its last ``N mod B`` images are
  left out). Any device may need any image, so every process holds the whole
  split in host memory: this is meant for CIFAR-scale splits, not ImageNet.
  """

  def __init__(self, data_config, mesh, per_device_batch: int, seed: int):
    # Loaded as the processes' blocks, because blocks are cut from the file list
    # before decoding: where this process's block lies in the decoded split is
    # known only from the decoded sizes of the blocks before it.
    count = jax.process_count()
    blocks = [sources.load_arrays(data_config, 'train', shard_index=p, shard_count=count)
              for p in range(count)]
    self._images = np.concatenate([block.images for block in blocks])
    self._labels = np.concatenate([
        np.full(len(block.images), -1, np.int32) if block.labels is None else block.labels
        for block in blocks])
    self.num_examples = len(self._images)
    self.num_classes = blocks[0].num_classes
    self.skipped = sum(block.skipped for block in blocks)
    here = jax.process_index()
    start = sum(len(block.images) for block in blocks[:here])
    stop = start + len(blocks[here].images)
    self._block = dataclasses.replace(
        blocks[here], images=self._images[start:stop],
        labels=None if blocks[here].labels is None else self._labels[start:stop])
    self._block_indices = np.arange(start, stop, dtype=np.int32)
    if self.num_examples == 0 and self.skipped:
      raise ValueError(
          f'None of the {self.skipped} image files of the training split '
          f'({sources.split_name(data_config, "train")}) could be read (the warnings above '
          'name them and why): replace them, or point the config at readable images.')
    global_batch = per_device_batch * mesh.devices.size
    super().__init__(self.num_examples, mesh, global_batch, seed)
    self.steps_per_epoch = sources.steps_per_epoch(data_config, self.num_examples,
                                                   global_batch)

  def process_block(self) -> source_base.ImageArrays:
    """This process's block of the split in the split's order, for evaluation:
    ``load_arrays(..., process_index, process_count)`` without decoding it again."""
    return self._block

  def process_indices(self) -> np.ndarray:
    """Each row of :meth:`process_block`'s position in the split (``index``)."""
    return self._block_indices

  def batch(self, step: int) -> dict:
    """``image`` uint8 [b, H, W, 3], ``label`` (-1: none) and ``index`` (position
    in the split) of this process's rows of a step."""
    epoch, window = divmod(step, self.steps_per_epoch)
    start = window * self._global_batch
    rows = self._local(self._order(epoch)[start:start + self._global_batch])
    return {'image': self._images[rows], 'label': self._labels[rows],
            'index': rows.astype(np.int32)}


class LabelledTrainData(_Sampler):
  """Labelled batches from a (small) set of images that every process holds.

  Global batch ``s`` is the window ``[s B, (s + 1) B)`` of an endless stream of
  per-epoch permutations drawn from ``(seed, epoch)``, so a label subset smaller
  than one batch still works.
  """

  def __init__(self, images, labels, mesh, global_batch: int, seed: int):
    super().__init__(len(labels), mesh, global_batch, seed)
    self._images, self._labels = images, labels

  def batch(self, step: int) -> dict:
    n = self._num_rows
    stream = np.arange(step * self._global_batch, (step + 1) * self._global_batch)
    rows = np.empty(self._global_batch, np.int64)
    for epoch in np.unique(stream // n):
      here = stream // n == epoch
      rows[here] = self._order(int(epoch))[stream[here] % n]
    local = self._local(rows)
    return {'image': self._images[local], 'label': self._labels[local]}
