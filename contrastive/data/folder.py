"""The ``folder`` source: a directory of image files, such as a user's own data or ImageNet.

``data.path`` holds either one sub-folder per class (a sub-folder's label is its
position in the sorted list of sub-folders) or a flat folder of unlabelled
images. The eval split of a labelled folder is one of

* ``data.holdout_per_class`` images of each class held out of ``data.path``;
* a separate folder ``data.eval_path`` with one sub-folder per class, such as
  ImageNet's ``val/`` next to ``train/``. Its sub-folders take the label of the
  ``data.path`` sub-folder of the same name, so a class missing from the eval
  folder does not shift the labels of the others; the train split is then the
  whole of ``data.path``.

Class sub-folders are read recursively, following symlinks, but each real folder
and real file is listed once, so symlink loops and second links add nothing.

A split's order is its sorted paths followed by a fixed shuffle, so holdout images
are spread over the folder and the order is the same on every host. The listing
(``folder_split``) is shared with the streaming pipeline's ``block_readers.py``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os

from absl import logging
import numpy as np

from contrastive.data import pil_images
from contrastive.data import source_base

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')

# Number of file or folder names quoted in a warning.
_NUM_SKIPPED_NAMED = 5


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The files of one split of an image folder, in the split's fixed order."""
  paths: list[str]
  labels: np.ndarray | None   # int32 [N], None for an unlabelled folder
  num_classes: int | None


def load(data, split: str, shard_index: int, shard_count: int) -> source_base.ImageArrays:
  """Block ``shard_index`` of ``shard_count`` of a split (see ``sources.load_arrays``)."""
  listing = folder_split(data, split)
  start, stop = source_base.shard_bounds(len(listing.paths), shard_index, shard_count)
  paths = listing.paths[start:stop]
  # PIL releases the GIL while decoding and resampling pixels, the bulk of the work for
  # large images, and threads also overlap file reads on slow (network) file systems.
  workers = min(32, (os.cpu_count() or 1) + 4)
  decode = functools.partial(_decode_file, size=data.image_size,
                             limit=pil_images.max_pixels(data))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    decoded = list(pool.map(decode, paths))
  ok = np.array([isinstance(image, np.ndarray) for image in decoded], bool)
  root = data.eval_path if split == 'eval' and data.get('eval_path') else data.path
  unreadable = [p for p, image in zip(paths, decoded) if image is None]
  too_large = [image for image in decoded if isinstance(image, str)]
  for what, names in (('could not be decoded', unreadable), ('are too large', too_large)):
    if names:
      logging.warning('Skipped %d of %d image files under %s that %s: %s%s', len(names),
                      len(paths), root, what, ', '.join(names[:_NUM_SKIPPED_NAMED]),
                      ', ...' if len(names) > _NUM_SKIPPED_NAMED else '')
  images = source_base.stack_images([image for image, good in zip(decoded, ok) if good],
                                    data.image_size)
  labels = None if listing.labels is None else listing.labels[start:stop][ok]
  return source_base.ImageArrays(images=images, labels=labels, num_classes=listing.num_classes,
                                 skipped=len(paths) - int(ok.sum()))


def split_info(data, split: str) -> source_base.SplitInfo:
  listing = folder_split(data, split)
  return source_base.SplitInfo(split=split, num_examples=len(listing.paths),
                               num_classes=listing.num_classes)


def folder_split(data, split: str) -> FolderSplit:
  """Lists the files of one split: of ``data.path``, or of ``data.eval_path`` for 'eval'."""
  source_base.check_split(split)
  root = data.path
  if not root:
    raise ValueError("data.path is empty; set it to the image folder root for source='folder'.")
  class_dirs, root_files = _scan(root, 'data.path')
  eval_path = data.get('eval_path') or ''  # Configs saved before the field lack it.
  if eval_path:
    # Checked for the train split too, so a wrong eval folder fails before training.
    eval_dirs = _eval_class_dirs(data, class_dirs)
    if split == 'eval':
      return _eval_folder_split(data, class_dirs, eval_dirs)
  if not class_dirs:
    return _unlabelled_split(data, split, root_files)
  paths, labels = _shuffled(*_labelled_files(root, 'data.path', class_dirs,
                                             range(len(class_dirs))))
  if eval_path:
    return FolderSplit(paths=paths, labels=labels, num_classes=len(class_dirs))
  if split == 'eval' and data.holdout_per_class == 0:
    raise ValueError(
        f'data.path={root!r} has no separate eval split: set data.eval_path to a folder '
        'of evaluation images (one sub-folder per class), or data.holdout_per_class > 0 '
        'to hold out that many images per class.')
  indices = source_base.holdout_indices(labels, data.holdout_per_class, split,
                                        f'folder {root!r}', [d.name for d in class_dirs])
  return FolderSplit(paths=[paths[i] for i in indices], labels=labels[indices],
                     num_classes=len(class_dirs))


def _scan(root: str, field: str) -> tuple[list[os.DirEntry], list[str]]:
  """Checks the folder named by config ``field``; returns its class sub-folders and its
  top-level image files, each sorted by name."""
  if not os.path.exists(root):
    raise FileNotFoundError(f'{field}={root!r} does not exist.')
  if not os.path.isdir(root):
    raise ValueError(f'{field}={root!r} is not a directory.')
  with os.scandir(root) as entries:
    entries = sorted(entries, key=lambda e: e.name)
  class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith('.')]
  root_files = [e.path for e in entries if e.is_file() and _is_image_file(e.name)]
  if class_dirs and root_files:
    raise ValueError(
        f'{field}={root!r} mixes class sub-folders with {len(root_files)} image files '
        f'at the top level (e.g. {os.path.basename(root_files[0])!r}); use either one '
        'sub-folder per class or a flat folder of unlabelled images.')
  return class_dirs, root_files


def _labelled_files(root: str, field: str, class_dirs, class_labels) -> tuple[list[str],
                                                                               np.ndarray]:
  """Sorted image files of each class sub-folder, and int32 labels from ``class_labels``."""
  per_class = _class_files(root, class_dirs)
  if not any(per_class):
    raise ValueError(f'The class sub-folders of {field}={root!r} contain no images '
                     f"({', '.join(IMAGE_EXTENSIONS)}).")
  empty = [d.name for d, files in zip(class_dirs, per_class) if not files]
  if empty:
    logging.warning('Class sub-folders without images in %s (their labels stay reserved): %s',
                    root, ', '.join(empty[:_NUM_SKIPPED_NAMED]))
  paths = [p for files in per_class for p in files]
  labels = np.concatenate(
      [np.full(len(files), c, np.int32) for c, files in zip(class_labels, per_class)])
  return paths, labels


def _shuffled(paths: list[str], labels: np.ndarray | None):
  """The split order: (sorted) paths and their labels in a fixed shuffle."""
  order = np.random.default_rng(0).permutation(len(paths))
  return [paths[i] for i in order], None if labels is None else labels[order]


def _unlabelled_split(data, split: str, root_files: list[str]) -> FolderSplit:
  root = data.path
  if not root_files:
    raise ValueError(f'data.path={root!r} contains no images '
                     f"({', '.join(IMAGE_EXTENSIONS)}) and no class sub-folders.")
  if data.holdout_per_class > 0:
    raise ValueError(
        f'data.holdout_per_class={data.holdout_per_class} needs labels, but the images in '
        f'data.path={root!r} are not in class sub-folders.')
  if split == 'eval':
    raise ValueError(
        f'data.path={root!r} is an unlabelled folder and has no eval split; use class '
        'sub-folders and set data.holdout_per_class > 0 or data.eval_path.')
  paths, _ = _shuffled(root_files, None)
  return FolderSplit(paths=paths, labels=None, num_classes=None)


def _eval_class_dirs(data, class_dirs) -> list[os.DirEntry]:
  """Checks ``data.eval_path`` against the training folder; returns its class sub-folders."""
  root, eval_path = data.path, data.eval_path
  if data.holdout_per_class != 0:
    raise ValueError(
        f'data.eval_path={eval_path!r} and data.holdout_per_class={data.holdout_per_class} '
        'both choose the eval split; set data.holdout_per_class=0 to evaluate on '
        "data.eval_path, or data.eval_path='' to hold out images of data.path.")
  eval_dirs, eval_files = _scan(eval_path, 'data.eval_path')
  if not class_dirs:
    raise ValueError(
        f'data.eval_path={eval_path!r} is labelled by the class sub-folders of data.path, '
        f'but data.path={root!r} has none.')
  if not eval_dirs:
    found = f'{len(eval_files)} unlabelled images' if eval_files else 'no images'
    raise ValueError(
        f'data.eval_path={eval_path!r} has {found} and no class sub-folders; it needs one '
        'sub-folder per class, named as in data.path.')
  train_names = {d.name for d in class_dirs}
  unknown = [d.name for d in eval_dirs if d.name not in train_names]
  if unknown:
    raise ValueError(
        f'data.eval_path={eval_path!r} has class sub-folders that data.path={root!r} lacks: '
        f"{', '.join(unknown[:_NUM_SKIPPED_NAMED])}; eval classes must be training classes.")
  return eval_dirs


def _eval_folder_split(data, class_dirs, eval_dirs) -> FolderSplit:
  """The whole of ``data.eval_path``, labelled by the training folder's class names."""
  label_of = {d.name: label for label, d in enumerate(class_dirs)}
  paths, labels = _shuffled(*_labelled_files(data.eval_path, 'data.eval_path', eval_dirs,
                                             [label_of[d.name] for d in eval_dirs]))
  return FolderSplit(paths=paths, labels=labels, num_classes=len(class_dirs))


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _class_files(root: str, class_dirs) -> list[list[str]]:
  """All image files below each class sub-folder (recursively), sorted per class;
  hidden entries skipped.

  Symlinks are followed, but each real folder and each real file is listed once: a
  folder already listed (the root, a class folder, or one reached before through
  another link) is skipped, and so is a file reached before through another path,
  the first path in class then name order being kept. So a symlink loop cannot
  multiply a class, and no file gets two labels or lands in both the train and the
  holdout eval split. Symlinked files to distinct real files all stay.
  """
  listed_dirs = {os.path.realpath(root)} | {os.path.realpath(d.path) for d in class_dirs}
  listed_files = set()
  repeated_dirs, repeated_files = [], []

  def real_path(entry, real_parent):
    # Only links need resolving: any other entry's real path follows its folder's.
    return (os.path.realpath(entry.path) if entry.is_symlink()
            else real_parent + os.sep + entry.name)

  def walk(directory, real_dir, found):
    try:
      with os.scandir(directory) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    except OSError:
      return  # An unreadable folder is left out, as os.walk leaves it.
    for entry in entries:
      if entry.name.startswith('.'):
        continue
      if entry.is_dir():
        real = real_path(entry, real_dir)
        if real in listed_dirs:
          repeated_dirs.append(entry.path)
        else:
          listed_dirs.add(real)
          walk(entry.path, real, found)
      elif _is_image_file(entry.name):
        real = real_path(entry, real_dir)
        if real in listed_files:
          repeated_files.append(entry.path)
        else:
          listed_files.add(real)
          found.append(entry.path)

  per_class = []
  for class_dir in class_dirs:
    found = []
    walk(class_dir.path, os.path.realpath(class_dir.path), found)
    per_class.append(sorted(found))
  if repeated_dirs or repeated_files:
    logging.warning(
        'Symlinks under %s reach %d folders and %d image files a second time (loops or '
        'second links); each is listed once, skipped: %s', root, len(repeated_dirs),
        len(repeated_files), ', '.join((repeated_dirs + repeated_files)[:_NUM_SKIPPED_NAMED]))
  return per_class


def _decode_file(path: str, size: int, limit: int) -> np.ndarray | str | None:
  """uint8 [size, size, 3] of one image file; its ``pil_images.too_large_note`` if it
  has more than ``limit`` pixels, None if it cannot be read."""
  try:
    return np.asarray(source_base.fit_square(
        pil_images.read_rgb(path, limit, path, draft_size=size), size))
  except pil_images.TooLarge as too_large:
    return str(too_large)
  # PIL's format plugins raise many exception types on malformed files; any of them
  # means this one file is unusable, not that loading should stop.
  except Exception:  # pylint: disable=broad-except
    return None
