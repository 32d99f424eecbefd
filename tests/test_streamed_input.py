"""The streamed training input resumes exactly, names unreadable files once, decodes
JPEG crop windows to the pixels of the whole image, and image folders list each real
folder and file once whatever their symlinks."""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastive.data import folder
from contrastive.data import host_image_ops
from contrastive.data import pipeline
from contrastive.data import sources
from contrastive.data import tf_import
from contrastive.methods import View
from tests.test_data import make_aug
from tests.test_data import make_data
from tests.test_data import two_views


def _random_images(directory, count, rng, first=0):
  """``count`` 20x20 noise images (PNG and JPEG), so every crop tells them apart."""
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(first, first + count):
    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    fmt, ext = ('PNG', 'png') if i % 2 else ('JPEG', 'jpg')
    Image.fromarray(pixels).save(directory / f'{i}.{ext}', fmt)


def _batches(data, count, batch_size=3, seed=5, shard_index=1, shard_count=2,
             start_position=0):
  stream = pipeline.train_iterator(data, two_views(data), batch_size, seed, shard_index,
                                   shard_count, start_position=start_position)
  return [next(stream) for _ in range(count)]


def _assert_same(resumed, expected):
  assert len(resumed) == len(expected)
  for got, want in zip(resumed, expected):
    assert got.keys() == want.keys()
    for key in ('label', 'index', 'position'):
      np.testing.assert_array_equal(got[key], want[key])
    for got_view, want_view in zip(got['views'], want['views'], strict=True):
      np.testing.assert_array_equal(got_view, want_view)


def _check_resumes(data, batches, resume_after, **kwargs):
  """Resuming where the trainer would after batch k (``position[-1] + 1``) yields
  the uninterrupted batches k, k+1, ..."""
  for k in resume_after:
    start = int(batches[k - 1]['position'][-1]) + 1
    resumed = _batches(data, len(batches) - k, start_position=start, **kwargs)
    _assert_same(resumed, batches[k:])


@pytest.fixture(name='labelled_folder')
def fixture_labelled_folder(tmp_path):
  """13 images in 3 classes: shard 1 of 2 holds 7, so batches of 3 cross passes."""
  rng = np.random.default_rng(0)
  for c, count in enumerate((5, 4, 4)):
    _random_images(tmp_path / 'images' / f'class{c}', count, rng)
  return make_data(source='folder', path=str(tmp_path / 'images'), image_size=12)


def test_folder_stream_resumes_exactly(labelled_folder):
  data = labelled_folder
  batches = _batches(data, 10)
  positions = np.concatenate([b['position'] for b in batches])
  assert positions.dtype == np.int64
  np.testing.assert_array_equal(positions, np.arange(30))
  # Each pass over the block (split indices 6..12) is a permutation of it, a new one.
  index = np.concatenate([b['index'] for b in batches])
  passes = [index[7 * e:7 * e + 7].tolist() for e in range(4)]
  assert all(sorted(p) == list(range(6, 13)) for p in passes)
  assert len({tuple(p) for p in passes}) == 4
  train_labels = sources.load_arrays(data, 'train').labels
  np.testing.assert_array_equal(train_labels[index], np.concatenate([b['label'] for b in
                                                                     batches]))
  # Mid-pass; a batch across passes 0 and 1; mid-pass 1; exactly at pass 3.
  _check_resumes(data, batches, resume_after=(1, 2, 4, 7))
  # The same image gets new crops in each pass: they follow the position.
  first, again = (int(np.flatnonzero(index == 6)[e]) for e in (0, 1))
  assert not np.array_equal(batches[first // 3]['views'][0][first % 3],
                            batches[again // 3]['views'][0][again % 3])


def test_folder_stream_skips_to_a_far_position_without_reading(labelled_folder):
  far = 7 * 10**12 + 3   # pass 10**12: reading up to it would never end
  batch = _batches(labelled_folder, 1, start_position=far)[0]
  np.testing.assert_array_equal(batch['position'], far + np.arange(3))
  with pytest.raises(ValueError, match='start_position must be >= 0'):
    _batches(labelled_folder, 1, start_position=-1)


@pytest.fixture(name='folder_with_bad_files')
def fixture_folder_with_bad_files(tmp_path):
  """10 images and 3 unreadable files (random bytes, empty, a dangling link) in 2 classes."""
  rng = np.random.default_rng(1)
  root = tmp_path / 'images'
  _random_images(root / 'a', 5, rng)
  _random_images(root / 'b', 5, rng, first=5)
  (root / 'a' / 'noise.jpg').write_bytes(rng.bytes(300))
  (root / 'b' / 'empty.png').write_bytes(b'')
  os.symlink(tmp_path / 'missing.png', root / 'b' / 'gone.png')
  bad = {str(root / 'a' / 'noise.jpg'), str(root / 'b' / 'empty.png'),
         str(root / 'b' / 'gone.png')}
  return make_data(source='folder', path=str(root), image_size=12), bad


def _skip_warnings(caplog):
  return [r.getMessage() for r in caplog.records if 'Skipped unreadable image' in
          r.getMessage()]


def test_unreadable_files_are_left_out_named_once_and_resumable(folder_with_bad_files,
                                                                caplog):
  data, bad = folder_with_bad_files
  kwargs = {'batch_size': 4, 'shard_index': 0, 'shard_count': 1}
  caplog.clear()
  batches = _batches(data, 12, **kwargs)     # about 5 passes over 13 files
  warnings = _skip_warnings(caplog)
  assert len(warnings) == 3 and all(sum(path in w for w in warnings) == 1 for path in bad)
  positions = np.concatenate([b['position'] for b in batches])
  assert np.all(np.diff(positions) > 0)
  gaps = set(range(positions[-1])) - set(positions.tolist())
  assert [sum(g // 13 == e for g in gaps) for e in range(4)] == [3] * 4  # 3 a pass
  listing = folder.folder_split(data, 'train').paths
  assert not {listing[i] for b in batches for i in b['index']} & bad
  _assert_same(_batches(data, 12, **kwargs), batches)   # deterministic
  # Resuming where the next file is a bad one, and elsewhere.
  at_gap = [k for k in range(1, 12) if int(batches[k - 1]['position'][-1]) + 1 in gaps]
  assert at_gap
  _check_resumes(data, batches, resume_after=sorted({at_gap[0], 5, 11}), **kwargs)
  # An evaluation pass counts them in one line.
  caplog.clear()
  list(pipeline.eval_iterator(data, 'train', 4, 0, 1))
  assert caplog.text.count('Skipped 3 of 13 images') == 1
  assert all(path in caplog.text for path in bad)


def test_symlink_loops_and_second_links_list_each_real_file_once(tmp_path, caplog):
  rng = np.random.default_rng(2)
  root = tmp_path / 'images'
  for name in ('ant', 'bee', 'cat'):
    _random_images(root / name, 6, rng)
  _random_images(tmp_path / 'outside', 2, rng)
  Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
      tmp_path / 'solo.png')
  os.symlink('.', root / 'cat' / 'loop')                 # cat/loop -> cat
  os.symlink('..', root / 'cat' / 'up')                  # cat/up -> the root
  os.symlink('../cat', root / 'bee' / 'cats')            # a second link to a class folder
  os.symlink('../../outside', root / 'ant' / 'more')     # a folder outside: listed under ant
  os.symlink('../../outside', root / 'bee' / 'more')     # ... and not again under bee
  os.symlink('0.jpg', root / 'ant' / 'again.jpg')        # a second path to a file
  os.symlink('../../solo.png', root / 'ant' / 'solo.png')  # a distinct file: stays
  data = make_data(source='folder', path=str(root), holdout_per_class=2)
  caplog.clear()
  train, eval_ = folder.folder_split(data, 'train'), folder.folder_split(data, 'eval')
  assert 'reach 4 folders and 1 image files a second time' in caplog.text
  labels = np.concatenate([train.labels, eval_.labels])
  assert np.bincount(labels).tolist() == [6 + 2 + 1, 6, 6]
  real = [os.path.realpath(p) for p in train.paths + eval_.paths]
  assert len(set(real)) == len(real) == 21
  assert sources.split_info(data, 'eval').num_examples == 6


_TFDS_NAME = 'stream_test_images'


def _register_test_builder(tfds):
  """A tiny local TFDS dataset of noise images (offline: nothing to fetch)."""

  class StreamTestImages(tfds.core.GeneratorBasedBuilder):
    # A top-level module name: TFDS then does not look for package resources next
    # to the class, which needs the optional importlib_resources package.
    __module__ = _TFDS_NAME
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, 16), 'test': self._generate_examples(16, 6)}

    def _generate_examples(self, first, count):
      rng = np.random.default_rng(first)
      for i in range(first, first + count):
        yield i, {'image': rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), 'label': i % 2}

  return StreamTestImages


@pytest.fixture(name='tfds_data', scope='module')
def fixture_tfds_data(tmp_path_factory):
  """Block 1 of 2 of a split read from two record files: 9 examples."""
  tfds = pytest.importorskip('tensorflow_datasets')
  _register_test_builder(tfds)
  return make_data(source='tfds', name=_TFDS_NAME, image_size=12,
                   data_dir=str(tmp_path_factory.mktemp('tfds')),
                   train_split='train[3:]+test[:4]')


def test_tfds_stream_resumes_exactly(tfds_data):
  kwargs = {'batch_size': 4}
  batches = _batches(tfds_data, 8, **kwargs)   # 3.5 passes
  positions = np.concatenate([b['position'] for b in batches])
  np.testing.assert_array_equal(positions, np.arange(32))
  index = np.concatenate([b['index'] for b in batches])
  passes = [index[9 * e:9 * e + 9].tolist() for e in range(3)]
  assert all(sorted(p) == list(range(8, 17)) for p in passes)
  assert len({tuple(p) for p in passes}) == 3
  _assert_same(_batches(tfds_data, 8, **kwargs), batches)
  _check_resumes(tfds_data, batches, resume_after=(1, 2, 5), **kwargs)
  far = _batches(tfds_data, 1, start_position=9 * 10**12 + 2, **kwargs)[0]
  np.testing.assert_array_equal(far['position'], 9 * 10**12 + 2 + np.arange(4))


def _jpeg_bytes(pixels, **save_options):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=90, **save_options)
  return buffer.getvalue()


# Odd and even sizes, against libjpeg's 8 and 16 pixel blocks, from 1 pixel up.
_JPEG_SIZES = ((1, 1), (7, 9), (16, 16), (17, 31), (33, 65), (101, 77))


def _jpeg_variants(pixels):
  """The ways a JPEG's colour may be stored: chroma 4:4:4, 4:2:2 and 4:2:0 (the sides'
  upsampling is what a bare cropped decode gets wrong), progressive, grey and CMYK."""
  image = Image.fromarray(pixels)
  grey, cmyk = io.BytesIO(), io.BytesIO()
  image.convert('L').save(grey, 'JPEG', quality=90)
  image.convert('CMYK').save(cmyk, 'JPEG', quality=90)
  return {'4:4:4': _jpeg_bytes(pixels, subsampling=0),
          '4:2:2': _jpeg_bytes(pixels, subsampling=1),
          '4:2:0': _jpeg_bytes(pixels, subsampling=2),
          'progressive 4:2:0': _jpeg_bytes(pixels, subsampling=2, progressive=True),
          'grey': grey.getvalue(), 'cmyk': cmyk.getvalue()}


def test_jpeg_windows_hold_the_pixels_of_the_full_decode():
  """Noise, the hardest case for chroma upsampling; every box, the whole image too."""
  tf = tf_import.import_tensorflow()
  rng = np.random.default_rng(3)
  for height, width in _JPEG_SIZES:
    for kind, encoded in _jpeg_variants(rng.integers(0, 256, (height, width, 3),
                                                     dtype=np.uint8)).items():
      full = host_image_ops.decode(tf, encoded).numpy()
      boxes = [(0, 0, height, width)]
      for _ in range(12):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
      for top, left, h, w in boxes:
        window = host_image_ops.decode_jpeg_window(
            tf, encoded, width, *(tf.constant(v, tf.int32) for v in (top, left, h, w)))
        np.testing.assert_array_equal(window.numpy(), full[top:top + h, left:left + w],
                                      err_msg=f'{height}x{width} {kind} {top, left, h, w}')


@pytest.fixture(name='jpeg_folder')
def fixture_jpeg_folder(tmp_path):
  """JPEGs of several sizes and colour layouts, and a PNG (always decoded whole)."""
  rng = np.random.default_rng(4)
  root = tmp_path / 'images'
  root.mkdir()
  for i, (height, width) in enumerate(_JPEG_SIZES + ((40, 24), (24, 40))):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    variants = list(_jpeg_variants(pixels).values())
    (root / f'{i}.jpg').write_bytes(variants[i % len(variants)])
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / 'p.png')
  return make_data(source='folder', path=str(root), image_size=12)


def _jpeg_window_views(data, jpeg_windows):
  """A random resized crop, and the whole image: its box does not fit a non-square image
  at aspect 1, and a square one is whole at area 1; either way the box is the image."""
  whole = ml_collections.ConfigDict({'crop_area': (1.0, 1.0), 'crop_aspect': (1.0, 1.0),
                                     'flip_prob': 0.5})
  views = (View(make_aug(), 12), View(whole, 8))
  stream = pipeline.train_iterator(data, views, 3, seed=7, shard_index=0, shard_count=1,
                                   jpeg_windows=jpeg_windows)
  return [next(stream) for _ in range(9)]   # 3 passes over the 9 images


def test_views_from_jpeg_windows_equal_those_cut_from_the_whole_image(jpeg_folder,
                                                                      monkeypatch):
  windowed = _jpeg_window_views(jpeg_folder, jpeg_windows=True)
  _assert_same(windowed, _jpeg_window_views(jpeg_folder, jpeg_windows=False))
  # The windows were decoded: without the margin their side columns would differ.
  monkeypatch.setattr(host_image_ops, '_WINDOW_MARGIN', 0)
  bare = _jpeg_window_views(jpeg_folder, jpeg_windows=True)
  assert any(not np.array_equal(a, b) for got, want in zip(bare, windowed)
             for a, b in zip(got['views'], want['views']))


def test_a_jpeg_cut_short_is_skipped_in_every_pass_whatever_its_windows(tmp_path, caplog):
  """Its top rows decode, so some windows would; it is decoded whole and always fails."""
  rng = np.random.default_rng(5)
  _random_images(tmp_path / 'images', 3, rng)
  encoded = _jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  cut = tmp_path / 'images' / 'cut.jpg'
  cut.write_bytes(encoded[:len(encoded) * 9 // 10])
  data = make_data(source='folder', path=str(tmp_path / 'images'), image_size=8)
  caplog.clear()
  stream = pipeline.train_iterator(data, [View(make_aug(), 8)], 2, seed=0, shard_index=0,
                                   shard_count=1, jpeg_windows=True)
  batches = [next(stream) for _ in range(15)]   # 10 passes
  listing = folder.folder_split(data, 'train').paths
  assert str(cut) not in {listing[i] for b in batches for i in b['index']}
  assert sum(str(cut) in w for w in _skip_warnings(caplog)) == 1


def test_host_crop_boxes_are_the_on_device_crop_boxes():
  """The streamed path's crops follow the in-memory path's: for the same uniform
  draws and image shape, ``host_image_ops.sample_crop_boxes`` (TensorFlow, all views
  at once) gives exactly ``augment._crop_box``'s box (JAX), including the whole-image
  fallback when no attempt fits (tall and wide images with a wide aspect range)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from contrastive.data import augment  # pylint: disable=import-outside-toplevel
  tf = tf_import.import_tensorflow()
  rng = np.random.default_rng(0)
  ranges = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 1.0), (0.05, 20.0)),
            ((0.9, 1.0), (0.5, 2.0))]
  fell_back = 0
  for _ in range(60):
    height, width = (int(v) for v in rng.choice([3, 17, 32, 250, 500], size=2))
    draws = rng.uniform(size=(len(ranges), host_image_ops.VIEW_DRAWS)).astype(np.float32)
    boxes = host_image_ops.sample_crop_boxes(tf, tf.constant([height, width]),
                                             tf.constant(draws), [area for area, _ in ranges],
                                             [aspect for _, aspect in ranges]).numpy()
    for view, (area, aspect) in enumerate(ranges):
      expected = augment._crop_box(jnp.asarray(draws[view, :-1]), height, width, area, aspect)
      np.testing.assert_array_equal(boxes[view], np.array(expected, np.int32))
      fell_back += tuple(boxes[view, 2:]) == (height, width)
  assert fell_back > 0


def test_views_resized_from_float_pixels_equal_views_resized_from_uint8():
  """The stage casts an image to float32 before resizing its views (faster); the
  views are those of resizing the uint8 crop, down and up, flipped or not."""
  tf = tf_import.import_tensorflow()
  rng = np.random.default_rng(6)
  image = tf.constant(rng.integers(0, 256, (61, 47, 3), dtype=np.uint8))
  for (top, left, height, width), size, flip in (((3, 5, 40, 31), 24, False),
                                                 ((0, 0, 61, 47), 32, True),
                                                 ((10, 2, 9, 13), 20, True)):
    crop = image[top:top + height, left:left + width]
    view = host_image_ops.resize_and_flip(tf, tf.cast(crop, tf.float32), size,
                                          tf.constant(flip))
    expected = host_image_ops._to_uint8(tf, tf.image.resize(crop, [size, size],
                                                             method='bicubic'))
    if flip:
      expected = expected[:, ::-1]
    assert view.dtype == tf.uint8
    np.testing.assert_array_equal(view.numpy(), expected.numpy())
