"""CPC v2 and AMDIM as runs: patch views, kill-and-resume, every export, downstream,
and their config checks."""

import functools
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastive import config as config_lib
from contrastive import downstream
from contrastive import export
from contrastive import metrics
from contrastive import reader
from contrastive import train
from contrastive.data import augment
from contrastive.data import augment_config
from contrastive.data import in_memory as in_memory_data
from contrastive.formats import torch_resnet
from contrastive.methods import amdim, cpc
from contrastive.models import patch_grid
from tests import faults


def _cpc(config):
  """16 px images -> a 7 x 7 grid of 4 px patches, a LayerNorm ResNet."""
  config.method = 'cpc'
  config.model.norm = 'layer'
  config.cpc.patch_size, config.cpc.patch_stride = 4, 2
  config.cpc.target_dim = config.cpc.context_channels = 8
  config.cpc.context_blocks = 2
  config.cpc.offsets = (2, 3)
  return config


def _amdim(config):
  """Taps of a 16 px CIFAR-stem ResNet: the stem's 16 x 16 map and stage 2's 8 x 8."""
  config.method = 'amdim'
  config.amdim.embed_dim = 16
  config.amdim.local_maps = ('stem', 'stage2')
  return config


CONFIGURE = {'cpc': _cpc, 'amdim': _amdim}


# ------------------------------------------------------------------------ views


def test_patch_views_are_cut_from_the_view_and_augmented_each_on_its_own():
  """With nothing random but the patches' own augmentation off, the grid is the
  view's pixels at (r, c) x stride; colour dropping keeps exactly one channel of
  each patch, not always the same; each patch's randomness is its own (two
  patches of one image differ in which channel survives)."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (3, 12, 12, 3), np.uint8)
  whole = augment_config.simclr_augment_config(blur_prob=0.0)
  whole.crop_area, whole.crop_aspect, whole.flip_prob = (1.0, 1.0), (1.0, 1.0), 0.0
  whole.color_jitter_prob = whole.grayscale_prob = 0.0
  still = augment_config.cpc_patch_augment_config()
  still.crop_area, still.crop_aspect, still.flip_prob = (1.0, 1.0), (1.0, 1.0), 0.0
  still.channel_drop_prob = 0.0
  keys = jax.random.split(jax.random.key(0), 3)
  plain = np.asarray(augment.augment_patch_grid(keys, images, whole, 12, 4, 4, still, True))
  assert plain.shape == (3, 9, 4, 4, 3)
  for r in range(3):
    for c in range(3):
      np.testing.assert_allclose(plain[:, 3 * r + c], images[:, 4 * r:4 * r + 4,
                                                             4 * c:4 * c + 4] / 255, atol=2e-6)
  dropped = augment_config.cpc_patch_augment_config()
  dropped.crop_area, dropped.crop_aspect, dropped.flip_prob = (1.0, 1.0), (1.0, 1.0), 0.0
  patches = np.asarray(augment.augment_patch_grid(keys, images, whole, 12, 4, 4, dropped,
                                                  True))
  kept = np.abs(patches).sum(axis=(2, 3)) > 0                     # [3, 9, 3]
  assert np.all(kept.sum(axis=-1) == 1)
  np.testing.assert_allclose(patches, plain * kept[:, :, None, None, :], atol=2e-6)
  assert len({tuple(row) for row in kept.reshape(-1, 3)}) == 3     # every channel survives


def test_patch_views_do_not_depend_on_the_device_count(config):
  """The trainer's views of one global batch on 8 devices are those on 1: each
  patch's key comes from its image's place in the global batch."""
  _cpc(config)
  views = cpc.METHOD.views(config)
  images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), np.uint8)
  results = []
  for n in (1, 8):
    mesh = jax.make_mesh((n,), ('data',), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))
    fn = jax.jit(jax.shard_map(
        lambda batch: train.device_views(jax.random.key(3), batch, views)[0], mesh=mesh,
        in_specs=jax.sharding.PartitionSpec('data'),
        out_specs=jax.sharding.PartitionSpec('data')))
    results.append(np.asarray(fn({'image': images})))
  assert results[0].shape == (16, 49, 4, 4, 3)
  # Pixels in [0, 1]: XLA may round the resampling differently at another batch
  # shape (last bits); a different key moves pixels by tenths.
  np.testing.assert_allclose(results[0], results[1], rtol=0, atol=2e-6)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize('method,fields,message', [
    ('cpc', {'cpc.directions': ('down', 'sideways')}, r'config\.cpc\.directions=.*distinct'),
    ('cpc', {'cpc.offsets': (2, 7)}, r'grid has 7 rows .* every offset must be < 7'),
    ('cpc', {'cpc.offsets': (0,)}, r'config\.cpc\.offsets=\(0,\); must be distinct'),
    ('cpc', {'cpc.patch_stride': 5}, r'config\.cpc\.patch_stride=5 with '
                                     r'cpc\.patch_size=4 does not tile the 16 px view'),
    ('cpc', {'cpc.patch_size': 32}, r'config\.cpc\.patch_size=32; must be an integer in '
                                    r'\[1, 16\]'),
    ('cpc', {'cpc.patch_aug.channel_drop_prob': 1.5},
     r'config\.cpc\.patch_aug\.channel_drop_prob=1\.5'),
    ('cpc', {'cpc.prediction_scale': 0.0}, r'config\.cpc\.prediction_scale=0\.0 must be > 0'),
    ('amdim', {'amdim.local_maps': ('stage4', 'stage4')},
     r'config\.amdim\.local_maps=.*two distinct ResNet stages'),
    ('amdim', {'amdim.two_views': False},
     r"'coarse_coarse' with config\.amdim\.two_views=False"),
    ('amdim', {'amdim.score_clip': -1.0}, r'config\.amdim\.score_clip=-1\.0 must be > 0'),
    ('amdim', {'model.name': 'vit_tiny'}, r"config\.model\.name='vit_tiny': AMDIM taps"),
    ('amdim', {'optim.adam_betas': (0.9, 1.0)}, r'config\.optim\.adam_betas=\(0\.9, 1\.0\); '
                                                r'must be a pair in \[0, 1\)'),
], ids=lambda value: ','.join(value) if isinstance(value, dict) else str(value)[:12])
def test_bad_values_are_refused_by_name(config, method, fields, message):
  CONFIGURE[method](config)
  train.check_config(config, cpc.METHOD if method == 'cpc' else amdim.METHOD)  # fine as set
  for field, value in fields.items():
    *sections, name = field.split('.')
    section = config
    for key in sections:
      section = section[key]
    section[name] = value
  with pytest.raises(ValueError, match=message):
    train.check_config(config, cpc.METHOD if method == 'cpc' else amdim.METHOD)


# --------------------------------------------------------------- resume and export


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


@functools.cache
def _saved_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'default'))


@pytest.fixture(scope='module', name='runs', params=['cpc', 'amdim'])
def fixture_runs(request, tmp_path_factory):
  """The workdirs of an uninterrupted tiny run (8 devices) and of the same run
  killed at step 5 and restarted with the same command (from step 4's checkpoint)."""
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = CONFIGURE[request.param](tiny_config())
  config.checkpoint_every_steps = 4
  config.eval.online_probe = False
  straight = str(tmp_path_factory.mktemp('straight'))
  resumed = str(tmp_path_factory.mktemp('resumed'))
  train.train_and_evaluate(config, straight)
  monkeypatch = pytest.MonkeyPatch()
  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 5):
    train.train_and_evaluate(config, resumed)
  assert set(_losses(resumed)) == {1, 2, 3, 4, 5}
  train.train_and_evaluate(config, resumed)
  return request.param, straight, resumed


def test_a_killed_run_resumes_to_the_uninterrupted_one(runs):
  """Losses, per-direction / per-term metrics and the final parameters of the
  killed and restarted run are the uninterrupted run's."""
  method, straight, resumed = runs
  expected, got = metrics.read_metrics(straight), metrics.read_metrics(resumed)
  names = {'cpc': ('loss', 'loss_down', 'loss_up'),
           'amdim': ('loss', 'nce_global_fine', 'nce_coarse_coarse', 'regulariser')}[method]
  assert sorted(_losses(resumed)) == sorted(_losses(straight)) == list(range(1, 9))
  for name in names:
    np.testing.assert_allclose([got[s][name] for s in range(1, 9)],
                               [expected[s][name] for s in range(1, 9)], rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               _saved_state(resumed, 8)['params'], _saved_state(straight, 8)['params'])


def test_every_export_and_downstream_give_the_trained_features(runs, tmp_path):
  """reader.encode, the Flax file and downstream's backbone give the method's own
  backbone features of the saved state (CPC: the grid of patch features,
  averaged). AMDIM's BatchNorm ResNet exports to torchvision and detectron2
  names; CPC's patch encoder is refused by name there, and timm refuses both."""
  method_name, workdir, _ = runs
  method = cpc.METHOD if method_name == 'cpc' else amdim.METHOD
  pretrained = reader.load_pretrained(workdir)
  state = _saved_state(workdir, 8)
  backbone = method.backbone(pretrained.config)
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  pixels = augment.preprocess_eval(images, pretrained.config.aug)
  expected = np.asarray(jax.jit(functools.partial(backbone.apply, train=False))(
      method.backbone_variables(state['params'], state['model_state']), pixels))
  np.testing.assert_allclose(reader.encode(pretrained, images, batch_size=8), expected,
                             rtol=1e-5, atol=1e-5)
  if method_name == 'cpc':
    assert isinstance(pretrained.encoder, patch_grid.PatchGridEncoder)
    # The backbone is the patch encoder on the evaluation grid, averaged.
    resnet = pretrained.encoder.encoder
    patches = augment.cut_grid(pixels, 4, 2).reshape(8 * 49, 4, 4, 3)
    per_patch = resnet.apply({'params': state['params']['encoder']}, patches, train=False)
    np.testing.assert_allclose(np.asarray(per_patch).reshape(8, 49, -1).mean(1), expected,
                               rtol=1e-5, atol=1e-5)

  apply = jax.jit(lambda module, variables, x: module.apply(variables, x, train=False),
                  static_argnums=0)
  path = str(tmp_path / 'backbone.msgpack')
  export.export_flax(workdir, path)
  module, variables = export.load_flax_encoder(path)
  np.testing.assert_allclose(apply(module, variables, pixels), expected, rtol=1e-5, atol=1e-5)
  settings = config_lib.downstream_config()
  settings.pretrained = workdir
  loaded = downstream.load_backbone(settings, pretrained)
  np.testing.assert_allclose(apply(loaded.module, loaded.variables, pixels), expected,
                             rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match='--format=timm takes a ViT backbone'):
    export.export_timm(workdir, str(tmp_path / 'timm.safetensors'))
  if method_name == 'cpc':
    for write, message in ((export.export_torchvision, 'PatchGridEncoder, not a ResNet'),
                           (export.export_detectron2, "only the 'imagenet' stem")):
      with pytest.raises(ValueError, match=message):
        write(workdir, str(tmp_path / 'refused'))
    assert not os.path.exists(tmp_path / 'refused')
    return
  state_dict = torch_resnet.torchvision_state_dict(pretrained)
  np.testing.assert_array_equal(
      state_dict['conv1.weight'],
      np.transpose(state['params']['encoder']['stem_conv']['kernel'], (3, 2, 0, 1)))
  export.export_torchvision(workdir, str(tmp_path / 'amdim.safetensors'))
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  jax.tree.map(np.testing.assert_array_equal,
               safetensors_numpy.load_file(str(tmp_path / 'amdim.safetensors')), state_dict)
  with pytest.raises(ValueError, match='stem'):    # detectron2 has no CIFAR stem
    torch_resnet.detectron2_state_dict(pretrained)
