"""In-memory image sources: whole splits (or one process's block of them) as uint8 arrays.

Three sources are supported:

* ``digits``: scikit-learn's 8x8 handwritten digits, upsampled; small enough for a
  CPU quickstart and needs no download.
* ``folder``: a directory of image files, either one sub-folder per class or a flat
  folder of unlabelled images.
* ``tfds``: a TensorFlow Datasets builder that is prepared (or preparable) locally.

Every split has a fixed example order that does not depend on the number of
processes, and process ``i`` of ``c`` gets the contiguous block
``[floor(i*N/c), floor((i+1)*N/c))``. With floor arithmetic, block ``p`` of ``P``
is exactly the union of blocks ``p*L .. p*L+L-1`` of ``P*L``, so data sharded over
processes can be re-sharded over local devices without moving examples.

TensorFlow and TensorFlow Datasets are imported only inside the ``tfds`` code
paths: accelerator hosts may not have them installed, and the other sources must
work without them. The tfds and folder helpers here are shared with the streaming
pipeline in ``pipeline.py``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import operator
import os
import textwrap

from absl import logging
import numpy as np
from PIL import Image

SOURCES = ('digits', 'tfds', 'folder')
SPLITS = ('train', 'eval')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')

# Number of unreadable file names quoted in the skip warning.
_NUM_SKIPPED_NAMED = 5
_DIGITS_CLASSES = 10


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


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The files of one split of an image folder, in the split's fixed order."""
  paths: list[str]
  labels: np.ndarray | None   # int32 [N], None for an unlabelled folder
  num_classes: int | None


def load_arrays(data, split: str, shard_index: int = 0, shard_count: int = 1) -> ImageArrays:
  """Loads block ``shard_index`` of ``shard_count`` of a split into memory.

  Args:
    data: the ``data`` ConfigDict: ``source``, ``image_size``, ``holdout_per_class``
      and, per source, ``path`` (folder) or ``name``, ``data_dir``,
      ``train_split``, ``eval_split`` (tfds).
    split: 'train' or 'eval'.
    shard_index: which contiguous block of the split to return.
    shard_count: number of blocks the split is cut into.

  Returns:
    The block as uint8 images of shape [n, image_size, image_size, 3].
  """
  check_source(data.source)
  check_split(split)
  check_shard(shard_index, shard_count)
  if data.source == 'digits':
    return _load_digits(data, split, shard_index, shard_count)
  if data.source == 'folder':
    return _load_folder(data, split, shard_index, shard_count)
  return _load_tfds(data, split, shard_index, shard_count)


def split_info(data, split: str) -> SplitInfo:
  """Size and number of classes of a whole split, for step counts and streaming eval."""
  check_source(data.source)
  check_split(split)
  if data.source == 'digits':
    _, labels = _digits_split(data, split)
    return SplitInfo(split=split, num_examples=len(labels), num_classes=_DIGITS_CLASSES)
  if data.source == 'folder':
    listing = folder_split(data, split)
    return SplitInfo(split=split, num_examples=len(listing.paths),
                     num_classes=listing.num_classes)
  builder = tfds_builder(data)
  _, num_classes = tfds_label_info(builder, data.name)
  ranges = _tfds_ranges(builder, tfds_split_name(data, split))
  return SplitInfo(split=split, num_examples=sum(stop - start for _, start, stop in ranges),
                   num_classes=num_classes)


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f'Unknown data.source={source!r}; expected one of {SOURCES}.')


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f'Invalid shard {shard_index} of {shard_count}: need shard_count >= 1 and '
        '0 <= shard_index < shard_count.')


def shard_bounds(total: int, shard_index: int, shard_count: int) -> tuple[int, int]:
  """Returns the [start, stop) of a block; floor arithmetic keeps blocks nested."""
  return total * shard_index // shard_count, total * (shard_index + 1) // shard_count


def _holdout_indices(labels: np.ndarray, holdout_per_class: int, split: str,
                     what: str) -> np.ndarray:
  """Indices (in order) of one split: the first ``holdout_per_class`` of each class are 'eval'."""
  if holdout_per_class < 0:
    raise ValueError(f'data.holdout_per_class must be >= 0, got {holdout_per_class}.')
  if split == 'eval' and holdout_per_class == 0:
    raise ValueError(
        f'The {what} has no separate eval split: set data.holdout_per_class > 0 to hold '
        'out that many images per class for evaluation.')
  classes, counts = np.unique(labels, return_counts=True)
  too_small = [(int(c), int(n)) for c, n in zip(classes, counts) if n <= holdout_per_class]
  if too_small:
    raise ValueError(
        f'data.holdout_per_class={holdout_per_class} would leave no training images for '
        f'(class, count) {too_small[:5]} of the {what}; lower it.')
  # Rank of each example among the examples of its class, in order: a stable sort
  # groups the classes, and the rank is the position minus the group's start.
  by_class = np.argsort(labels, kind='stable')
  sorted_labels = labels[by_class]
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
  held_out = rank < holdout_per_class
  return np.flatnonzero(held_out if split == 'eval' else ~held_out)


def _fit_square(image: Image.Image, size: int) -> Image.Image:
  """Resizes the shorter side to ``size`` and centre-crops to size x size (one resample)."""
  width, height = image.size
  if (width, height) == (size, size):
    return image
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _to_rgb_square(array: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] (C in 1, 3, 4) or [H, W] -> uint8 [size, size, 3]."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.shape[:2] == (size, size) and array.ndim == 3 and array.shape[-1] == 3:
    return array
  return np.asarray(_fit_square(Image.fromarray(array).convert('RGB'), size))


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
  if not images:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack(images)


# ----------------------------------------------------------------------------- digits


def _digits_split(data, split) -> tuple[np.ndarray, np.ndarray]:
  """One split of the digits in its fixed order: (images 0..16 [N, 8, 8], int32 labels)."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  images, labels = digits.images[order], digits.target[order].astype(np.int32)
  indices = _holdout_indices(labels, data.holdout_per_class, split, 'digits dataset')
  return images[indices], labels[indices]


def _load_digits(data, split, shard_index, shard_count) -> ImageArrays:
  images, labels = _digits_split(data, split)
  start, stop = shard_bounds(len(labels), shard_index, shard_count)
  # Values are 0..16; scale to the full uint8 range.
  small = np.round(images[start:stop] * (255.0 / 16.0)).astype(np.uint8)
  resized = [_to_rgb_square(image, data.image_size) for image in small]
  return ImageArrays(images=_stack(resized, data.image_size), labels=labels[start:stop],
                     num_classes=_DIGITS_CLASSES)


# ----------------------------------------------------------------------------- folder


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _image_files_under(directory: str) -> list[str]:
  """All image files below ``directory`` (recursively), sorted; hidden entries skipped."""
  found = []
  for parent, subdirs, files in os.walk(directory, followlinks=True):
    subdirs[:] = [d for d in subdirs if not d.startswith('.')]
    found.extend(os.path.join(parent, f) for f in files if _is_image_file(f))
  return sorted(found)


def folder_split(data, split: str) -> FolderSplit:
  """Lists the files of one split of the image folder ``data.path``.

  The order is sorted paths followed by a fixed shuffle, so holdout images are
  spread over the folder and the order is the same on every host.
  """
  check_split(split)
  root = data.path
  if not root:
    raise ValueError("data.path is empty; set it to the image folder root for source='folder'.")
  if not os.path.exists(root):
    raise FileNotFoundError(f'data.path={root!r} does not exist.')
  if not os.path.isdir(root):
    raise ValueError(f'data.path={root!r} is not a directory.')

  with os.scandir(root) as entries:
    entries = sorted(entries, key=lambda e: e.name)
  class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith('.')]
  root_files = [e.path for e in entries if e.is_file() and _is_image_file(e.name)]
  extensions = ', '.join(IMAGE_EXTENSIONS)

  if class_dirs:
    if root_files:
      raise ValueError(
          f'data.path={root!r} mixes class sub-folders with {len(root_files)} image files '
          f'at the top level (e.g. {os.path.basename(root_files[0])!r}); use either one '
          'sub-folder per class or a flat folder of unlabelled images.')
    per_class = [_image_files_under(d.path) for d in class_dirs]
    if not any(per_class):
      raise ValueError(
          f'The class sub-folders of data.path={root!r} contain no images ({extensions}).')
    empty = [d.name for d, files in zip(class_dirs, per_class) if not files]
    if empty:
      logging.warning('Class sub-folders without images in %s (their labels stay reserved): %s',
                      root, ', '.join(empty[:_NUM_SKIPPED_NAMED]))
    paths = [p for files in per_class for p in files]
    labels = np.concatenate(
        [np.full(len(files), c, np.int32) for c, files in enumerate(per_class)])
    num_classes = len(class_dirs)
  else:
    paths = root_files
    if not paths:
      raise ValueError(f'data.path={root!r} contains no images ({extensions}) and no '
                       'class sub-folders.')
    labels = None
    num_classes = None

  order = np.random.default_rng(0).permutation(len(paths))
  paths = [paths[i] for i in order]
  if labels is None:
    if data.holdout_per_class > 0:
      raise ValueError(
          f'data.holdout_per_class={data.holdout_per_class} needs labels, but the images in '
          f'data.path={root!r} are not in class sub-folders.')
    if split == 'eval':
      raise ValueError(
          f'data.path={root!r} is an unlabelled folder and has no eval split; '
          'use class sub-folders and set data.holdout_per_class > 0.')
    return FolderSplit(paths=paths, labels=None, num_classes=None)
  labels = labels[order]
  indices = _holdout_indices(labels, data.holdout_per_class, split, f'folder {root!r}')
  return FolderSplit(paths=[paths[i] for i in indices], labels=labels[indices],
                     num_classes=num_classes)


def _decode_file(path: str, size: int) -> np.ndarray | None:
  """Decodes one image file to uint8 [size, size, 3], or None if it cannot be read."""
  try:
    with Image.open(path) as image:
      image.draft('RGB', (size, size))  # JPEG: decode at a reduced scale still >= size.
      if image.mode != 'RGB':
        image = image.convert('RGB')
      return np.asarray(_fit_square(image, size))
  # PIL's format plugins raise many exception types on malformed files; any of them
  # means this one file is unusable, not that loading should stop.
  except Exception:  # pylint: disable=broad-except
    return None


def _load_folder(data, split, shard_index, shard_count) -> ImageArrays:
  listing = folder_split(data, split)
  start, stop = shard_bounds(len(listing.paths), shard_index, shard_count)
  paths = listing.paths[start:stop]
  # PIL releases the GIL while decoding and resampling pixels, the bulk of the work for
  # large images, and threads also overlap file reads on slow (network) file systems.
  workers = min(32, (os.cpu_count() or 1) + 4)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    decoded = list(pool.map(functools.partial(_decode_file, size=data.image_size), paths))
  ok = np.array([image is not None for image in decoded], bool)
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.warning('Skipped %d of %d image files under %s that could not be decoded: %s%s',
                    len(bad), len(paths), data.path, ', '.join(bad[:_NUM_SKIPPED_NAMED]),
                    ', ...' if len(bad) > _NUM_SKIPPED_NAMED else '')
  images = _stack([image for image in decoded if image is not None], data.image_size)
  labels = None if listing.labels is None else listing.labels[start:stop][ok]
  return ImageArrays(images=images, labels=labels, num_classes=listing.num_classes,
                     skipped=len(bad))


# ----------------------------------------------------------------------------- tfds


def import_tensorflow():
  """Imports TensorFlow with GPUs hidden, so it never takes accelerator memory from JAX."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TensorFlow was already initialised by the caller; its device choice stands.
    pass
  return tf


def import_tfds():
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  return tfds


def tfds_split_name(data, split: str) -> str:
  """Maps 'train'/'eval' to the configured TFDS split (which may itself be sliced)."""
  check_split(split)
  return data.train_split if split == 'train' else data.eval_split


def tfds_builder(data):
  """Returns the TFDS builder for ``data.name``, preparing the dataset if it is not yet.

  Raises:
    ValueError: the name is not a known TFDS dataset (close names are suggested).
    RuntimeError: the dataset is not prepared under the data dir and preparing it
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
  lo, hi = shard_bounds(total, shard_index, shard_count)
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


def _load_tfds(data, split, shard_index, shard_count) -> ImageArrays:
  tfds = import_tfds()
  builder = tfds_builder(data)
  has_label, num_classes = tfds_label_info(builder, data.name)
  instruction, _ = tfds_shard(builder, tfds_split_name(data, split), shard_index, shard_count)
  images, labels = [], []
  if instruction is not None:
    # One file at a time: the default interleaving of files would make the order
    # of a block differ from its order inside a bigger block.
    dataset = builder.as_dataset(split=instruction, shuffle_files=False,
                                 read_config=tfds.ReadConfig(interleave_cycle_length=1))
    # Crossing from tf.data to numpy per example costs more than decoding a CIFAR
    # image, so batch whenever all images share one shape.
    batch_size = 1 if None in builder.info.features['image'].shape else 1024
    for batch in tfds.as_numpy(dataset.batch(batch_size)):
      images.extend(_to_rgb_square(image, data.image_size) for image in batch['image'])
      if has_label:
        labels.extend(batch['label'])
  return ImageArrays(images=_stack(images, data.image_size),
                     labels=np.asarray(labels, np.int32) if has_label else None,
                     num_classes=num_classes)
