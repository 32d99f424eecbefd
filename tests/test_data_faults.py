"""Faulty image folders end in one clear error, fast, and both input paths (in memory
and streamed) read every image file to the same pixels or skip it alike."""

import logging
import re
import threading

import jax
from jax.sharding import Mesh
import numpy as np
import pytest
from PIL import Image

from contrastive import config_checks
from contrastive import parallel
from contrastive import train
from contrastive.data import folder
from contrastive.data import in_memory
from contrastive.data import pipeline
from contrastive.data import sources
from contrastive.data import tf_import
from contrastive.methods import View
from tests.conftest import tiny_config
from tests.test_data import make_aug
from tests.test_data import make_data

_SIZE = 8


def _noise(rng, *shape):
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _corrupt_folder(root, count=3):
  for i in range(count):
    (root / 'a').mkdir(parents=True, exist_ok=True)
    (root / 'a' / f'{i}.png').write_bytes(b'not an image')
  return make_data(source='folder', path=str(root), image_size=_SIZE)


def _first_batch_or_error(stream):
  """What the first batch gives within a minute: the batch or its exception."""
  result = []

  def take():
    try:
      result.append(next(stream))
    except Exception as error:  # pylint: disable=broad-except
      result.append(error)

  reader = threading.Thread(target=take, daemon=True)
  reader.start()
  reader.join(timeout=60)
  assert result, 'no batch and no error after 60 s'
  return result[0]


@pytest.mark.parametrize('start_position', [0, 4])
def test_a_streamed_folder_without_a_readable_image_is_an_error(tmp_path, start_position):
  data = _corrupt_folder(tmp_path / 'images')
  stream = pipeline.train_iterator(data, [View(make_aug(), _SIZE)], 2, seed=0, shard_index=0,
                                   shard_count=1, start_position=start_position)
  error = _first_batch_or_error(stream)
  assert isinstance(error, ValueError)
  assert str(tmp_path / 'images') in str(error) and 'None of the 3 images' in str(error)


def test_in_memory_a_folder_without_a_readable_image_is_not_asked_a_smaller_batch(tmp_path):
  data = _corrupt_folder(tmp_path / 'images')
  mesh = Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,))
  with pytest.raises(ValueError, match='None of the 3 image files') as error:
    in_memory.InMemoryTrainData(data, mesh, per_device_batch=2, seed=0)
  assert str(tmp_path / 'images') in str(error.value)
  assert 'global_batch_size' not in str(error.value)


@pytest.mark.parametrize('streamed', [True, False])
def test_a_split_smaller_than_one_global_batch_is_refused_before_compiling(tmp_path, streamed):
  rng = np.random.default_rng(0)
  (tmp_path / 'images').mkdir()
  for i in range(6):
    Image.fromarray(_noise(rng, _SIZE, _SIZE, 3)).save(tmp_path / 'images' / f'{i}.png')
  config = tiny_config()
  config.data.update(source='folder', path=str(tmp_path / 'images'), holdout_per_class=0,
                     in_memory=not streamed)
  config.eval.knn_every_epochs = 0.0
  expected = (f"(data.path='{tmp_path / 'images'}') has 6 images, fewer than one global "
              'batch of 16: lower config.global_batch_size to at most 6')
  with pytest.raises(ValueError, match=re.escape(expected)):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))


def _image_files(root, rng):
  """One file of each kind PIL or TensorFlow decodes differently (or not at all)."""
  tf = tf_import.import_tensorflow()
  rgb, grey = _noise(rng, _SIZE, _SIZE, 3), _noise(rng, _SIZE, _SIZE)
  rgba = Image.fromarray(np.dstack([rgb, grey]), 'RGBA')
  palette = Image.fromarray(rgb).quantize(16)
  frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1])]
  files = {
      'rgb.png': (Image.fromarray(rgb), {}), 'grey.png': (Image.fromarray(grey), {}),
      'grey_alpha.png': (Image.fromarray(np.dstack([grey, grey]), 'LA'), {}),
      'rgba.png': (rgba, {}), 'palette.png': (palette, {}),
      'palette_alpha.png': (palette, {'transparency': 3}),
      'bilevel.png': (Image.fromarray(grey > 127), {}),
      'ppm_named.png': (Image.fromarray(rgb), {'format': 'PPM'}),
      'grey16.png': (Image.fromarray(grey.astype(np.uint16) * 257 + 100), {}),
      'rgb.jpg': (Image.fromarray(rgb), {'quality': 90}),
      'grey.jpg': (Image.fromarray(grey), {'quality': 90}),
      'cmyk.jpg': (Image.fromarray(rgb).convert('CMYK'), {'quality': 90}),
      'progressive.jpg': (Image.fromarray(rgb), {'quality': 90, 'progressive': True}),
      'rgb.bmp': (Image.fromarray(rgb), {}), 'palette.bmp': (palette, {}),
      'bilevel.bmp': (Image.fromarray(grey > 127), {}),
      'transparent.gif': (palette, {'transparency': 2}),
      'animated.gif': (frames[0], {'save_all': True, 'append_images': frames[1:]}),
      'rgb.webp': (Image.fromarray(rgb), {'lossless': True}),
      'rgba.webp': (rgba, {'quality': 80}),
      'animated.webp': (frames[0], {'save_all': True, 'append_images': frames[1:],
                                    'lossless': True}),
  }
  root.mkdir()
  for name, (image, options) in files.items():
    image.save(root / name, **options)
  (root / 'rgb16.png').write_bytes(tf.io.encode_png(
      tf.constant(rgb.astype(np.uint16) * 257 + 100)).numpy())
  (root / 'corrupt.png').write_bytes(b'not an image')
  for name in ('rgb.jpg', 'rgb.png'):
    encoded = (root / name).read_bytes()
    (root / f'cut_{name}').write_bytes(encoded[:len(encoded) * 3 // 4])
  Image.fromarray(_noise(rng, _SIZE + 1, _SIZE + 1, 3)).save(root / 'large.png')


def test_both_paths_read_every_image_file_alike(tmp_path, caplog):
  """The same pixels for each file one path reads; the same files skipped, a too large
  one named with its size and the limit by both."""
  _image_files(tmp_path / 'images', np.random.default_rng(1))
  data = make_data(source='folder', path=str(tmp_path / 'images'), image_size=_SIZE,
                   max_image_pixels=_SIZE * _SIZE + 1)
  large = str(tmp_path / 'images' / 'large.png')
  note = f'{large} (9x9 = 81 pixels, more than data.max_image_pixels=65: raise it'
  paths = folder.folder_split(data, 'train').paths
  skipped = {paths.index(str(tmp_path / 'images' / name))
             for name in ('large.png', 'corrupt.png', 'cut_rgb.jpg', 'cut_rgb.png')}
  kept = [i for i in range(len(paths)) if i not in skipped]

  caplog.set_level(logging.WARNING)
  loaded = sources.load_arrays(data, 'train')
  assert loaded.skipped == 4 and note in caplog.text
  caplog.clear()
  streamed = {}
  for batch in pipeline.eval_iterator(data, 'train', 4, shard_index=0, shard_count=1):
    streamed.update((int(i), image) for i, image, real in
                    zip(batch['index'], batch['image'], batch['mask']) if real)
  assert sorted(streamed) == kept and note in caplog.text
  for i, image in zip(kept, loaded.images):
    np.testing.assert_array_equal(streamed[i], image, err_msg=paths[i])

  caplog.clear()
  first_pass = set()
  for batch in pipeline.train_iterator(data, [View(make_aug(), _SIZE)], 2, seed=0,
                                       shard_index=0, shard_count=1):
    first_pass.update(int(i) for i, p in zip(batch['index'], batch['position'])
                      if p < len(paths))
    if batch['position'][-1] >= len(paths):
      break
  assert first_pass == set(kept)
  assert sum(note in record.getMessage() for record in caplog.records) == 1


def test_the_size_limit_is_a_config_field(tmp_path):
  _image_files(tmp_path / 'images', np.random.default_rng(2))
  data = make_data(source='folder', path=str(tmp_path / 'images'), image_size=_SIZE,
                   max_image_pixels=(_SIZE + 1) ** 2)
  assert sources.load_arrays(data, 'train').skipped == 3     # corrupt and cut short
  config = tiny_config()
  config.data.max_image_pixels = 0
  with pytest.raises(ValueError, match=r'config\.data\.max_image_pixels=0; must be >= 1'):
    config_checks.validate_pretraining(config)


def test_a_class_too_small_for_the_holdout_is_named_by_its_folder(tmp_path):
  for name, count in (('cats', 2), ('dogs', 5), ('owls', 1)):
    (tmp_path / name).mkdir()
    for i in range(count):
      (tmp_path / name / f'{i}.png').write_bytes(b'')
  data = make_data(source='folder', path=str(tmp_path), holdout_per_class=2)
  with pytest.raises(ValueError, match=r"in 2 classes of the folder .* \(their images: "
                                       r"'cats' 2, 'owls' 1\): lower it to at most 0"):
    folder.folder_split(data, 'train')
