"""This process's block of a split as encoded examples, for the streaming pipeline.

What to read and in which order, before any pixel is decoded: the files of an
image folder or the records of a TFDS split, cut to this process's floor block
(``source_base.shard_bounds``), either once in the split's fixed order
(evaluation: ``folder_in_order``, ``tfds_in_order``) or as an endless stream of
seeded passes (training: ``folder_stream``, ``tfds_stream``). Examples stay encoded bytes, so
skipping and shuffle buffers handle compressed images only; ``pipeline`` maps the
decoding and augmentation over them.

Each reader returns a tf.data dataset of ``{'encoded', 'label', 'index'}``
(``'position'`` too for a stream, with the examples of a pass) and a function
naming an example for the warnings about unreadable images. TensorFlow is
imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import numpy as np

from contrastive.data import folder
from contrastive.data import source_base
from contrastive.data import tf_import
from contrastive.data import tfds_source

# Encoded examples held by the tfds shuffle buffer (ImageNet JPEGs average ~110 kB).
# Image folders permute their whole file list instead.
_SHUFFLE_BUFFER = 10_000
# TFDS record files read at once while training (TFDS's own default).
_INTERLEAVED_FILES = 16


def _pass_draws(seed: int, shard_index: int, length: int, epoch: int):
  """Pass ``epoch``'s order of ``length`` files (a permutation) and shuffle-buffer
  seed, drawn from the arguments alone: any pass is redrawn without the ones before."""
  rng = np.random.default_rng([seed, shard_index, epoch])
  return rng.permutation(length), rng.integers(2**31 - 1, dtype=np.int64)


# ----------------------------------------------------------------------------- folder

def _folder_block(data, split: str, shard_index: int, shard_count: int):
  """(paths, int32 labels, first split index) of this process's block; None if empty."""
  listing = folder.folder_split(data, split)
  start, stop = source_base.shard_bounds(len(listing.paths), shard_index, shard_count)
  paths = listing.paths[start:stop]
  if not paths:
    return None
  labels = (np.full(len(paths), -1, np.int32) if listing.labels is None
            else listing.labels[start:stop])
  return paths, labels, start


def folder_in_order(data, split, shard_index, shard_count):
  """``(examples, (start, stop), name_of)``: the block's ``{'encoded', 'label',
  'index'}`` in the split's order, its index range, and index -> file path."""
  tf = tf_import.import_tensorflow()
  block = _folder_block(data, split, shard_index, shard_count)
  if block is None:
    return None
  paths, labels, start = block
  index = np.arange(start, start + len(paths), dtype=np.int32)
  ds = tf.data.Dataset.from_tensor_slices({'path': paths, 'label': labels, 'index': index})
  ds = ds.map(lambda ex: {'encoded': tf.io.read_file(ex['path']), 'label': ex['label'],
                          'index': ex['index']},
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds, (start, start + len(paths)), lambda i: paths[i - start]


def folder_stream(data, seed, shard_index, shard_count, start_position):
  """``(stream, length, name_of)``: the block's endless ``{'encoded', 'label', 'index',
  'position'}`` from ``start_position`` on (see ``pipeline.train_iterator``), its
  files a pass, and position -> file path. Files before ``start_position`` are not
  read."""
  tf = tf_import.import_tensorflow()
  block = _folder_block(data, 'train', shard_index, shard_count)
  if block is None:
    return None
  paths, labels, start = block
  length = len(paths)
  order = functools.lru_cache(maxsize=2)(
      lambda epoch: _pass_draws(seed, shard_index, length, epoch)[0])
  first_epoch, first_offset = divmod(start_position, length)

  def pass_files(epoch):
    files = tf.numpy_function(lambda e: order(int(e)), [epoch], tf.int64, stateful=False)
    files.set_shape([length])
    skip = first_offset * tf.cast(epoch == first_epoch, tf.int64)
    return tf.data.Dataset.from_tensor_slices(
        {'position': tf.range(epoch * length + skip, (epoch + 1) * length),
         'file': files[skip:]})

  path_table, label_table = tf.constant(paths), tf.constant(labels)

  def read(example):
    file = example['file']
    return {'encoded': tf.io.read_file(tf.gather(path_table, file)),
            'label': tf.gather(label_table, file),
            'index': tf.cast(file + start, tf.int32), 'position': example['position']}

  ds = tf.data.Dataset.counter(first_epoch).flat_map(pass_files)
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE)

  def name_of(position):
    epoch, offset = divmod(position, length)
    return paths[order(epoch)[offset]]

  return ds, length, name_of


# ----------------------------------------------------------------------------- tfds

@dataclasses.dataclass(frozen=True)
class _TfdsBlock:
  """This process's block of a TFDS split as record files, in the split's order."""
  files: tuple[np.ndarray, ...]  # per file: path, records to skip, records to take,
                                 # split index of the first record taken
  length: int                    # examples in the block
  read: Callable                 # (path, skip, take, first) -> {'record', 'index'} dataset
  parse: Callable                # {'record', 'index'} -> {'encoded', 'label', 'index'}
  name: str                      # the dataset and split, for messages


def _tfds_block(data, split, shard_index, shard_count) -> _TfdsBlock | None:
  """None when the block is empty. Records stay serialized until ``parse``, so
  skipping and shuffle buffers handle bytes only."""
  tf = tf_import.import_tensorflow()
  tfds = tfds_source.import_tfds()
  builder = tfds_source.tfds_builder(data)
  has_label, _ = tfds_source.tfds_label_info(builder, data.name)
  features = builder.info.features
  if not isinstance(features['image'], tfds.features.Image):
    raise ValueError(f"Streaming needs an encoded tfds.features.Image 'image' feature; "
                     f"{data.name!r} has {features['image']!r}.")
  split_name = tfds_source.tfds_split_name(data, split)
  instruction, _ = tfds_source.tfds_shard(builder, split_name, shard_index, shard_count)
  if instruction is None:
    return None
  file_format = builder.info.file_format
  adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[file_format]
  if not adapter.SUPPORTS_TF_DATA:
    raise ValueError(f'TFDS dataset {data.name!r} is stored as {file_format.value} files, '
                     'which tf.data cannot read; prepare it as tfrecord to stream it.')
  # A record's split index is its file's offset plus its number within the file.
  offsets = tfds_source.tfds_file_offsets(builder, split_name)
  instructions = builder.info.splits[instruction].file_instructions
  files = (np.array([f.filename for f in instructions]),
           np.array([f.skip for f in instructions], np.int64),
           np.array([f.take for f in instructions], np.int64),
           np.array([offsets[os.path.basename(f.filename)] + f.skip for f in instructions],
                    np.int64))

  def read(path, skip, take, first):
    return tf.data.Dataset.zip({'record': adapter.make_tf_data(path).skip(skip).take(take),
                                'index': tf.data.Dataset.range(first, first + take)})

  def parse(example):
    fields = features.deserialize_example(example['record'],
                                          decoders={'image': tfds.decode.SkipDecoding()})
    label = (tf.cast(fields['label'], tf.int32) if has_label
             else tf.constant(-1, tf.int32))
    return {'encoded': fields['image'], 'label': label,
            'index': tf.cast(example['index'], tf.int32)}

  return _TfdsBlock(files=files, length=int(files[2].sum()), read=read, parse=parse,
                    name=f'TFDS {data.name} {split_name!r}')


def tfds_in_order(data, split, shard_index, shard_count):
  """Like ``folder_in_order``; one file at a time, so the order is the split's fixed
  order (the in-memory source's) whatever the block."""
  tf = tf_import.import_tensorflow()
  block = _tfds_block(data, split, shard_index, shard_count)
  if block is None:
    return None
  ds = tf.data.Dataset.from_tensor_slices(block.files).flat_map(block.read)
  ds = ds.map(block.parse, num_parallel_calls=tf.data.AUTOTUNE)
  start = int(block.files[3][0])
  return ds, (start, start + block.length), lambda i: f'record {i} of {block.name}'


def tfds_stream(data, seed, shard_index, shard_count, start_position):
  """Like ``folder_stream``. Pass ``e`` reads the block's record files in an order
  drawn from ``(seed, shard_index, e)``, several at once in a fixed rotation, through
  a shuffle buffer seeded from the same. Resuming reads the records of the current
  pass before ``start_position`` (the buffer needs them) without parsing or decoding."""
  tf = tf_import.import_tensorflow()
  block = _tfds_block(data, 'train', shard_index, shard_count)
  if block is None:
    return None
  num_files, length = len(block.files[0]), block.length
  first_epoch, first_offset = divmod(start_position, length)

  def pass_records(epoch):
    order, buffer_seed = tf.numpy_function(
        lambda e: _pass_draws(seed, shard_index, num_files, int(e)), [epoch],
        (tf.int64, tf.int64), stateful=False)
    records = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(f, order)
                                                       for f in block.files))
    records = records.interleave(block.read, cycle_length=min(_INTERLEAVED_FILES, num_files),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = records.shuffle(_SHUFFLE_BUFFER, seed=buffer_seed,
                              reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(epoch * length, (epoch + 1) * length)
    skip = first_offset * tf.cast(epoch == first_epoch, tf.int64)
    return tf.data.Dataset.zip((records, positions)).skip(skip)

  def parse_at(example, position):
    return {**block.parse(example), 'position': position}

  ds = tf.data.Dataset.counter(first_epoch).flat_map(pass_records)
  ds = ds.map(parse_at, num_parallel_calls=tf.data.AUTOTUNE)
  return ds, length, lambda position: f'at stream position {position} of {block.name}'
