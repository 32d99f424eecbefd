"""CMC: Lab conversion, the two-direction loss against a float64 reference, the
L / ab network's features, resume, and export of both encoders."""

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from jax.sharding import PartitionSpec as P
from safetensors import numpy as safetensors_numpy

from contrastive import config as config_lib
from contrastive import downstream
from contrastive import export
from contrastive import metrics
from contrastive import reader
from contrastive import train
from contrastive.data import augment
from contrastive.data import in_memory as in_memory_data
from contrastive.formats import torch_resnet
from contrastive.methods import Batch, Context, RunInfo, cmc, ema
from contrastive.models import lab_split
from tests import faults
from tests import tolerances

VIEWS = ('l', 'ab')
CROSS = {'l': 'ab', 'ab': 'l'}       # whose positives and negatives each view's anchors meet


def _configure(config, negatives='membank'):
  config.method = 'cmc'
  config.cmc.negatives = negatives
  config.cmc.num_negatives = 40
  config.cmc.queue_size = 48         # 8 steps of 16 keys end the pointer at 32, not 0
  config.cmc.momentum = 0.9
  return config


# ------------------------------------------------------------------------ colour


def _lab_float64(rgb):
  """The textbook sRGB -> Lab (D65 white 0.95047, 1, 1.08883), in float64."""
  rgb = np.asarray(rgb, np.float64)
  linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  xyz = linear @ np.array([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]]).T
  t = xyz / np.array([0.95047, 1.0, 1.08883])
  f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
  return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                   200 * (f[:, 1] - f[:, 2])], axis=-1)


def test_rgb_to_lab_gives_the_published_values():
  """sRGB primaries under D65 (Lindbloom's tables), white, black and greys; random
  colours as the float64 textbook formula gives them; greys with a = b = 0
  exactly; and the normalised views the encoders get."""
  rgb = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0.5, 0.5, 0.5],
                  [0.02, 0.02, 0.02]], np.float32)
  want = np.array([[100, 0, 0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                   [32.2970, 79.1875, -107.8602], [0, 0, 0], [53.3890, 0, 0],
                   [1.3983, 0, 0]])          # 0.02 lies on the linear parts of both curves
  rng = np.random.default_rng(0)
  colours = rng.uniform(size=(200, 3)).astype(np.float32)
  greys = np.repeat(rng.uniform(size=(200, 1)), 3, axis=1).astype(np.float32)
  to_lab = jax.jit(augment.rgb_to_lab)
  np.testing.assert_allclose(to_lab(rgb), want, atol=2e-3)
  np.testing.assert_allclose(to_lab(colours), _lab_float64(colours), atol=2e-3)
  np.testing.assert_array_equal(np.asarray(to_lab(greys))[:, 1:], 0.0)
  l_view, ab_view = jax.jit(lab_split.lab_views)(rgb)
  np.testing.assert_allclose(l_view[:, 0], want[:, 0] / 50 - 1, atol=1e-4)
  np.testing.assert_allclose(ab_view, want[:, 1:] / 110, atol=1e-4)


# -------------------------------------------------------------------------- loss


class _TinyNetwork(nn.Module):
  """CMC's network interface, ``(features, (L projection, ab projection))`` with
  global BatchNorm statistics, at a fraction of the ResNets' compile time: the
  loss is what is under test here."""

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Dense(12)(images.reshape(images.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, axis_name='data' if train else None)(x)
    return x, (nn.Dense(6, name='l')(x), nn.Dense(6, name='ab')(x))


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(anchors, positives, negatives, mask, temperature):
  """Float64 InfoNCE of each anchor row: its positive first, then the negatives
  its ``mask`` row keeps; the mean over rows."""
  q = _normalized(anchors)
  positive = np.sum(q * _normalized(positives), axis=-1) / temperature
  logits = np.where(mask, q @ np.asarray(negatives, np.float64).T / temperature, -np.inf)
  everything = np.concatenate([positive[:, None], logits], axis=1)
  top = everything.max(axis=1, keepdims=True)
  log_sum = top[:, 0] + np.log(np.exp(everything - top).sum(axis=1))
  return float(np.mean(log_sum - positive))


@pytest.mark.parametrize('negatives,num_negatives', [
    ('membank', 40), ('membank', 0), ('queue', 0)],
    ids=['drawn_bank_rows', 'whole_bank', 'queue'])
def test_loss_on_8_devices_matches_a_float64_reference(config, negatives, num_negatives):
  """L's projection against ab's positive and negatives plus ab's against L's.
  Banks: 30 images, 32 rows on 8 devices (2 of padding, never negatives); the 40
  drawn rows hit the batch's own rows, which the mask must drop. Queue: keys from
  an EMA target that differs from the online network. Temperature 0.5 keeps every
  negative's share of the softmax visible."""
  _configure(config, negatives)
  config.cmc.num_negatives = num_negatives
  config.cmc.temperature = 0.5
  config.head.out_dim = 6
  num_examples, temperature = 30, config.cmc.temperature
  model = _TinyNetwork()
  ctx = Context(model=model, config=config, axis_name='data',
                run=RunInfo(num_examples=num_examples, num_devices=8, total_steps=1))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(16, 4, 4, 3)).astype(np.float32)
  index = rng.permutation(num_examples)[:16].astype(np.int32)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), images)
  state = cmc.init_state(ctx, variables, jax.random.key(1))
  if negatives == 'queue':
    state['target'] = ema.init(init(jax.random.key(2), images))
  key = jax.random.key(3)

  def replica(variables, state, images, index):
    out = cmc.loss(ctx, variables['params'], {'batch_stats': variables['batch_stats']}, state,
                   Batch(views=(images,), index=index), key)
    (_, anchors), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    keys = anchors
    if negatives == 'queue':
      (_, keys), _ = ema.forward(model, state['target'], images)
    return out.loss, out.metrics, anchors, keys

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  specs = (P(), cmc.state_specs(config), P('data'), P('data'))
  step = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=specs,
                               out_specs=(P(), P(), P('data'), P('data'))))

  def run(state):
    loss, per_view, anchors, keys = jax.device_get(step(variables, state, images, index))
    return loss, per_view, dict(zip(VIEWS, anchors)), dict(zip(VIEWS, keys))

  loss, per_view, anchors, keys = run(state)
  if negatives == 'membank':
    # Each image's row in the other view's bank set to its anchor, as training
    # pulls them: the positives dominate, and so would the rows the mask drops.
    state = jax.tree.map(np.array, state)
    for view in VIEWS:
      state['bank'][CROSS[view]][index] = _normalized(anchors[view])
    loss, per_view, anchors, keys = run(state)

  def reference(pairing, masked=True, padding=False):
    """Each view's loss when its anchors meet ``pairing[view]``'s positives and
    negatives (``masked``: without the batch's own rows; ``padding``: the whole
    bank with its padding rows)."""
    values = {}
    for view in VIEWS:
      other = pairing[view]
      if negatives == 'queue':
        stored, rows = np.asarray(state['queue'][other]), None
        positives = keys[other]
      else:
        bank = np.asarray(state['bank'][other])
        assert bank.shape[0] == 32
        positives = bank[index]
        rows = (np.asarray(jax.random.randint(key, (num_negatives,), 0, num_examples))
                if num_negatives else np.arange(len(bank) if padding else num_examples))
        stored = bank[rows]
      mask = (np.ones((16, len(stored)), bool) if rows is None or not masked
              else rows[None, :] != index[:, None])
      values[view] = _reference(anchors[view], positives, stored, mask, temperature)
    return values

  want = reference(CROSS)
  if negatives == 'membank' and num_negatives:
    assert np.sum(np.isin(jax.random.randint(key, (num_negatives,), 0, num_examples),
                          index)) >= 5            # the mask has rows to drop
  # float32 on 8 devices against float64: unit vectors, logits up to 1 / T = 2, a
  # log-sum-exp over at most 48 terms. tests/tolerances.py's scaled bounds hold
  # that rounding with room to spare, and are far tighter than what a wrong
  # pairing, a missing mask or a dropped negative changes (checked below).
  tolerances.assert_close(loss, want['l'] + want['ab'])
  for view in VIEWS:
    tolerances.assert_close(per_view[f'{view}_loss'], want[view])
  same_view = reference({view: view for view in VIEWS})
  assert abs(same_view['l'] + same_view['ab'] - loss) > 100 * tolerances.SCALE * loss
  if negatives == 'membank':
    unmasked = reference(CROSS, masked=False)['l']
    assert abs(unmasked - want['l']) > 100 * tolerances.SCALE * want['l']
  if negatives == 'membank' and not num_negatives:
    padded = reference(CROSS, padding=True)['l']
    assert abs(padded - want['l']) > 100 * tolerances.SCALE * want['l']


# ----------------------------------------------------------------------- network


def test_encode_is_the_two_encoders_features_concatenated(config):
  """Lab of the RGB input, L / 50 - 1 into one half-width ResNet (1 input channel)
  and (a, b) / 110 into the other (2 channels); features L's then ab's."""
  _configure(config)
  model = cmc.METHOD.build_model(config)
  images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  variables = _random_variables(model, images)
  params, stats = variables['params'], variables['batch_stats']
  backbone = cmc.METHOD.backbone(config)
  features = np.asarray(jax.jit(functools.partial(backbone.apply, train=False))(
      cmc.METHOD.backbone_variables(params, {'batch_stats': stats}), images))

  resnet = model.encoder.view_encoder()
  assert resnet.width == config.model.width / 2
  lab = np.asarray(augment.rgb_to_lab(images))
  inputs = {'l': lab[..., :1] / 50 - 1, 'ab': lab[..., 1:] / 110}
  apply = jax.jit(functools.partial(resnet.apply, train=False))
  parts = [np.asarray(apply({'params': params['encoder'][view],
                             'batch_stats': stats['encoder'][view]}, inputs[view]))
           for view in VIEWS]
  assert features.shape == (4, model.encoder.num_features) == (4, 2 * parts[0].shape[1])
  np.testing.assert_allclose(features, np.concatenate(parts, axis=1), rtol=1e-5, atol=1e-6)
  assert not np.allclose(parts[0], parts[1])
  for view, channels in (('l', 1), ('ab', 2)):
    kernel = params['encoder'][view]['stem_conv']['kernel']
    assert kernel.shape[2:] == (channels, int(64 * config.model.width / 2))
    assert params['head'][view]['Dense_0']['kernel'].shape[0] == resnet.num_features


def _random_variables(module, images):
  """Variables of ``module`` with random values, BatchNorm far from the identity;
  shapes from ``eval_shape`` and values from numpy, so nothing is compiled."""
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                          images)
  rng = np.random.default_rng(1)

  def value(path, leaf):
    kind = path[-1].key
    if kind == 'kernel':                     # He initialisation
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    if kind in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.2, leaf.shape)    # bias, mean

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: value(path, leaf).astype(np.float32), shapes)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize('fields,message', [
    ({'cmc.temperature': 0.0}, r'config\.cmc\.temperature=0\.0 must be > 0'),
    ({'cmc.negatives': 'bank'}, r"config\.cmc\.negatives='bank'; valid: membank, queue"),
    ({'cmc.num_negatives': -1}, r'config\.cmc\.num_negatives=-1 must be >= 0'),
    ({'cmc.bank_momentum': 1.0}, r'config\.cmc\.bank_momentum=1\.0 must lie in \[0, 1\)'),
    ({'cmc.negatives': 'queue', 'cmc.momentum': 1.5},
     r'config\.cmc\.momentum=1\.5 must lie in \[0, 1\]'),
    ({'cmc.negatives': 'queue', 'cmc.queue_size': 40},
     r'config\.cmc\.queue_size=40 must be a positive multiple of .* batch 16; try 32'),
    ({'aug.mean': (0.5, 0.5, 0.5), 'aug.std': (0.2, 0.2, 0.2)},
     r'config\.aug\.mean=\(0\.5, 0\.5, 0\.5\): CMC converts RGB'),
], ids=lambda value: ','.join(value) if isinstance(value, dict) else 'refused')
def test_bad_values_are_refused_by_name(config, fields, message):
  _configure(config)
  for field, value in fields.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.check_config(config, cmc.METHOD)


def test_negatives_beyond_the_split_are_refused(config):
  _configure(config)
  train.check_config(config, cmc.METHOD)      # the test config itself is fine
  run = RunInfo(num_examples=48, num_devices=8, total_steps=1)
  assert cmc.check_run(config, run) == []
  config.cmc.num_negatives = 48
  assert 'config.cmc.num_negatives=48 is not smaller' in cmc.check_run(config, run)[0]
  config.cmc.negatives, config.cmc.queue_size = 'queue', 64
  assert 'config.cmc.queue_size=64 is larger' in cmc.check_run(config, run)[0]


def test_the_cifar10_recipe_passes_the_method_checks_in_both_modes():
  from configs import cmc_cifar10  # pylint: disable=import-outside-toplevel
  recipe = cmc_cifar10.get_config()
  assert cmc.check_config(recipe) == []
  recipe.cmc.negatives = 'queue'
  assert cmc.check_config(recipe) == []


# --------------------------------------------------------------- resume and export


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


@functools.cache
def _saved_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'default'))


@pytest.fixture(scope='module', name='runs')
def fixture_runs(tmp_path_factory):
  """The workdirs of an uninterrupted tiny CMC run with MoCo-style queues (8
  devices), and of the same run killed at step 5 and restarted with the same
  command: it resumes from the checkpoint of step 4."""
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = _configure(tiny_config(), 'queue')
  config.checkpoint_every_steps = 4
  config.eval.online_probe = False           # the trainer's own; it would add a compile
  straight = str(tmp_path_factory.mktemp('straight'))
  resumed = str(tmp_path_factory.mktemp('resumed'))
  train.train_and_evaluate(config, straight)
  monkeypatch = pytest.MonkeyPatch()
  with faults.killed_at_step(monkeypatch, in_memory_data.InMemoryTrainData, 5):
    train.train_and_evaluate(config, resumed)
  assert set(_losses(resumed)) == {1, 2, 3, 4, 5}
  train.train_and_evaluate(config, resumed)
  return straight, resumed


def test_a_killed_run_resumes_to_the_uninterrupted_one(runs):
  """The losses, both views' queues, their pointer and the EMA target (the key
  encoders) of a run killed mid-way and restarted are the uninterrupted run's.
  The memory banks are split arrays in the same checkpoint, as the queues are;
  one mode keeps this test's three runs affordable."""
  straight, resumed = runs
  expected, got = _losses(straight), _losses(resumed)
  assert sorted(got) == sorted(expected) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  want, again = (_saved_state(workdir, 8)['method_state'] for workdir in runs)
  assert set(want['queue']) == set(VIEWS)
  assert int(want['queue_pointer']) == int(again['queue_pointer']) == 8 * 16 % 48
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               again, want)


def test_export_and_downstream_give_the_trained_features(runs, tmp_path):
  """The workdir's encoder through reader.load_pretrained, the Flax file and
  downstream's backbone loader gives the method's own features of the saved
  state; the torchvision and detectron2 dicts hold each view's ResNet under its
  prefix, with 1 and 2 input channels."""
  workdir = runs[0]
  pretrained = reader.load_pretrained(workdir)
  assert isinstance(pretrained.encoder, lab_split.LabSplitEncoder)
  assert pretrained.encoder.bn_axis_name is None
  state = _saved_state(workdir, 8)
  backbone = cmc.METHOD.backbone(pretrained.config)
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  expected = np.asarray(jax.jit(functools.partial(backbone.apply, train=False))(
      cmc.METHOD.backbone_variables(state['params'], state['model_state']),
      augment.preprocess_eval(images, pretrained.config.aug)))
  features = reader.encode(pretrained, images, batch_size=8)
  assert features.shape == (8, pretrained.encoder.num_features)
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

  # Equal modules hash alike: one compilation serves the three loaders.
  apply = jax.jit(lambda module, variables, x: module.apply(variables, x, train=False),
                  static_argnums=0)
  pixels = images / np.float32(255)
  path = str(tmp_path / 'cmc.msgpack')
  export.export_flax(workdir, path)
  module, variables = export.load_flax_encoder(path)
  jax.tree.map(np.testing.assert_array_equal, variables['params'],
               state['params']['encoder'])
  np.testing.assert_allclose(apply(module, variables, pixels), expected, rtol=1e-5,
                             atol=1e-5)

  settings = config_lib.downstream_config()
  settings.pretrained = workdir
  backbone = downstream.load_backbone(settings, pretrained)
  np.testing.assert_allclose(apply(backbone.module, backbone.variables, pixels), expected,
                             rtol=1e-5, atol=1e-5)

  path = str(tmp_path / 'cmc.safetensors')
  export.export_torchvision(workdir, path)
  with safetensors.safe_open(path, 'np') as f:
    lab = json.loads(f.metadata()['input'])['lab']
  assert (lab['offset'], lab['scale']) == ([50, 0, 0], [50, 110, 110])
  torch_state = safetensors_numpy.load_file(path)
  jax.tree.map(np.testing.assert_array_equal, torch_state,
               torch_resnet.torchvision_state_dict(pretrained))
  single = torch_resnet.torchvision_state_dict(pretrained._replace(
      encoder=pretrained.encoder.view_encoder(),
      variables={c: tree['ab'] for c, tree in pretrained.variables.items()}))
  for view, channels in (('l', 1), ('ab', 2)):
    names = {name[len(view) + 1:] for name in torch_state if name.startswith(f'{view}.')}
    assert names == set(single)
    assert torch_state[f'{view}.conv1.weight'].shape == (2, channels, 3, 3)   # OIHW
  assert len(torch_state) == 2 * len(single)
  for name, value in single.items():
    np.testing.assert_array_equal(torch_state[f'ab.{name}'], value)

  with pytest.raises(ValueError, match='stem'):    # detectron2 has no CIFAR stem
    torch_resnet.detectron2_state_dict(pretrained)
  detectron2 = torch_resnet.detectron2_state_dict(_imagenet_stem(pretrained))
  assert detectron2['l.stem.conv1.weight'].shape == (2, 1, 7, 7)
  assert detectron2['ab.stem.conv1.weight'].shape == (2, 2, 7, 7)
  assert detectron2['ab.res5.0.shortcut.norm.running_var'].shape == (16,)
  assert {name.split('.')[0] for name in detectron2} == set(VIEWS)
  assert len(detectron2) == len([n for n in torch_state if 'num_batches_tracked' not in n])


def _imagenet_stem(pretrained):
  """The run's encoder with the ImageNet stem, and random variables for it."""
  config = pretrained.config.copy_and_resolve_references()
  config.model.stem = 'imagenet'
  encoder = lab_split.build_encoder(config.model).clone(bn_axis_name=None)
  variables = _random_variables(encoder, np.zeros((1, 16, 16, 3), np.float32))
  return pretrained._replace(config=config, encoder=encoder, variables=variables)
