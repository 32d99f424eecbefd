"""Evaluation images, preprocessed one way for every consumer.

The kNN monitor, the final evaluation of pretraining and ``contrastive.downstream``
all read their labelled splits through here: in memory, each process's block of
a split is centre-cropped once with ``data.eval_crop_fraction`` (as the streamed
pipeline does) and batched with the last batch padded; streamed, the tf.data
pipeline decodes, resizes and crops. Every process yields the same number of
full batches, the padding masked out: the batch of ``padding.pad_batch``, which
both paths build.
"""

import dataclasses
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from contrastive.data import padding
from contrastive.data import pipeline
from contrastive.data import source_base
from contrastive.data import sources


def load_split(data, split: str, held: source_base.ImageArrays | None = None):
  """What evaluation batches are read from.

  In memory: this process's block of ``split`` (``held``: images already in
  memory, such as the training block, so they are not decoded again),
  centre-cropped. Streamed: the split's size; images are read at each pass.
  """
  if not data.in_memory:
    return sources.split_info(data, split)
  if held is None:
    held = sources.load_arrays(data, split, shard_index=jax.process_index(),
                               shard_count=jax.process_count())
  return dataclasses.replace(held, images=centre_crop(held.images,
                                                      float(data.eval_crop_fraction)))


def batches(data, split, local_batch: int) -> Iterator[dict]:
  """One pass over a split from :func:`load_split`: ``{'image', 'label', 'mask'}``."""
  if data.in_memory:
    return padded_batches(split.images, split.labels, local_batch)
  return pipeline.eval_iterator(data, split.split, local_batch, jax.process_index(),
                                jax.process_count())


def centre_crop(images: np.ndarray, fraction: float) -> np.ndarray:
  """The central ``fraction`` of each image, resized back to its size (bicubic):
  the in-memory counterpart of the streamed pipeline's resize + centre crop."""
  if fraction == 1:
    return images
  size = images.shape[1]
  side = size * fraction
  box = ((size - side) / 2, (size - side) / 2, (size + side) / 2, (size + side) / 2)
  return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC,
                                                            box=box))
                   for image in images])


def padded_batches(images, labels, local_batch: int, index=None) -> Iterator[dict]:
  """In-memory split -> ``{'image', 'label', 'mask'}`` batches, the last padded
  (with ``index``, each image's position in the split, also ``'index'``)."""
  labels = np.full(len(images), -1, np.int32) if labels is None else labels
  for start in range(0, len(images), local_batch):
    window = slice(start, start + local_batch)
    yield padding.pad_batch(images[window], labels[window], local_batch,
                    None if index is None else index[window])


def lockstep(batches: Iterator[dict], blank: dict) -> Iterator[dict]:
  """This process's batches, then ``blank`` ones until every process has run out,
  so that all processes take part in every collective of a pass."""
  batches = iter(batches)
  while True:
    batch = next(batches, None)
    if not multihost_utils.process_allgather(np.asarray(batch is not None)).any():
      return
    yield blank if batch is None else batch
