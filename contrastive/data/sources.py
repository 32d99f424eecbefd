"""In-memory image sources: whole splits (or one process's block of them) as uint8 arrays.

This module is the front door: it checks the arguments and hands each request to
the module of ``data.source``: ``digits``, ``folder`` or ``tfds_source``. What
those modules share (the split types, the split order and sharding rule, the
per-class holdout and the resize to a square) is in ``source_base``, which they
import instead of this module.

Nothing here imports TensorFlow: accelerator hosts may not have it installed, and
the digits and folder sources must work without it.
"""

from __future__ import annotations

from contrastive.data import digits
from contrastive.data import folder
from contrastive.data import source_base
from contrastive.data import tfds_source

SOURCES = ('digits', 'tfds', 'folder')

_MODULES = {'digits': digits, 'folder': folder, 'tfds': tfds_source}


def load_arrays(data, split: str, shard_index: int = 0,
                shard_count: int = 1) -> source_base.ImageArrays:
  """Loads block ``shard_index`` of ``shard_count`` of a split into memory.

  Args:
    data: the ``data`` ConfigDict: ``source``, ``image_size``, ``holdout_per_class``
      and, per source, ``path`` and ``eval_path`` (folder) or ``name``,
      ``data_dir``, ``train_split``, ``eval_split`` (tfds).
    split: 'train' or 'eval'.
    shard_index: which contiguous block of the split to return.
    shard_count: number of blocks the split is cut into.

  Returns:
    The block as uint8 images of shape [n, image_size, image_size, 3].
  """
  check_source(data.source)
  source_base.check_split(split)
  source_base.check_shard(shard_index, shard_count)
  return _source_module(data).load(data, split, shard_index, shard_count)


def split_info(data, split: str) -> source_base.SplitInfo:
  """Size and number of classes of a whole split, for step counts and streaming eval."""
  check_source(data.source)
  source_base.check_split(split)
  return _source_module(data).split_info(data, split)


def steps_per_epoch(data, num_images: int, global_batch: int) -> int:
  """Full global batches in an epoch of ``num_images`` training images; an error
  before anything is compiled when there is not one."""
  if num_images < global_batch:
    raise ValueError(
        f'The training split ({split_name(data, "train")}) has {num_images} images, fewer '
        f'than one global batch of {global_batch}: lower config.global_batch_size to at '
        f'most {num_images}, or add images.')
  return num_images // global_batch


def split_name(data, split: str) -> str:
  """Where a split's images come from, as the config names it, for messages."""
  if data.source == 'folder':
    eval_path = data.get('eval_path') or ''
    return (f'data.eval_path={eval_path!r}' if split == 'eval' and eval_path
            else f'data.path={data.path!r}')
  if data.source == 'tfds':
    tfds_split = data.train_split if split == 'train' else data.eval_split
    return f'TFDS {data.name} {tfds_split!r}'
  return f'data.source={data.source!r}'


def _source_module(data):
  """The module implementing the (checked) ``data.source``."""
  source_base.check_eval_path(data)
  return _MODULES[data.source]


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f'Unknown data.source={source!r}; expected one of {SOURCES}.')
