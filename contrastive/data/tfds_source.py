"""The ``tfds`` source: a TensorFlow Datasets builder prepared (or preparable) locally.

The configured splits (``data.train_split``, ``data.eval_split``) may be sliced
or summed TFDS split specs such as 'train[5000:]+validation'; they are resolved
to absolute example ranges, so the floor blocks of ``source_base.shard_bounds``
work on them too. The builder, split and label helpers are shared with the
streaming pipeline's ``block_readers.py``.

TensorFlow and TensorFlow Datasets are imported only inside these functions:
accelerator hosts may not have them installed, and the other sources must work
without them.
"""

from __future__ import annotations

import difflib
import functools
import operator
import textwrap

import numpy as np

from contrastive.data import host_image_ops
from contrastive.data import source_base
from contrastive.data import tf_import


def load(data, split: str, shard_index: int, shard_count: int) -> source_base.ImageArrays:
  """Block ``shard_index`` of ``shard_count`` of a split (see ``sources.load_arrays``)."""
  tfds = import_tfds()
  builder = tfds_builder(data)
  has_label, num_classes = tfds_label_info(builder, data.name)
  instruction, _ = tfds_shard(builder, tfds_split_name(data, split), shard_index, shard_count)
  images, labels = [], []
  if instruction is not None:
    # Encoded images are decoded as the streaming pipeline decodes them.
    encoded = isinstance(builder.info.features['image'], tfds.features.Image)
    # One file at a time: the default interleaving of files would make the order
    # of a block differ from its order inside a bigger block.
    dataset = builder.as_dataset(
        split=instruction, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
        decoders={'image': tfds.decode.SkipDecoding()} if encoded else None)
    if encoded:
      tf = tf_import.import_tensorflow()
      dataset = dataset.map(lambda ex: {**ex, 'image': host_image_ops.decode(tf, ex['image'])},
                            num_parallel_calls=tf.data.AUTOTUNE)
    # Crossing from tf.data to numpy per example costs more than decoding a CIFAR
    # image, so batch whenever all images share one shape.
    batch_size = 1 if None in builder.info.features['image'].shape else 1024
    for batch in tfds.as_numpy(dataset.batch(batch_size)):
      images.extend(source_base.to_rgb_square(image, data.image_size) for image in batch['image'])
      if has_label:
        labels.extend(batch['label'])
  return source_base.ImageArrays(images=source_base.stack_images(images, data.image_size),
                                 labels=np.asarray(labels, np.int32) if has_label else None,
                                 num_classes=num_classes)


def split_info(data, split: str) -> source_base.SplitInfo:
  builder = tfds_builder(data)
  _, num_classes = tfds_label_info(builder, data.name)
  ranges = _tfds_ranges(builder, tfds_split_name(data, split))
  return source_base.SplitInfo(split=split,
                               num_examples=sum(stop - start for _, start, stop in ranges),
                               num_classes=num_classes)


def import_tfds():
  """Imports TensorFlow Datasets (and TensorFlow with GPUs hidden)."""
  tf_import.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  return tfds


def tfds_split_name(data, split: str) -> str:
  """Maps 'train'/'eval' to the configured TFDS split (which may itself be sliced)."""
  source_base.check_split(split)
  source_base.check_eval_path(data)  # Also reached by the streaming pipeline.
  return data.train_split if split == 'train' else data.eval_split


def tfds_builder(data):
  """Returns the TFDS builder for ``data.name``, preparing the dataset if it is not yet.

  Raises:
    ValueError: the name is not a known TFDS dataset (close names are suggested).
    FileNotFoundError: the dataset is not prepared under the data dir and preparing it
      here failed (e.g. no internet, or a manual download is required).
  """
  tfds = import_tfds()
  try:
    builder = tfds.builder(data.name, data_dir=data.data_dir)
  except tfds.core.DatasetNotFoundError as err:
    base_name = data.name.split(':')[0].split('/')[0].lower()
    known = sorted(set(tfds.list_builders(with_community_datasets=False)))
    close = difflib.get_close_matches(base_name, known, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
    raise ValueError(f'data.name={data.name!r} is not a known TFDS dataset.{hint}') from err
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    # Download and generation fail in many ways (network, checksums, missing manual
    # files); all of them mean the same thing to the user, explained below.
    except Exception as err:  # pylint: disable=broad-except
      raise FileNotFoundError(_not_prepared_message(builder, data.name, err)) from err
  return builder


def _not_prepared_message(builder, name: str, err: Exception) -> str:
  root = builder.data_dir_root
  cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else ''
  message = (f'TFDS dataset {name!r} is not prepared under {root}, and preparing it here '
             f'failed ({type(err).__name__}: {cause}).\n')
  build = f'  tfds build {name} --data_dir={root}\n'
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    instructions = textwrap.dedent(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).strip()
    return message + (
        f'{name} needs a manual download: put its files in {root}/downloads/manual/, then run\n'
        f'{build}TFDS instructions:\n' + textwrap.indent(instructions, '  '))
  return message + (
      f'Prepare it on a machine with internet access:\n{build}'
      f'then copy {root}/{builder.name} to {root} on this machine, or set data.data_dir to '
      'a directory that already holds it.')


def tfds_shard(builder, split_name: str, shard_index: int, shard_count: int):
  """Read instruction for one floor block of a (possibly sliced or summed) TFDS split.

  The split is resolved to absolute example ranges first, so nested slicing such
  as block 1 of 4 of 'train[5000:]' works.

  Returns:
    (instruction, num_examples_in_split): instruction is None for an empty block.
  """
  tfds = import_tfds()
  ranges = _tfds_ranges(builder, split_name)
  total = sum(stop - start for _, start, stop in ranges)
  lo, hi = source_base.shard_bounds(total, shard_index, shard_count)
  pieces, offset = [], 0
  for name, start, stop in ranges:
    begin, end = max(lo - offset, 0), min(hi - offset, stop - start)
    if begin < end:
      pieces.append(
          tfds.core.ReadInstruction(name, from_=start + begin, to=start + end, unit='abs'))
    offset += stop - start
  instruction = functools.reduce(operator.add, pieces) if pieces else None
  return instruction, total


def _tfds_ranges(builder, split_name: str) -> list[tuple[str, int, int]]:
  """A split spec such as 'train[5000:]+validation' as (split, start, stop) example ranges."""
  tfds = import_tfds()
  split_infos = builder.info.splits
  ranges = []
  for part in tfds.core.ReadInstruction.from_spec(split_name).to_absolute(split_infos):
    stop = split_infos[part.splitname].num_examples if part.to is None else part.to
    ranges.append((part.splitname, part.from_ or 0, stop))
  return ranges


def tfds_file_offsets(builder, split_name: str) -> dict[str, int]:
  """Per record file of a TFDS split spec, what turns a record number into the
  example's position in the spec (``offset + record``).

  A file read by two parts of the spec (such as 'train[:10]+train[20:30]') has no
  single offset: such specs are refused.
  """
  offsets, position = {}, 0
  for name, start, stop in _tfds_ranges(builder, split_name):
    info = builder.info.splits[name]
    first = 0
    for filename, length in zip(info.filenames, info.shard_lengths):
      if first < stop and first + length > start:
        if filename in offsets:
          raise ValueError(f'The TFDS split {split_name!r} reads {filename} twice; '
                           'per-image indices need each file in one part of the split.')
        offsets[filename] = position + first - start
      first += length
    position += stop - start
  return offsets


def tfds_label_info(builder, name: str) -> tuple[bool, int | None]:
  """Checks the 'image' feature exists; returns (has 'label' feature, number of classes)."""
  features = builder.info.features
  if 'image' not in features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' feature; it has {list(features)}.")
  if 'label' not in features:
    return False, None
  return True, getattr(features['label'], 'num_classes', None)
