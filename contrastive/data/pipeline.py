"""Streaming host input pipeline (tf.data) for datasets too large for host memory.

Each process reads only its floor block of the split (see
``source_base.shard_bounds``), keeps examples encoded until after shuffling (so a
shuffle buffer holds compressed bytes, not decoded ImageNet images), then decodes
and does the geometric part of SimCLR's augmentation on the host: a random resized
crop and a horizontal flip per view. Colour augmentations run later on the
accelerator (``augment.augment_batch(..., crop=False)``), so views leave here as
uint8.

Training reads an endless stream that is a pure function of (seed, process, stream
position), so a resumed run continues it exactly (see ``train_iterator``).

This module assembles the tf.data pipelines and reports unreadable images:
``block_readers`` chooses what to read and in which order, and ``host_image_ops``
holds the per-image ops. TensorFlow is imported inside the functions, with GPUs
hidden from it, because accelerator hosts that use in-memory data need not have it
installed.
"""

from __future__ import annotations

from typing import Callable, Iterator

from absl import logging
import numpy as np

from contrastive.data import block_readers
from contrastive.data import host_image_ops as ops
from contrastive.data import padding
from contrastive.data import pil_images
from contrastive.data import source_base
from contrastive.data import sources
from contrastive.data import tf_import

# Unreadable file names quoted in an evaluation pass's warning.
_NUM_SKIPPED_NAMED = 5


def train_iterator(data, views, local_batch_size: int, seed: int, shard_index: int,
                   shard_count: int, start_position: int = 0, *,
                   jpeg_windows: bool = False) -> Iterator[dict]:
  """Endless batches of host-augmented views of this process's block, resumable exactly.

  The process reads an endless stream of its block of ``block_length`` examples:
  pass ``e`` over the block is drawn from ``(seed, shard_index, e)`` alone (a
  permutation of an image folder's files; for tfds, the record files in a drawn
  order mixed by a seeded buffer), and stream position ``e * block_length + k`` is
  the ``k``-th example of pass ``e``. An example's crops and flips are drawn from
  ``(seed, shard_index, position)``, so batches never depend on where reading
  started: ``start_position=p`` yields exactly the batches of an iterator started
  at 0 from the first one that starts at position ``p`` or later. To resume, pass
  ``batch['position'][-1] + 1`` of the last batch consumed (with the same seed,
  process layout and files); the examples before it are not decoded.

  ``views`` are the method's views (each with ``aug`` and ``size``): each gets its
  own random resized crop (``aug.crop_area``, ``aug.crop_aspect``) to its size and
  flip (``aug.flip_prob``). Yields numpy dicts ``{'views': (uint8 [b, S, S, 3],
  ...), 'label': int32 [b] (-1 when unlabelled), 'index': int32 [b] (the image's
  position in the split, for methods that keep per-image state), 'position': int64
  [b] (stream positions, increasing)}``. Batches run on across passes.

  An unreadable image, or a folder's image of more than ``data.max_image_pixels``
  pixels, is left out of the stream (the next ones fill the batch) and named once in
  a warning. Each pass then holds fewer images than the file count the trainer's
  epoch length is counted from, so its step-counted epochs run that fraction ahead
  of the passes; no image is dropped or repeated for it. A whole pass without one
  readable image is a ValueError, not an endless search for one.

  ``jpeg_windows``: decode each view of a JPEG from its own crop window
  (``tf.io.decode_and_crop_jpeg``) instead of cutting every view from one decode of the
  whole image. The pixels are the same (see ``host_image_ops.decode_jpeg_window``);
  other formats, and JPEGs cut short, are always decoded whole. Off by default because
  it did not pay: libjpeg still entropy-decodes every row down to a window's bottom and
  skips only the inverse DCT and colour conversion outside it, so a window costs most of
  a full decode, and two views cost two. Measured by ``benchmarks/host_pipeline.py`` on
  2 cores of an AMD EPYC (images/s, windows against whole): two views, 615 against 865
  at 224 px from 400-500 px JPEGs of ~100 kB (0.71x) and 6548 against 8602 at CIFAR-10's
  32 px (0.76x); one view, 1253 against 1030 (1.22x) and 6097 against 7697 (0.79x).

  Each view is resized bicubic without antialiasing, as in SimCLR's reference
  (``tf.image.resize``'s default). Antialiasing (``scale_and_translate``) made the
  stage 1.7x slower at 224 px from ImageNet-sized images.
  """
  tf = tf_import.import_tensorflow()
  if start_position < 0:
    raise ValueError(f'start_position must be >= 0, got {start_position}.')
  _check_streamable(data, 'train', shard_index, shard_count)
  stream = (block_readers.tfds_stream if data.source == 'tfds'
            else block_readers.folder_stream)(
      data, seed, shard_index, shard_count, start_position)
  if stream is None:
    raise ValueError(f'Process {shard_index} of {shard_count} has no training examples: the '
                     'split is smaller than the number of processes.')
  examples, length, name_of = stream
  max_pixels, note = _size_limit(data)
  process_seed = _process_seed(seed, shard_index)
  sizes = [int(view.size) for view in views]
  flip_probs = tf.constant([float(view.aug.flip_prob) for view in views])
  area_ranges = [tuple(view.aug.crop_area) for view in views]
  aspect_ranges = [tuple(view.aug.crop_aspect) for view in views]

  def augmented_views(example):
    encoded = example['encoded']
    # One draw gives every view of the example its crop and flip: per-example ops,
    # not their arithmetic, are the cost of small images.
    draws = tf.random.stateless_uniform(
        [len(views), ops.VIEW_DRAWS],
        tf.stack([tf.constant(process_seed, tf.int64), example['position']]))
    flips = draws[:, -1] < flip_probs

    def cut_views(shape, window):
      boxes = ops.sample_crop_boxes(tf, shape, draws, area_ranges, aspect_ranges)
      return tuple(ops.resize_and_flip(tf, window(*tf.unstack(boxes[v])), size, flips[v])
                   for v, size in enumerate(sizes))

    # Views are resized from float32 pixels: the same values as from uint8, and
    # faster. A whole image is cast once, not once per view.
    def from_whole_image():
      image = tf.cast(ops.decode(tf, encoded, max_pixels), tf.float32)
      return cut_views(tf.shape(image)[:2],
                       lambda top, left, h, w: image[top:top + h, left:left + w])

    def from_jpeg_windows():
      shape = ops.jpeg_shape(tf, encoded, max_pixels)
      return cut_views(shape, lambda *box: tf.cast(
          ops.decode_jpeg_window(tf, encoded, shape[1], *box), tf.float32))

    cut = (tf.cond(ops.complete_jpeg(tf, encoded), from_jpeg_windows, from_whole_image)
           if jpeg_windows else from_whole_image())
    return {'views': cut, 'label': example['label'], 'index': example['index'],
            'position': example['position']}

  ds = _with_pass_ends(tf, examples, length, start_position)
  ds = ds.map(augmented_views, num_parallel_calls=tf.data.AUTOTUNE)
  # Drops the examples that fail to read or decode, without TensorFlow's per-example
  # log lines: _name_skipped names each one once instead.
  ds = ds.ignore_errors()
  ds = _until_a_pass_reads_nothing(tf, ds)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  # In-order parallel map: batch composition must not depend on thread timing.
  options.deterministic = True

  def nothing_read():
    whose = '' if shard_count == 1 else f' that process {shard_index} of {shard_count} reads'
    return (f'None of the {length} images{whose} of the training split '
            f'({sources.split_name(data, "train")}) could be read in a whole pass over '
            f'them, e.g. {note(name_of(start_position))}: replace them, or point the '
            'config at readable images.')

  return _name_skipped(ds.with_options(options).as_numpy_iterator(), start_position,
                       name_of, note, nothing_read)


def eval_iterator(data, split: str, local_batch_size: int, shard_index: int,
                  shard_count: int) -> Iterator[dict]:
  """One pass over this process's block of a split, in a fixed order.

  Yields numpy dicts ``{'image': uint8 [b, S, S, 3], 'label': int32 [b] (-1 when
  unlabelled), 'mask': bool [b], 'index': int32 [b] (position in the split)}``; the
  last batch is padded to ``local_batch_size`` with zero images, label -1 and mask
  False. Unreadable images are skipped and counted in one warning at the end of the
  pass. An empty block (more processes than examples) yields nothing.
  """
  tf = tf_import.import_tensorflow()
  crop_fraction = float(data.eval_crop_fraction)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'data.eval_crop_fraction must be in (0, 1], got {crop_fraction}.')
  _check_streamable(data, split, shard_index, shard_count)
  block = (block_readers.tfds_in_order if data.source == 'tfds'
           else block_readers.folder_in_order)(
      data, split, shard_index, shard_count)
  if block is None:
    return iter(())
  encoded, (start, stop), name_of = block
  size = data.image_size
  max_pixels, note = _size_limit(data)

  def preprocess(example):
    image = ops.resize_and_centre_crop(tf, ops.decode(tf, example['encoded'], max_pixels),
                                       size, crop_fraction)
    return {'image': image, 'label': example['label'], 'index': example['index']}

  ds = encoded.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors()
  ds = ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE)
  return _pad_last(ds.as_numpy_iterator(), local_batch_size, start, stop,
                   lambda i: note(name_of(i)))


def _size_limit(data) -> tuple[int | None, Callable[[str], str]]:
  """(most pixels an image may have, name -> the name in a skip warning), as in
  memory: an image folder's ``data.max_image_pixels`` and ``pil_images.skip_note``;
  no limit for TFDS records."""
  if data.source != 'folder':
    return None, lambda name: name
  limit = pil_images.max_pixels(data)
  return limit, lambda path: pil_images.skip_note(path, limit)


def _with_pass_ends(tf, examples, length: int, start_position: int):
  """The stream with a marker after each whole pass of ``length`` examples: a 1-pixel
  PNG at position -1, which decodes whatever the block's files are."""
  first_epoch, first_offset = divmod(start_position, length)
  marker = {'encoded': tf.io.encode_png(tf.zeros([1, 1, 3], tf.uint8)),
            'label': tf.constant(-1, tf.int32), 'index': tf.constant(-1, tf.int32),
            'position': tf.constant(-1, tf.int64)}

  def pass_choices(epoch):    # 0: the pass's next example, 1: its marker
    skip = first_offset * tf.cast(epoch == first_epoch, tf.int64)
    ends = tf.data.Dataset.from_tensors(tf.constant(1, tf.int64))
    return (tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat(length - skip)
            .concatenate(ends.take(tf.cast(skip == 0, tf.int64))))

  return tf.data.Dataset.choose_from_datasets(
      [examples, tf.data.Dataset.from_tensors(marker).repeat()],
      tf.data.Dataset.counter(first_epoch).flat_map(pass_choices))


def _until_a_pass_reads_nothing(tf, ds):
  """Drops the markers of ``_with_pass_ends``; ends the stream at one that closes a
  whole pass in which no example was read and decoded."""

  def count(read, example):   # read: examples since the last marker
    end = example['position'] < 0
    return tf.where(end, tf.constant(0, tf.int64), read + 1), (example, end & (read == 0))

  def is_example(example, _):
    return example['position'] >= 0

  def without_flag(example, _):
    return example

  ds = ds.scan(tf.constant(0, tf.int64), count).take_while(lambda _, empty: ~empty)
  return ds.filter(is_example).map(without_flag)


def _name_skipped(batches, start_position: int, name_of: Callable[[int], str],
                  note: Callable[[str], str], nothing_read: Callable[[], str]):
  """Passes the batches on, warning once per example that a gap in 'position' shows
  was left out (``note``: its name with why, where known); raises ``nothing_read()``
  where the stream ends, which only a pass without a readable image ends."""
  named = set()
  expected = start_position
  for batch in batches:
    positions = batch['position']
    for position in np.setdiff1d(np.arange(expected, positions[-1] + 1), positions):
      name = name_of(int(position))
      if name not in named:
        named.add(name)
        noted = note(name)
        logging.warning('Skipped %s %s (%d skipped so far); the following images take its '
                        'place.', 'unreadable image' if noted == name else 'image', noted,
                        len(named))
    expected = positions[-1] + 1
    yield batch
  raise ValueError(nothing_read())


def _pad_last(batches, batch_size: int, start: int, stop: int,
              name_of: Callable[[int], str]) -> Iterator[dict]:
  """Pads the last batch; at the end of the pass, one warning names what was skipped
  (the gaps in the block's consecutive 'index')."""
  skipped = []
  expected = start
  for batch in batches:
    index = batch['index']
    skipped.extend(np.setdiff1d(np.arange(expected, index[-1] + 1), index).tolist())
    expected = index[-1] + 1
    yield padding.pad_batch(batch['image'], batch['label'], batch_size, index)
  skipped.extend(range(expected, stop))
  if skipped:
    logging.warning('Skipped %d of %d images that could not be read or decoded, or are '
                    'too large: %s%s',
                    len(skipped), stop - start,
                    ', '.join(name_of(i) for i in skipped[:_NUM_SKIPPED_NAMED]),
                    ', ...' if len(skipped) > _NUM_SKIPPED_NAMED else '')


def _process_seed(seed: int, shard_index: int) -> int:
  """Distinct per-process seed, so processes do not repeat each other's random draws."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _check_streamable(data, split: str, shard_index: int, shard_count: int) -> None:
  sources.check_source(data.source)
  source_base.check_split(split)
  source_base.check_shard(shard_index, shard_count)
  if data.source == 'digits':
    raise ValueError("data.source='digits' is in-memory only: set data.in_memory=True.")
