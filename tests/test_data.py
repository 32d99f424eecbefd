"""Behaviour of the data sources (in memory) and the streaming tf.data pipeline."""

import os
from pathlib import Path
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastive.data import source_base
from contrastive.data import sources
from contrastive.methods import View

# Solid class colours, so a label can be read back from the pixels after JPEG
# compression, resizing and cropping.
_CLASS_COLOURS = ((220, 20, 20), (20, 220, 20), (20, 20, 220))
_TFDS_NAME = 'contrastive_test_images'
_TFDS_TRAIN, _TFDS_TEST = 23, 7


def make_data(**fields) -> ml_collections.ConfigDict:
  """A data config with every field the sources and the pipeline read."""
  data = ml_collections.ConfigDict({
      'source': 'digits', 'name': _TFDS_NAME, 'data_dir': None, 'path': '', 'eval_path': '',
      'train_split': 'train', 'eval_split': 'test', 'holdout_per_class': 0,
      'image_size': 16, 'eval_crop_fraction': 1.0})
  data.update(fields)
  return data


def make_aug() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {'crop_area': (0.08, 1.0), 'crop_aspect': (3 / 4, 4 / 3), 'flip_prob': 0.5})


def two_views(data, aug=None) -> tuple[View, View]:
  """The two views most methods declare: one augmentation, the data's image size."""
  view = View(make_aug() if aug is None else aug, data.image_size)
  return (view, view)


def _concat(parts):
  return (np.concatenate([p.images for p in parts]),
          np.concatenate([p.labels for p in parts]))


def _check_nested_shards(data, split):
  """Shards 0..3 of 4 tile the split; shard p of 2 is shards 2p and 2p+1 of 4."""
  whole = sources.load_arrays(data, split)
  quarters = [sources.load_arrays(data, split, i, 4) for i in range(4)]
  images, labels = _concat(quarters)
  np.testing.assert_array_equal(images, whole.images)
  np.testing.assert_array_equal(labels, whole.labels)
  for p in range(2):
    half = sources.load_arrays(data, split, p, 2)
    images, labels = _concat(quarters[2 * p:2 * p + 2])
    np.testing.assert_array_equal(half.images, images)
    np.testing.assert_array_equal(half.labels, labels)
  total = len(whole.labels) + whole.skipped  # Blocks are cut before decoding.
  assert [len(q.labels) + q.skipped for q in quarters] == [
      total * (i + 1) // 4 - total * i // 4 for i in range(4)]
  return whole


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range():
  arrays = sources.load_arrays(make_data(image_size=32), 'train')
  assert arrays.images.shape == (1797, 32, 32, 3) and arrays.images.dtype == np.uint8
  assert arrays.labels.shape == (1797,) and arrays.labels.dtype == np.int32
  assert arrays.num_classes == 10 and arrays.skipped == 0
  assert arrays.images.min() == 0 and arrays.images.max() == 255
  np.testing.assert_array_equal(arrays.images[..., 0], arrays.images[..., 2])
  assert set(arrays.labels) == set(range(10))


def test_digits_holdout_is_the_first_images_of_each_class():
  whole = sources.load_arrays(make_data(), 'train')
  held = make_data(holdout_per_class=5)
  train, eval_ = sources.load_arrays(held, 'train'), sources.load_arrays(held, 'eval')
  assert np.bincount(eval_.labels).tolist() == [5] * 10
  assert len(train.labels) + len(eval_.labels) == 1797
  # Rank of each image within its class in the fixed order of the whole set.
  rank = np.zeros(len(whole.labels), int)
  for c in range(10):
    members = np.flatnonzero(whole.labels == c)
    rank[members] = np.arange(len(members))
  np.testing.assert_array_equal(eval_.images, whole.images[rank < 5])
  np.testing.assert_array_equal(train.images, whole.images[rank >= 5])
  assert sources.split_info(held, 'eval') == source_base.SplitInfo('eval', 50, 10)
  assert sources.split_info(held, 'train').num_examples == 1747


def test_digits_shards_are_nested_blocks():
  _check_nested_shards(make_data(image_size=8, holdout_per_class=3), 'train')


def test_digits_eval_needs_holdout_and_bad_arguments_are_named():
  with pytest.raises(ValueError, match='holdout_per_class'):
    sources.load_arrays(make_data(), 'eval')
  with pytest.raises(ValueError, match="'train', 'eval'"):
    sources.load_arrays(make_data(), 'test')
  with pytest.raises(ValueError, match='shard'):
    sources.load_arrays(make_data(), 'train', shard_index=4, shard_count=4)
  with pytest.raises(ValueError, match="'digits', 'tfds', 'folder'"):
    sources.load_arrays(make_data(source='imagenet'), 'train')


def test_in_memory_path_never_imports_tensorflow():
  code = ('import sys, ml_collections\n'
          'from contrastive.data import pipeline, sources\n'
          'd = ml_collections.ConfigDict({"source": "digits", "image_size": 8, '
          '"holdout_per_class": 0})\n'
          'assert len(sources.load_arrays(d, "train").images) == 1797\n'
          'assert "tensorflow" not in sys.modules, "tensorflow imported"\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], cwd=root, check=True)


# ----------------------------------------------------------------------------- folder


def _save(path, colour, size, fmt):
  Image.new('RGB', size, colour).save(path, fmt)


@pytest.fixture(name='image_folder')
def fixture_image_folder(tmp_path):
  """3 classes x 6 images of varied sizes (PNG and JPEG) plus one corrupt file."""
  root = tmp_path / 'images'
  for label, colour in enumerate(_CLASS_COLOURS):
    class_dir = root / f'class_{label}'
    class_dir.mkdir(parents=True)
    for i in range(6):
      ext, fmt = ('png', 'PNG') if i % 2 else ('JPG', 'JPEG')  # Upper-case extension too.
      _save(class_dir / f'{i}.{ext}', colour, (20 + 7 * i, 30 - 3 * i), fmt)
  (root / 'class_1' / 'corrupt.jpg').write_bytes(np.random.default_rng(0).bytes(300))
  (root / 'class_1' / 'notes.txt').write_text('not an image')
  return str(root)


def test_folder_loads_labels_and_skips_corrupt_file(image_folder, caplog):
  arrays = sources.load_arrays(make_data(source='folder', path=image_folder), 'train')
  assert arrays.skipped == 1
  assert 'corrupt.jpg' in caplog.text and 'Skipped 1 of 19' in caplog.text
  assert arrays.images.shape == (18, 16, 16, 3) and arrays.images.dtype == np.uint8
  assert arrays.num_classes == 3 and arrays.labels.dtype == np.int32
  assert np.bincount(arrays.labels).tolist() == [6, 6, 6]
  colour_of = arrays.images.reshape(18, -1, 3).mean(axis=1).argmax(axis=1)
  np.testing.assert_array_equal(colour_of, arrays.labels)


def test_folder_holdout_and_shards(image_folder):
  data = make_data(source='folder', path=image_folder, holdout_per_class=2)
  assert sources.split_info(data, 'eval') == source_base.SplitInfo('eval', 6, 3)
  assert sources.split_info(data, 'train') == source_base.SplitInfo('train', 13, 3)
  train = _check_nested_shards(data, 'train')
  eval_ = sources.load_arrays(data, 'eval')
  assert train.skipped + eval_.skipped == 1
  assert len(train.labels) + len(eval_.labels) == 18
  assert np.bincount(eval_.labels, minlength=3).tolist() == [2, 2 - eval_.skipped, 2]


def test_unlabelled_folder_and_centre_crop(tmp_path):
  # A wide image that is white around its central square and black at the sides.
  wide = np.zeros((32, 96, 3), np.uint8)
  wide[:, 24:72] = 255
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  _save(tmp_path / 'small.bmp', (9, 9, 9), (16, 16), 'BMP')
  data = make_data(source='folder', path=str(tmp_path))
  arrays = sources.load_arrays(data, 'train')
  assert arrays.labels is None and arrays.num_classes is None
  assert arrays.images.shape == (2, 16, 16, 3)
  assert sorted(int(image.min()) for image in arrays.images) == [9, 255]
  with pytest.raises(ValueError, match='holdout_per_class'):
    sources.load_arrays(data, 'eval')
  data.holdout_per_class = 1
  with pytest.raises(ValueError, match='class sub-folders'):
    sources.load_arrays(data, 'train')


def test_folder_errors_name_the_path(tmp_path):
  missing = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='missing'):
    sources.load_arrays(make_data(source='folder', path=missing), 'train')
  (tmp_path / 'file.png').write_bytes(b'')
  with pytest.raises(ValueError, match='not a directory'):
    sources.load_arrays(make_data(source='folder', path=str(tmp_path / 'file.png')), 'train')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='empty.*no images'):
    sources.load_arrays(make_data(source='folder', path=str(empty)), 'train')
  (empty / 'cats').mkdir()
  (empty / 'dogs').mkdir()
  with pytest.raises(ValueError, match='class sub-folders of .*empty.* contain no images'):
    sources.load_arrays(make_data(source='folder', path=str(empty)), 'train')


_NAMED_COLOURS = {'ant': _CLASS_COLOURS[0], 'bee': _CLASS_COLOURS[1], 'cat': _CLASS_COLOURS[2]}


def _class_folder(root, counts):
  """One sub-folder per class name with ``counts[name]`` images of the class colour,
  created in the given (not sorted) order."""
  for name, count in counts.items():
    (root / name).mkdir(parents=True)
    for i in range(count):
      _save(root / name / f'{i}.png', _NAMED_COLOURS[name], (18 + 5 * i, 16), 'PNG')
  return str(root)


@pytest.fixture(name='train_val')
def fixture_train_val(tmp_path):
  """train/ with ant, bee, cat; val/ without bee, its folders made in reverse order."""
  train = _class_folder(tmp_path / 'train', {'ant': 4, 'bee': 4, 'cat': 4})
  val = _class_folder(tmp_path / 'val', {'cat': 3, 'ant': 2})
  return train, val


def test_folder_eval_path_labels_by_class_name(train_val):
  from contrastive.data import folder  # pylint: disable=import-outside-toplevel
  train_dir, val_dir = train_val
  data = make_data(source='folder', path=train_dir, eval_path=val_dir)
  assert sources.split_info(data, 'eval') == source_base.SplitInfo('eval', 5, 3)
  assert sources.split_info(data, 'train') == source_base.SplitInfo('train', 12, 3)
  eval_ = sources.load_arrays(data, 'eval')
  assert eval_.num_classes == 3 and eval_.skipped == 0 and eval_.labels.dtype == np.int32
  # val/cat is label 2 as in train/, though it is val's second class folder.
  assert np.bincount(eval_.labels, minlength=3).tolist() == [2, 0, 3]
  colour_of = eval_.images.reshape(5, -1, 3).mean(axis=1).argmax(axis=1)
  np.testing.assert_array_equal(colour_of, eval_.labels)
  # Sorted paths, then the same fixed shuffle as every split.
  listed = sorted(str(p) for p in Path(val_dir).rglob('*.png'))
  order = np.random.default_rng(0).permutation(len(listed))
  assert folder.folder_split(data, 'eval').paths == [listed[i] for i in order]
  # The train split is the whole training folder, as without an eval folder.
  train = sources.load_arrays(data, 'train')
  assert np.bincount(train.labels).tolist() == [4, 4, 4]
  whole = sources.load_arrays(make_data(source='folder', path=train_dir), 'train')
  np.testing.assert_array_equal(train.images, whole.images)
  np.testing.assert_array_equal(train.labels, whole.labels)
  _check_nested_shards(data, 'eval')


def test_folder_eval_path_streamed_eval_matches_in_memory(train_val):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  train_dir, val_dir = train_val
  data = make_data(source='folder', path=train_dir, eval_path=val_dir)
  in_memory = sources.load_arrays(data, 'eval')
  batches = list(pipeline.eval_iterator(data, 'eval', 2, 0, 1))
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, in_memory.labels)
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  colour_of = images.reshape(len(images), -1, 3).mean(axis=1).argmax(axis=1)
  np.testing.assert_array_equal(colour_of, labels)
  shard = list(pipeline.eval_iterator(data, 'eval', 2, 1, 2))
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in shard]),
                                sources.load_arrays(data, 'eval', 1, 2).labels)


def test_folder_eval_path_errors_name_the_field(train_val, tmp_path):
  train_dir, val_dir = train_val
  for split in ('train', 'eval'):  # A bad eval folder fails before training.
    with pytest.raises(ValueError, match='data.eval_path=.*data.holdout_per_class=2'):
      sources.load_arrays(make_data(source='folder', path=train_dir, eval_path=val_dir,
                                    holdout_per_class=2), split)
    missing = str(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match='data.eval_path=.*missing.* does not exist'):
      sources.split_info(make_data(source='folder', path=train_dir, eval_path=missing), split)
  (tmp_path / 'val' / 'dog').mkdir()
  _save(tmp_path / 'val' / 'dog' / '0.png', (9, 9, 9), (16, 16), 'PNG')
  for split in ('train', 'eval'):
    with pytest.raises(ValueError, match="data.eval_path=.*val.*lacks: dog"):
      sources.load_arrays(make_data(source='folder', path=train_dir, eval_path=val_dir), split)
  flat = tmp_path / 'flat'
  flat.mkdir()
  _save(flat / '0.png', (9, 9, 9), (16, 16), 'PNG')
  with pytest.raises(ValueError, match='data.eval_path=.*flat.*1 unlabelled images and no '
                                       'class sub-folders'):
    sources.load_arrays(make_data(source='folder', path=train_dir, eval_path=str(flat)),
                        'eval')
  with pytest.raises(ValueError, match='data.eval_path=.*flat.* has none'):
    sources.load_arrays(make_data(source='folder', path=str(flat), eval_path=val_dir),
                        'train')
  no_images = tmp_path / 'no_images'
  (no_images / 'ant').mkdir(parents=True)
  with pytest.raises(ValueError, match='class sub-folders of data.eval_path=.*no_images.* '
                                       'contain no images'):
    sources.load_arrays(make_data(source='folder', path=train_dir,
                                  eval_path=str(no_images)), 'eval')
  for source in ('digits', 'tfds'):  # Refused before TFDS is touched.
    with pytest.raises(ValueError, match="data.eval_path=.*only for data.source='folder'"):
      sources.split_info(make_data(source=source, eval_path=val_dir), 'train')


def test_streaming_folder_with_corrupt_file(image_folder):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  data = make_data(source='folder', path=image_folder, holdout_per_class=2, image_size=12)
  stream = pipeline.train_iterator(data, two_views(data), 4, seed=0, shard_index=1,
                                   shard_count=2)
  train_labels = sources.load_arrays(data, 'train').labels
  for _ in range(5):  # More batches than the shard holds: the stream repeats.
    batch = next(stream)
    # 'index' is the image's position in the whole training split.
    np.testing.assert_array_equal(train_labels[batch['index']], batch['label'])
    assert batch['views'][0].shape == batch['views'][1].shape == (4, 12, 12, 3)
    assert batch['views'][0].dtype == np.uint8 and batch['label'].dtype == np.int32
    assert batch['index'].dtype == np.int32
    for view in batch['views']:
      colour_of = view.reshape(4, -1, 3).mean(axis=1).argmax(axis=1)
      np.testing.assert_array_equal(colour_of, batch['label'])
  in_memory = sources.load_arrays(data, 'eval')
  batches = list(pipeline.eval_iterator(data, 'eval', 4, 0, 1))
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, in_memory.labels)


def test_streaming_whole_image_crop_and_flip_unlabelled(tmp_path):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'only.png')
  aug = ml_collections.ConfigDict(
      {'crop_area': (1.0, 1.0), 'crop_aspect': (1.0, 1.0), 'flip_prob': 1.0})
  data = make_data(source='folder', path=str(tmp_path))
  batch = next(pipeline.train_iterator(data, two_views(data, aug), 2, seed=0, shard_index=0,
                                       shard_count=1))
  assert batch['label'].tolist() == [-1, -1]
  for view in (batch['views'][0], batch['views'][1]):
    np.testing.assert_array_equal(view, np.stack([image[:, ::-1]] * 2))


def test_streaming_views_each_have_their_own_size_and_augmentation(tmp_path):
  """A method's views may differ: here one whole-image view at 16 px, flipped, and
  one at 8 px, never flipped."""
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'only.png')
  whole = {'crop_area': (1.0, 1.0), 'crop_aspect': (1.0, 1.0)}
  views = (View(ml_collections.ConfigDict({**whole, 'flip_prob': 1.0}), 16),
           View(ml_collections.ConfigDict({**whole, 'flip_prob': 0.0}), 8))
  data = make_data(source='folder', path=str(tmp_path))
  batch = next(pipeline.train_iterator(data, views, 2, seed=0, shard_index=0,
                                       shard_count=1))
  large, small = batch['views']
  np.testing.assert_array_equal(large, np.stack([image[:, ::-1]] * 2))
  assert small.shape == (2, 8, 8, 3)
  shrunk = np.asarray(Image.fromarray(image).resize((8, 8), Image.BICUBIC), np.float32)
  # Unflipped: far closer to the image shrunk as it is than to its mirror image.
  assert (np.abs(small[0] - shrunk).mean() <
          0.5 * np.abs(small[0] - shrunk[:, ::-1]).mean())


def test_streaming_rejects_digits():
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='in-memory only'):
    pipeline.train_iterator(make_data(), two_views(make_data()), 4, 0, 0, 1)


# ----------------------------------------------------------------------------- tfds


def _register_test_builder(tfds):
  """A tiny local TFDS dataset: grayscale images whose every pixel is the example id."""

  class ContrastiveTestImages(tfds.core.GeneratorBasedBuilder):
    # A top-level module name: TFDS then does not look for package resources next
    # to the class, which needs the optional importlib_resources package.
    __module__ = _TFDS_NAME
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 1)),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, _TFDS_TRAIN),
              'test': self._generate_examples(100, _TFDS_TEST)}

    def _generate_examples(self, first, count):
      for i in range(first, first + count):
        shape = (16, 16, 1) if i % 4 else (16, 24, 1)  # Some need resizing.
        yield i, {'image': np.full(shape, i, np.uint8), 'label': i % 3}

  return ContrastiveTestImages


@pytest.fixture(name='tfds_data', scope='module')
def fixture_tfds_data(tmp_path_factory):
  """Config of the tiny dataset, prepared by the first load (offline: nothing to fetch)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  _register_test_builder(tfds)
  return make_data(source='tfds', data_dir=str(tmp_path_factory.mktemp('tfds')))


def _ids(images):
  """Example ids from the constant-valued test images (all pixels agree)."""
  assert (images == images[:, :1, :1, :1]).all()
  return images[:, 0, 0, 0].astype(int).tolist()


def test_tfds_source_loads_resizes_and_shards(tfds_data):
  train = _check_nested_shards(tfds_data, 'train')
  assert train.images.shape == (_TFDS_TRAIN, 16, 16, 3) and train.num_classes == 3
  ids = _ids(train.images)
  assert sorted(ids) == list(range(_TFDS_TRAIN))
  np.testing.assert_array_equal(train.labels, np.array(ids) % 3)
  eval_ = sources.load_arrays(tfds_data, 'eval')
  assert sorted(_ids(eval_.images)) == list(range(100, 100 + _TFDS_TEST))


def test_tfds_nested_slices(tfds_data):
  whole_train = _ids(sources.load_arrays(tfds_data, 'train').images)
  whole_test = _ids(sources.load_arrays(tfds_data, 'eval').images)
  data = make_data(**{**tfds_data.to_dict(), 'train_split': 'train[5:]+test[:3]'})
  assert sources.split_info(data, 'train').num_examples == _TFDS_TRAIN - 5 + 3
  sliced = _check_nested_shards(data, 'train')
  assert _ids(sliced.images) == whole_train[5:] + whole_test[:3]


def test_streaming_tfds_index_is_the_position_in_the_split(tfds_data):
  """Through shuffled files and a sliced, summed split, 'index' still points at
  the example's position in the split's fixed order."""
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  data = make_data(**{**tfds_data.to_dict(), 'train_split': 'train[5:]+test[:3]'})
  in_order = _ids(sources.load_arrays(data, 'train').images)
  stream = pipeline.train_iterator(data, two_views(data), 4, seed=3, shard_index=1,
                                   shard_count=2)
  seen = set()
  for _ in range(6):
    batch = next(stream)
    assert [in_order[i] for i in batch['index']] == _ids(batch['views'][0])
    seen.update(batch['index'].tolist())
  assert seen == set(range(len(in_order) // 2, len(in_order)))   # shard 1's block


def test_tfds_unknown_name_suggests_close_match():
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError, match="'cifar1O'.*Did you mean 'cifar10'"):
    sources.load_arrays(make_data(source='tfds', name='cifar1O'), 'train')


@pytest.mark.parametrize('name, hint', [('cifar10', 'tfds build cifar10 --data_dir='),
                                        ('imagenet2012', 'downloads/manual/')])
def test_tfds_not_prepared_explains_how_to_prepare(tmp_path, monkeypatch, name, hint):
  tfds = pytest.importorskip('tensorflow_datasets')

  def offline(self, *args, **kwargs):
    raise ConnectionError('no internet')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  data = make_data(source='tfds', name=name, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not prepared') as error:
    sources.load_arrays(data, 'train')
  assert hint in str(error.value) and str(tmp_path) in str(error.value)
  assert 'no internet' in str(error.value)


def test_streaming_tfds_train_views_match_labels(tfds_data):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  stream = pipeline.train_iterator(tfds_data, two_views(tfds_data), 5, seed=1, shard_index=0,
                                   shard_count=2)
  seen = set()
  for _ in range(5):
    batch = next(stream)
    assert batch['views'][0].shape == batch['views'][1].shape == (5, 16, 16, 3)
    assert batch['label'].dtype == np.int32
    ids = _ids(batch['views'][0])
    assert ids == _ids(batch['views'][1])
    np.testing.assert_array_equal(batch['label'], np.array(ids) % 3)
    seen.update(ids)
  shard = sources.load_arrays(tfds_data, 'train', 0, 2)
  assert seen == set(_ids(shard.images))  # 25 draws cover this shard's 11 examples.


def test_streaming_tfds_eval_pads_last_batch(tfds_data):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = list(pipeline.eval_iterator(tfds_data, 'eval', 4, 0, 1))
  assert len(batches) == 2
  assert batches[1]['mask'].tolist() == [True, True, True, False]
  assert batches[1]['label'][-1] == -1 and not batches[1]['image'][-1].any()
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  np.testing.assert_array_equal(images, sources.load_arrays(tfds_data, 'eval').images)
  shard = list(pipeline.eval_iterator(tfds_data, 'eval', 4, 1, 2))
  assert _ids(np.concatenate([b['image'][b['mask']] for b in shard])) == _ids(
      sources.load_arrays(tfds_data, 'eval', 1, 2).images)
  # More processes than examples: the first block is empty.
  assert not list(pipeline.eval_iterator(tfds_data, 'eval', 4, 0, 8))
  assert sources.load_arrays(tfds_data, 'eval', 0, 8).images.shape == (0, 16, 16, 3)


def test_streaming_eval_centre_crop(tfds_data):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  data = make_data(**{**tfds_data.to_dict(), 'image_size': 14, 'eval_crop_fraction': 0.875})
  batch = next(pipeline.eval_iterator(data, 'eval', 8, 0, 1))
  assert batch['image'].shape == (8, 14, 14, 3) and batch['mask'].sum() == _TFDS_TEST


def test_streaming_tfds_refuses_eval_path(tfds_data):
  from contrastive.data import pipeline  # pylint: disable=import-outside-toplevel
  data = make_data(**{**tfds_data.to_dict(), 'eval_path': '/data/val'})
  with pytest.raises(ValueError, match="data.eval_path='/data/val' is only for"):
    pipeline.eval_iterator(data, 'eval', 4, 0, 1)
