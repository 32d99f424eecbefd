"""What every image source shares: the split types, names and rules, and the image form.

A split held in memory is an ``ImageArrays``, and its size without its images a
``SplitInfo``. Every split has a fixed example order that does not depend on the
number of processes, and process ``i`` of ``c`` gets the contiguous block
``[floor(i*N/c), floor((i+1)*N/c))``. With floor arithmetic, block ``p`` of ``P``
is exactly the union of blocks ``p*L .. p*L+L-1`` of ``P*L``, so data sharded over
processes can be re-sharded over local devices without moving examples. A source
without a separate eval split holds out the first ``data.holdout_per_class``
images of each class; images are resized to uint8 squares.

The sources (``digits``, ``folder``, ``tfds_source``), their front door
``sources`` and the streaming pipeline import this module, and it imports none of
them. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

SPLITS = ('train', 'eval')


@dataclasses.dataclass(frozen=True)
class ImageArrays:
  """One split held in memory."""
  images: np.ndarray          # uint8 [N, S, S, 3]
  labels: np.ndarray | None   # int32 [N], None for an unlabelled folder
  num_classes: int | None
  skipped: int = 0            # corrupt/unreadable image files skipped while loading


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """Size and label count of a whole split, known without decoding its images."""
  split: str                  # 'train' or 'eval'
  num_examples: int           # image files listed (folder) or examples (tfds, digits)
  num_classes: int | None


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f'Invalid shard {shard_index} of {shard_count}: need shard_count >= 1 and '
        '0 <= shard_index < shard_count.')


def check_eval_path(data) -> None:
  """A separate evaluation folder only makes sense for the folder source."""
  # .get: configs saved before the field existed lack it.
  eval_path = data.get('eval_path') or ''
  if eval_path and data.source != 'folder':
    hint = ' (its eval split is data.eval_split)' if data.source == 'tfds' else ''
    raise ValueError(f"data.eval_path={eval_path!r} is only for data.source='folder', "
                     f'not {data.source!r}{hint}; leave data.eval_path empty.')


def shard_bounds(total: int, shard_index: int, shard_count: int) -> tuple[int, int]:
  """Returns the [start, stop) of a block; floor arithmetic keeps blocks nested."""
  return total * shard_index // shard_count, total * (shard_index + 1) // shard_count


def holdout_indices(labels: np.ndarray, holdout_per_class: int, split: str, what: str,
                    class_names: list[str]) -> np.ndarray:
  """Indices (in order) of one split: the first ``holdout_per_class`` of each class are 'eval'.

  ``class_names[label]`` names a class too small for the holdout in the error, as
  its user knows it (a folder's sub-folder name), within ``what``.
  """
  if holdout_per_class < 0:
    raise ValueError(f'data.holdout_per_class must be >= 0, got {holdout_per_class}.')
  if split == 'eval' and holdout_per_class == 0:
    raise ValueError(
        f'The {what} has no separate eval split: set data.holdout_per_class > 0 to hold '
        'out that many images per class for evaluation.')
  classes, counts = np.unique(labels, return_counts=True)
  too_small = [(class_names[c], int(n)) for c, n in zip(classes, counts)
               if n <= holdout_per_class]
  if too_small:
    named = ', '.join(f'{name!r} {n}' for name, n in too_small[:5])
    more = f', {len(too_small) - 5} more' if len(too_small) > 5 else ''
    raise ValueError(
        f'data.holdout_per_class={holdout_per_class} would leave no training images in '
        f'{len(too_small)} classes of the {what} (their images: {named}{more}): lower it '
        f'to at most {min(n for _, n in too_small) - 1}, or add images to those classes.')
  # Rank of each example among the examples of its class, in order: a stable sort
  # groups the classes, and the rank is the position minus the group's start.
  by_class = np.argsort(labels, kind='stable')
  sorted_labels = labels[by_class]
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
  held_out = rank < holdout_per_class
  return np.flatnonzero(held_out if split == 'eval' else ~held_out)


def fit_square(image: Image.Image, size: int) -> Image.Image:
  """Resizes the shorter side to ``size`` and centre-crops to size x size (one resample)."""
  width, height = image.size
  if (width, height) == (size, size):
    return image
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def to_rgb_square(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] (C in 1, 3, 4) or [H, W] -> uint8 [size, size, 3]."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.shape[:2] == (size, size) and array.ndim == 3 and array.shape[-1] == 3:
    return array
  return np.asarray(fit_square(Image.fromarray(array).convert('RGB'), size))


def stack_images(images: list[np.ndarray], size: int) -> np.ndarray:
  """[size, size, 3] images -> [n, size, size, 3], also for n == 0."""
  if not images:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack(images)
