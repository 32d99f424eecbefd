"""Streaming host input pipeline (tf.data) for datasets too large for host memory.

Each process reads only its floor block of the split (see ``sources.shard_bounds``),
keeps examples encoded until after shuffling (so the shuffle buffer holds
compressed bytes, not decoded ImageNet images), then decodes and does the
geometric part of SimCLR's augmentation on the host: a random resized crop and a
horizontal flip per view. Colour augmentations run later on the accelerator
(``augment.augment_batch(..., crop=False)``), so views leave here as uint8.

TensorFlow is imported inside the functions, with GPUs hidden from it, because
accelerator hosts that use in-memory data need not have it installed.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from contrastive.data import evaluation
from contrastive.data import folder
from contrastive.data import sources
from contrastive.data import tfds_source

# Encoded examples held by the tfds shuffle buffer (ImageNet JPEGs average ~110 kB).
# Image folders shuffle their whole file list instead.
_SHUFFLE_BUFFER = 10_000
# Random-resized-crop attempts before falling back to the whole image.
_CROP_ATTEMPTS = 10


def train_iterator(data, views, local_batch_size: int, seed: int, shard_index: int,
                   shard_count: int) -> Iterator[dict]:
  """Endless shuffled batches of host-augmented views of this process's block.

  ``views`` are the method's views (each with ``aug`` and ``size``): each gets its
  own random resized crop (``aug.crop_area``, ``aug.crop_aspect``) to its size and
  flip (``aug.flip_prob``). Yields numpy dicts ``{'views': (uint8 [b, S, S, 3],
  ...), 'label': int32 [b] (-1 when unlabelled), 'index': int32 [b]}`` (the
  image's position in the split, for methods that keep per-image state);
  incomplete batches are dropped.
  """
  tf = sources.import_tensorflow()
  process_seed = _process_seed(seed, shard_index)
  encoded = _encoded_examples(data, 'train', shard_index, shard_count, process_seed)
  if encoded is None:
    raise ValueError(f'Process {shard_index} of {shard_count} has no training examples: the '
                     'split is smaller than the number of processes.')
  crops = [(int(view.size), tuple(view.aug.crop_area), tuple(view.aug.crop_aspect),
            float(view.aug.flip_prob)) for view in views]

  def augmented_views(index, example):
    image = _decode(tf, example['encoded'])
    view_seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(process_seed, tf.int64), index]), len(crops))
    return {'views': tuple(_crop_and_flip(tf, image, view_seeds[v], *crop)
                           for v, crop in enumerate(crops)),
            'label': example['label'], 'index': example['index']}

  ds = encoded.repeat().enumerate()
  ds = ds.map(augmented_views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = False
  return ds.with_options(options).as_numpy_iterator()


def eval_iterator(data, split: str, local_batch_size: int, shard_index: int,
                  shard_count: int) -> Iterator[dict]:
  """One pass over this process's block of a split, in a fixed order.

  Yields numpy dicts ``{'image': uint8 [b, S, S, 3], 'label': int32 [b] (-1 when
  unlabelled), 'mask': bool [b], 'index': int32 [b] (position in the split)}``; the last batch is padded to ``local_batch_size``
  with zero images, label -1 and mask False. Unreadable images are skipped. An
  empty block (more processes than examples) yields nothing.
  """
  tf = sources.import_tensorflow()
  crop_fraction = float(data.eval_crop_fraction)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'data.eval_crop_fraction must be in (0, 1], got {crop_fraction}.')
  encoded = _encoded_examples(data, split, shard_index, shard_count, shuffle_seed=None)
  if encoded is None:
    return iter(())
  size = data.image_size

  def preprocess(example):
    image = _resize_and_centre_crop(tf, _decode(tf, example['encoded']), size, crop_fraction)
    return {'image': image, 'label': example['label'], 'index': example['index']}

  ds = encoded.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch_size).prefetch(tf.data.AUTOTUNE)
  return _pad_last(ds.as_numpy_iterator(), local_batch_size)


def _pad_last(batches, batch_size: int) -> Iterator[dict]:
  for batch in batches:
    yield evaluation.pad_batch(batch['image'], batch['label'], batch_size, batch['index'])


def _process_seed(seed: int, shard_index: int) -> int:
  """Distinct per-process seed, so processes do not repeat each other's random draws."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def _encoded_examples(data, split: str, shard_index: int, shard_count: int,
                      shuffle_seed: int | None):
  """``{'encoded': string, 'label': int32, 'index': int32}`` examples of this
  process's block; ``index`` is the example's position in the whole split.

  With a ``shuffle_seed`` the order is shuffled (and reshuffled every epoch);
  without one it is the split's fixed order. None when the block is empty.
  """
  sources.check_source(data.source)
  sources.check_split(split)
  sources.check_shard(shard_index, shard_count)
  if data.source == 'digits':
    raise ValueError("data.source='digits' is in-memory only: set data.in_memory=True.")
  if data.source == 'tfds':
    return _tfds_examples(data, split, shard_index, shard_count, shuffle_seed)
  return _folder_examples(data, split, shard_index, shard_count, shuffle_seed)


def _folder_examples(data, split, shard_index, shard_count, shuffle_seed):
  tf = sources.import_tensorflow()
  listing = folder.folder_split(data, split)
  start, stop = sources.shard_bounds(len(listing.paths), shard_index, shard_count)
  paths = listing.paths[start:stop]
  if not paths:
    return None
  labels = (np.full(len(paths), -1, np.int32) if listing.labels is None
            else listing.labels[start:stop])
  index = np.arange(start, stop, dtype=np.int32)
  ds = tf.data.Dataset.from_tensor_slices({'path': paths, 'label': labels, 'index': index})
  if shuffle_seed is not None:
    ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
  return ds.map(lambda ex: {'encoded': tf.io.read_file(ex['path']), 'label': ex['label'],
                            'index': ex['index']},
                num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_examples(data, split, shard_index, shard_count, shuffle_seed):
  tf = sources.import_tensorflow()
  tfds = tfds_source.import_tfds()
  builder = tfds_source.tfds_builder(data)
  has_label, _ = tfds_source.tfds_label_info(builder, data.name)
  if not isinstance(builder.info.features['image'], tfds.features.Image):
    raise ValueError(f"Streaming needs an encoded tfds.features.Image 'image' feature; "
                     f"{data.name!r} has {builder.info.features['image']!r}.")
  split_name = tfds_source.tfds_split_name(data, split)
  instruction, _ = tfds_source.tfds_shard(builder, split_name, shard_index, shard_count)
  if instruction is None:
    return None
  shuffle = shuffle_seed is not None
  # Unshuffled reads go one file at a time, so they follow the split's fixed order
  # (the same as the in-memory source); shuffled reads interleave files for speed.
  # Either way each example's tfds_id (file and record) gives its split index.
  read_config = (tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=True) if shuffle
                 else tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=True))
  ds = builder.as_dataset(
      split=instruction, shuffle_files=shuffle,
      decoders={'image': tfds.decode.SkipDecoding()}, read_config=read_config)
  offsets = tfds_source.tfds_file_offsets(builder, split_name)
  file_offset = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(list(offsets), list(offsets.values()),
                                          tf.string, tf.int64), default_value=-2**62)

  def select(example):
    label = (tf.cast(example['label'], tf.int32) if has_label
             else tf.constant(-1, tf.int32))
    # tfds_id is '<file name>__<record number>'.
    parts = tf.strings.split(example['tfds_id'], '__', maxsplit=1)
    index = file_offset.lookup(parts[0]) + tf.strings.to_number(parts[1], tf.int64)
    # A file missing from the listing gets the default offset: fail, never mislabel.
    with tf.control_dependencies([tf.debugging.assert_non_negative(
        index, message=f'{data.name}: a record file outside the split listing')]):
      index = tf.identity(index)
    return {'encoded': example['image'], 'label': label, 'index': tf.cast(index, tf.int32)}

  ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
  if shuffle:
    ds = ds.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
  return ds


def _decode(tf, encoded):
  """Any of JPEG/PNG/GIF/BMP/WebP -> uint8 [H, W, 3] (first frame of an animation)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _to_uint8(tf, image):
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _crop_and_flip(tf, image, seed, size: int, area_range, aspect_range, flip_prob: float):
  """One training view: random resized crop to size x size (bicubic), then a random flip.

  The crop box follows ``augment.sample_crop_box`` (the on-device crop used for
  in-memory data): each of the attempts draws an area fraction uniformly and an
  aspect ratio log-uniformly, the first box that fits is kept, and the whole image
  is used if none fits.
  """
  k_area, k_aspect, k_top, k_left, k_flip = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  area = height * width * tf.random.stateless_uniform(
      [_CROP_ATTEMPTS], k_area, area_range[0], area_range[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [_CROP_ATTEMPTS], k_aspect, math.log(aspect_range[0]), math.log(aspect_range[1])))
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_h >= 1) & (crop_w >= 1) & (crop_h <= height) & (crop_w <= width)
  first = tf.argmax(tf.cast(fits, tf.int32))
  crop_h = tf.where(fits[first], crop_h[first], height)
  crop_w = tf.where(fits[first], crop_w[first], width)
  top = tf.floor(tf.random.stateless_uniform([], k_top) * (height - crop_h + 1))
  left = tf.floor(tf.random.stateless_uniform([], k_left) * (width - crop_w + 1))
  top, left, crop_h, crop_w = (tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))
  crop = image[top:top + crop_h, left:left + crop_w]
  view = tf.image.resize(crop, [size, size], method='bicubic', antialias=True)
  flip = tf.random.stateless_uniform([], k_flip) < flip_prob
  view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
  return _to_uint8(tf, view)


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
