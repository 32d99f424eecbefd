"""The ``digits`` source: scikit-learn's 8x8 handwritten digits, upsampled.

Small enough for a CPU quickstart and needs no download. The eval split is
``data.holdout_per_class`` images of each class held out of the training split.
"""

from __future__ import annotations

import numpy as np

from contrastive.data import source_base

NUM_CLASSES = 10


def load(data, split: str, shard_index: int, shard_count: int) -> source_base.ImageArrays:
  """Block ``shard_index`` of ``shard_count`` of a split (see ``sources.load_arrays``)."""
  images, labels = _digits_split(data, split)
  start, stop = source_base.shard_bounds(len(labels), shard_index, shard_count)
  # Values are 0..16; scale to the full uint8 range.
  small = np.round(images[start:stop] * (255.0 / 16.0)).astype(np.uint8)
  resized = [source_base.to_rgb_square(image, data.image_size) for image in small]
  return source_base.ImageArrays(images=source_base.stack_images(resized, data.image_size),
                                 labels=labels[start:stop], num_classes=NUM_CLASSES)


def split_info(data, split: str) -> source_base.SplitInfo:
  _, labels = _digits_split(data, split)
  return source_base.SplitInfo(split=split, num_examples=len(labels), num_classes=NUM_CLASSES)


def _digits_split(data, split) -> tuple[np.ndarray, np.ndarray]:
  """One split of the digits in its fixed order: (images 0..16 [N, 8, 8], int32 labels)."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  images, labels = digits.images[order], digits.target[order].astype(np.int32)
  indices = source_base.holdout_indices(labels, data.holdout_per_class, split,
                                        'digits dataset', [str(d) for d in range(NUM_CLASSES)])
  return images[indices], labels[indices]
