"""Streaming host input pipeline (tf.data) for datasets too large for host memory.

Each process reads only its floor block of the split (see ``sources.shard_bounds``),
keeps examples encoded until after shuffling (so a shuffle buffer holds compressed
bytes, not decoded ImageNet images), then decodes and does the geometric part of
SimCLR's augmentation on the host: a random resized crop and a horizontal flip per
view. Colour augmentations run later on the accelerator
(``augment.augment_batch(..., crop=False)``), so views leave here as uint8.

Training reads an endless stream that is a pure function of (seed, process, stream
position), so a resumed run continues it exactly (see ``train_iterator``).

TensorFlow is imported inside the functions, with GPUs hidden from it, because
accelerator hosts that use in-memory data need not have it installed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterator

from absl import logging
import numpy as np

from contrastive.data import evaluation
from contrastive.data import folder
from contrastive.data import sources
from contrastive.data import tfds_source

# Encoded examples held by the tfds shuffle buffer (ImageNet JPEGs average ~110 kB).
# Image folders permute their whole file list instead.
_SHUFFLE_BUFFER = 10_000
# TFDS record files read at once while training (TFDS's own default).
_INTERLEAVED_FILES = 16
# Random-resized-crop attempts before falling back to the whole image.
_CROP_ATTEMPTS = 10
# Uniform draws per view: areas and aspects of the attempts, top, left and the flip.
_VIEW_DRAWS = 2 * _CROP_ATTEMPTS + 3
# Columns decoded either side of a JPEG crop window and cut off (_decode_jpeg_window):
# more than one chroma sample, 2 pixels at 4:2:0 and 4:2:2 (where 2 is measured to be
# exact and 1 not) and 4 at 4:1:1 (which Pillow cannot write, so untested).
_WINDOW_MARGIN = 8
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

  An unreadable image is left out of the stream (the next ones fill the batch) and
  named once in a warning. Each pass then holds fewer images than the file count
  the trainer's epoch length is counted from, so its step-counted epochs run that
  fraction ahead of the passes; no image is dropped or repeated for it.

  ``jpeg_windows``: decode each view of a JPEG from its own crop window
  (``tf.io.decode_and_crop_jpeg``) instead of cutting every view from one decode of
  the whole image. The pixels are the same (see ``_decode_jpeg_window``); other
  formats, and JPEGs cut short, are always decoded whole. Off by default because it
  did not pay: libjpeg still entropy-decodes every row down to a window's bottom and
  skips only the inverse DCT and colour conversion outside it, so a window costs
  most of a full decode, and two views cost two. Measured by
  ``benchmarks/host_pipeline.py`` on 2 cores of an AMD EPYC (images/s, windows
  against whole): two views, 615 against 865 at 224 px from 400-500 px JPEGs of
  ~100 kB (0.71x) and 6548 against 8602 at CIFAR-10's 32 px (0.76x); one view, 1253
  against 1030 (1.22x) and 6097 against 7697 (0.79x).

  Each view is resized bicubic without antialiasing, as in SimCLR's reference
  (``tf.image.resize``'s default). Antialiasing (``scale_and_translate``) made the
  stage 1.7x slower at 224 px from ImageNet-sized images.
  """
  tf = sources.import_tensorflow()
  if start_position < 0:
    raise ValueError(f'start_position must be >= 0, got {start_position}.')
  _check_streamable(data, 'train', shard_index, shard_count)
  stream = (_tfds_stream if data.source == 'tfds' else _folder_stream)(
      data, seed, shard_index, shard_count, start_position)
  if stream is None:
    raise ValueError(f'Process {shard_index} of {shard_count} has no training examples: the '
                     'split is smaller than the number of processes.')
  encoded, name_of = stream
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
        [len(views), _VIEW_DRAWS],
        tf.stack([tf.constant(process_seed, tf.int64), example['position']]))
    flips = draws[:, -1] < flip_probs

    def cut_views(shape, window):
      boxes = _sample_crop_boxes(tf, shape, draws, area_ranges, aspect_ranges)
      return tuple(_resize_and_flip(tf, window(*tf.unstack(boxes[v])), size, flips[v])
                   for v, size in enumerate(sizes))

    # Views are resized from float32 pixels: the same values as from uint8, and
    # faster. A whole image is cast once, not once per view.
    def from_whole_image():
      image = tf.cast(_decode(tf, encoded), tf.float32)
      return cut_views(tf.shape(image)[:2],
                       lambda top, left, h, w: image[top:top + h, left:left + w])

    def from_jpeg_windows():
      shape = tf.io.extract_jpeg_shape(encoded)[:2]
      return cut_views(shape, lambda *box: tf.cast(
          _decode_jpeg_window(tf, encoded, shape[1], *box), tf.float32))

    cut = (tf.cond(_complete_jpeg(tf, encoded), from_jpeg_windows, from_whole_image)
           if jpeg_windows else from_whole_image())
    return {'views': cut, 'label': example['label'], 'index': example['index'],
            'position': example['position']}

  ds = encoded.map(augmented_views, num_parallel_calls=tf.data.AUTOTUNE)
  # Drops the examples that fail to read or decode, without TensorFlow's per-example
  # log lines: _name_skipped names each one once instead.
  ds = ds.ignore_errors()
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  # In-order parallel map: batch composition must not depend on thread timing.
  options.deterministic = True
  return _name_skipped(ds.with_options(options).as_numpy_iterator(), start_position,
                       name_of)


def eval_iterator(data, split: str, local_batch_size: int, shard_index: int,
                  shard_count: int) -> Iterator[dict]:
  """One pass over this process's block of a split, in a fixed order.

  Yields numpy dicts ``{'image': uint8 [b, S, S, 3], 'label': int32 [b] (-1 when
  unlabelled), 'mask': bool [b], 'index': int32 [b] (position in the split)}``; the
  last batch is padded to ``local_batch_size`` with zero images, label -1 and mask
  False. Unreadable images are skipped and counted in one warning at the end of the
  pass. An empty block (more processes than examples) yields nothing.
  """
  tf = sources.import_tensorflow()
  crop_fraction = float(data.eval_crop_fraction)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'data.eval_crop_fraction must be in (0, 1], got {crop_fraction}.')
  _check_streamable(data, split, shard_index, shard_count)
  block = (_tfds_in_order if data.source == 'tfds' else _folder_in_order)(
      data, split, shard_index, shard_count)
  if block is None:
    return iter(())
  encoded, (start, stop), name_of = block
  size = data.image_size

  def preprocess(example):
    image = _resize_and_centre_crop(tf, _decode(tf, example['encoded']), size, crop_fraction)
    return {'image': image, 'label': example['label'], 'index': example['index']}

  ds = encoded.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors()
  ds = ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE)
  return _pad_last(ds.as_numpy_iterator(), local_batch_size, start, stop, name_of)


def _name_skipped(batches, start_position: int, name_of: Callable[[int], str]):
  """Passes the batches on, warning once per example that a gap in 'position' shows
  was left out."""
  named = set()
  expected = start_position
  for batch in batches:
    positions = batch['position']
    for position in np.setdiff1d(np.arange(expected, positions[-1] + 1), positions):
      name = name_of(int(position))
      if name not in named:
        named.add(name)
        logging.warning('Skipped unreadable image %s (%d skipped so far); the following '
                        'images take its place.', name, len(named))
    expected = positions[-1] + 1
    yield batch


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
    yield evaluation.pad_batch(batch['image'], batch['label'], batch_size, index)
  skipped.extend(range(expected, stop))
  if skipped:
    logging.warning('Skipped %d of %d images that could not be read or decoded: %s%s',
                    len(skipped), stop - start,
                    ', '.join(name_of(i) for i in skipped[:_NUM_SKIPPED_NAMED]),
                    ', ...' if len(skipped) > _NUM_SKIPPED_NAMED else '')


def _process_seed(seed: int, shard_index: int) -> int:
  """Distinct per-process seed, so processes do not repeat each other's random draws."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _pass_draws(seed: int, shard_index: int, length: int, epoch: int):
  """Pass ``epoch``'s order of ``length`` files (a permutation) and shuffle-buffer
  seed, drawn from the arguments alone: any pass is redrawn without the ones before."""
  rng = np.random.default_rng([seed, shard_index, epoch])
  return rng.permutation(length), rng.integers(2**31 - 1, dtype=np.int64)


def _check_streamable(data, split: str, shard_index: int, shard_count: int) -> None:
  sources.check_source(data.source)
  sources.check_split(split)
  sources.check_shard(shard_index, shard_count)
  if data.source == 'digits':
    raise ValueError("data.source='digits' is in-memory only: set data.in_memory=True.")


# ----------------------------------------------------------------------------- folder

def _folder_block(data, split: str, shard_index: int, shard_count: int):
  """(paths, int32 labels, first split index) of this process's block; None if empty."""
  listing = folder.folder_split(data, split)
  start, stop = sources.shard_bounds(len(listing.paths), shard_index, shard_count)
  paths = listing.paths[start:stop]
  if not paths:
    return None
  labels = (np.full(len(paths), -1, np.int32) if listing.labels is None
            else listing.labels[start:stop])
  return paths, labels, start


def _folder_in_order(data, split, shard_index, shard_count):
  """``(examples, (start, stop), name_of)``: the block's ``{'encoded', 'label',
  'index'}`` in the split's order, its index range, and index -> file path."""
  tf = sources.import_tensorflow()
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


def _folder_stream(data, seed, shard_index, shard_count, start_position):
  """``(stream, name_of)``: the block's endless ``{'encoded', 'label', 'index',
  'position'}`` from ``start_position`` on (see ``train_iterator``), and position ->
  file path. Files before ``start_position`` are not read."""
  tf = sources.import_tensorflow()
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

  return ds, name_of


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
  tf = sources.import_tensorflow()
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


def _tfds_in_order(data, split, shard_index, shard_count):
  """Like ``_folder_in_order``; one file at a time, so the order is the split's fixed
  order (the in-memory source's) whatever the block."""
  tf = sources.import_tensorflow()
  block = _tfds_block(data, split, shard_index, shard_count)
  if block is None:
    return None
  ds = tf.data.Dataset.from_tensor_slices(block.files).flat_map(block.read)
  ds = ds.map(block.parse, num_parallel_calls=tf.data.AUTOTUNE)
  start = int(block.files[3][0])
  return ds, (start, start + block.length), lambda i: f'record {i} of {block.name}'


def _tfds_stream(data, seed, shard_index, shard_count, start_position):
  """Like ``_folder_stream``. Pass ``e`` reads the block's record files in an order
  drawn from ``(seed, shard_index, e)``, several at once in a fixed rotation, through
  a shuffle buffer seeded from the same. Resuming reads the records of the current
  pass before ``start_position`` (the buffer needs them) without parsing or decoding."""
  tf = sources.import_tensorflow()
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
  return ds, lambda position: f'at stream position {position} of {block.name}'


# ----------------------------------------------------------------------------- decoding

def _decode(tf, encoded):
  """Any of JPEG/PNG/GIF/BMP/WebP -> uint8 [H, W, 3] (first frame of an animation)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _to_uint8(tf, image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _complete_jpeg(tf, encoded):
  """Whether ``encoded`` is a JPEG that runs to its end marker. A file cut short may
  still hold a window above the cut, so it is decoded whole, and fails as it would in
  every other pass and path."""
  end = tf.strings.substr(encoded, tf.maximum(tf.strings.length(encoded) - 2, 0), 2)
  return tf.io.is_jpeg(encoded) & tf.equal(end, b'\xff\xd9')


def _decode_jpeg_window(tf, encoded, image_width, top, left, height, width):
  """The pixels a full decode would give in the window: uint8 [height, width, 3].

  Decodes the window widened by ``_WINDOW_MARGIN`` columns each side and cuts them
  off, because libjpeg-turbo's cropped decode treats the window's side columns as the
  image's edge when it upsamples subsampled chroma, and so changes them (by up to 38
  levels on noise at 4:2:0): one chroma sample beyond the window restores them.
  """
  start = tf.maximum(left - _WINDOW_MARGIN, 0)
  stop = tf.minimum(left + width + _WINDOW_MARGIN, image_width)
  window = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, start, height, stop - start]),
                                      channels=3)
  return window[:, left - start:left - start + width]


def _resize_and_flip(tf, crop, size: int, flip):
  """A float32 crop resized to size x size (bicubic, not antialiased; see
  ``train_iterator``), then flipped if ``flip``, as uint8."""
  view = tf.image.resize(crop, [size, size], method='bicubic')
  view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
  return _to_uint8(tf, view)


def _sample_crop_boxes(tf, shape, draws, area_ranges, aspect_ranges):
  """int32 [views, 4] (top, left, height, width): a random resized crop per view of an
  image of ``shape``, from the view's row of uniform ``draws`` ([views, _VIEW_DRAWS])
  and its (low, high) area fraction and aspect ratio.

  Follows ``augment.sample_crop_box`` (the on-device crop used for in-memory data):
  each of the attempts draws an area fraction uniformly and an aspect ratio
  log-uniformly, the first box that fits is kept, and the whole image is used if none
  fits; the offset is uniform over the positions that keep the box inside. The draws
  depend on the seed only and the box on them and the shape, so a window decoded
  alone gives the same view as one cut from the whole image.
  """
  n = _CROP_ATTEMPTS
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)

  def affine(ranges):   # [views, 1] float32 low and high - low, rounded as the JAX crop's
    ranges = np.asarray(ranges, np.float64)
    return (tf.constant(ranges[:, :1], tf.float32),
            tf.constant(ranges[:, 1:] - ranges[:, :1], tf.float32))

  low, span = affine(area_ranges)
  area = height * width * (low + span * draws[:, :n])
  low, span = affine(np.log(aspect_ranges))
  aspect = tf.exp(low + span * draws[:, n:2 * n])
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_h >= 1) & (crop_w >= 1) & (crop_h <= height) & (crop_w <= width)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1)[:, None]
  found = tf.reduce_any(fits, axis=1)
  crop_h = tf.where(found, tf.gather(crop_h, first, batch_dims=1)[:, 0], height)
  crop_w = tf.where(found, tf.gather(crop_w, first, batch_dims=1)[:, 0], width)
  top = tf.floor(draws[:, 2 * n] * (height - crop_h + 1))
  left = tf.floor(draws[:, 2 * n + 1] * (width - crop_w + 1))
  return tf.cast(tf.stack([top, left, crop_h, crop_w], axis=1), tf.int32)


def _resize_and_centre_crop(tf, image, size: int, crop_fraction: float):
  """Shorter side to round(size / crop_fraction), then the central size x size.

  crop_fraction 0.875 at size 224 is the usual ImageNet 256 -> 224 evaluation;
  1.0 keeps the whole of a square image (a no-op for CIFAR at its native size).
  """
  target = round(size / crop_fraction)
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = target / tf.minimum(height, width)
  new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), target)
  new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), target)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method='bicubic', antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return _to_uint8(tf, resized[top:top + size, left:left + size])
