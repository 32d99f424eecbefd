"""Downstream evaluation of a pretrained encoder: linear, fine-tune, resume, errors."""

import importlib
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import linear_eval_moco
from contrastive import config as config_lib
from contrastive import config_checks
from contrastive import downstream
from contrastive import export
from contrastive import metrics
from contrastive import reader
from contrastive.data import in_memory
from contrastive.formats import torch_resnet
from contrastive.models import heads
from tests import faults
from tests import tolerances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(pretrained: str, **overrides):
  """MoCo's linear protocol shrunk to a few steps on 10% of the digits' labels."""
  config = linear_eval_moco.get_config()
  config.pretrained = pretrained
  config.label_fraction = 0.1              # 130 images
  config.global_batch_size = 32
  config.num_epochs = 2.0                  # 8 steps
  config.eval_batch_size = 256             # 500 eval images: the last batch is padded
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.aug.flip_prob = 0.0
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


@pytest.fixture(scope='module')
def linear_run(pretrained_workdir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('linear'))
  config = _config(pretrained_workdir)
  return config, workdir, downstream.train_and_evaluate(config, workdir)


def _losses(workdir):
  return {step: record['loss'] for step, record in metrics.read_metrics(workdir).items()
          if 'loss' in record}


def _restore_final_state(workdir, step=None):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  step = manager.latest_step() if step is None else step
  state = manager.restore(step, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                manager.item_metadata(step).tree)))
  manager.close()
  return state


def _trees_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_linear_evaluation_end_to_end(linear_run, pretrained_workdir):
  _, workdir, results = linear_run
  for k in (1, 5):
    assert 0.0 <= results[f'top{k}_accuracy'] <= 1.0
  assert results['top5_accuracy'] >= results['top1_accuracy']
  assert results['num_eval_images'] == 500
  assert results['num_train_images'] == 130
  assert results['backbone_unchanged'] is True
  with open(os.path.join(workdir, 'downstream.json')) as f:
    assert json.load(f) == results
  final = metrics.read_metrics(workdir)[results['steps']]
  assert final['eval/top1_accuracy'] == pytest.approx(results['top1_accuracy'])
  # The checkpointed BN statistics are still the pretrained ones.
  pretrained = reader.load_pretrained(pretrained_workdir)
  assert _trees_equal(_restore_final_state(workdir)['model_state']['batch_stats'],
                      pretrained.variables['batch_stats'])


def test_backbone_check_sees_one_changed_value(pretrained_workdir):
  variables = reader.load_pretrained(pretrained_workdir).variables
  downstream._check_backbone_unchanged(variables, jax.tree.map(np.copy, variables))
  changed = jax.tree.map(np.copy, variables)
  leaf = jax.tree.leaves(changed['batch_stats'])[0]
  leaf.flat[0] = np.nextafter(leaf.flat[0], np.inf)
  with pytest.raises(RuntimeError, match='backbone changed'):
    downstream._check_backbone_unchanged(variables, changed)


def test_killed_run_resumes_from_its_checkpoint(linear_run, tmp_path, monkeypatch, capsys):
  config, straight_workdir, results = linear_run
  expected = _losses(straight_workdir)
  workdir = str(tmp_path / 'resumed')
  with faults.killed_at_step(monkeypatch, in_memory.LabelledTrainData, 5):
    downstream.train_and_evaluate(config, workdir)
  assert set(_losses(workdir)) == {1, 2, 3, 4, 5}
  resumed_results = downstream.train_and_evaluate(config, workdir)   # the same call again
  assert 'Resuming from the checkpoint of step 4' in capsys.readouterr().out
  resumed = _losses(workdir)
  assert sorted(resumed) == sorted(expected)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [expected[s] for s in sorted(expected)], rtol=1e-6)
  assert resumed_results['top1_accuracy'] == pytest.approx(results['top1_accuracy'])


def test_finetune_trains_the_backbone(pretrained_workdir, tmp_path):
  config = _config(pretrained_workdir, mode='finetune', num_epochs=1.0)
  config.optim.base_lr = 0.5
  config.optim.schedule = 'cosine'
  results = downstream.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results['top1_accuracy'] <= results['top5_accuracy'] <= 1.0
  assert 'backbone_unchanged' not in results
  state = _restore_final_state(str(tmp_path))
  pretrained = reader.load_pretrained(pretrained_workdir)
  for collection, trained in (('params', state['params']['encoder']),
                              ('batch_stats', state['model_state']['batch_stats'])):
    before = jax.tree.leaves(pretrained.variables[collection])
    after = jax.tree.leaves(trained)
    assert len(before) == len(after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(before) // 2


def test_label_subset_is_class_balanced_and_deterministic():
  labels = np.repeat(np.arange(3), [100, 50, 3])
  subset = downstream.label_subset(labels, 0.1, seed=0)
  assert np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [5, 5, 3])   # 0.1 * 153 / 3
  np.testing.assert_array_equal(subset, downstream.label_subset(labels, 0.1, seed=0))
  assert not np.array_equal(subset, downstream.label_subset(labels, 0.1, seed=1))
  # 1%: still at least one image of every class.
  np.testing.assert_array_equal(
      np.bincount(labels[downstream.label_subset(labels, 0.01)]), [1, 1, 1])
  np.testing.assert_array_equal(downstream.label_subset(labels, 1.0), np.arange(153))
  with pytest.raises(ValueError, match='label_fraction'):
    downstream.label_subset(labels, 0.0)


def test_missing_pretrained_names_the_field(tmp_path):
  config = _config('')
  with pytest.raises(ValueError, match='config.pretrained is empty'):
    downstream.train_and_evaluate(config, str(tmp_path / 'a'))
  config.pretrained = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='config.pretrained=.*nowhere'):
    downstream.train_and_evaluate(config, str(tmp_path / 'b'))


def test_command_line_error_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'contrastive.downstream',
       '--config=' + os.path.join(REPO, 'configs', 'linear_eval_moco.py'),
       '--workdir=' + str(tmp_path)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), check=False)
  assert result.returncode == 1
  assert result.stderr.startswith('error: config.pretrained is empty')


def test_top_k_accuracy():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
  labels = np.array([1, 2, 0])
  assert downstream.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert downstream.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert downstream.top_k_accuracy(logits, labels, 5) == 1.0    # k capped at 3 classes


def test_restarted_run_keeps_its_pretrained_step(tmp_path):
  """A resumed run reloads the backbone it started with, not a newer checkpoint."""

  class Manager:
    def __init__(self, latest):
      self.latest = latest

    def latest_step(self):
      return self.latest

  config = _config(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'pretrained_step': 3}))
  assert downstream._pretrained_step(config, Manager(latest=5), str(tmp_path)) == 3
  assert downstream._pretrained_step(config, Manager(latest=None), str(tmp_path)) is None
  config.pretrained_step = 7
  assert downstream._pretrained_step(config, Manager(latest=5), str(tmp_path)) == 7


@pytest.mark.parametrize('name', ['linear_eval_moco', 'linear_eval_simclr', 'finetune_semi',
                                  'finetune_simclr_v2'])
def test_config_files_fit_the_schema(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  schema = config_lib.downstream_config().to_dict()
  for arg in (None, *getattr(module, 'ARGS', ())):
    config = module.get_config(arg)
    assert config.to_dict().keys() == schema.keys()
    assert config.optim.to_dict().keys() == schema['optim'].keys()
    assert config.mode in config_checks.DOWNSTREAM_MODES


def test_protocol_recipes():
  from configs import finetune_semi, finetune_simclr_v2, linear_eval_simclr  # pylint: disable=import-outside-toplevel
  moco = linear_eval_moco.get_config().optim
  assert (moco.base_lr, moco.momentum, moco.nesterov, moco.weight_decay, moco.schedule,
          moco.decay_epochs) == (30.0, 0.9, False, 0.0, 'steps', (60.0, 80.0))
  simclr = linear_eval_simclr.get_config()
  assert (simclr.optim.base_lr, simclr.optim.nesterov, simclr.optim.schedule,
          simclr.num_epochs) == (0.1, True, 'cosine', 100.0)
  assert linear_eval_simclr.get_config('imagenet').num_epochs == 90.0
  for arg, fraction, epochs in (('1', 0.01, 60.0), ('10', 0.1, 30.0)):
    semi = finetune_semi.get_config(arg)
    assert (semi.mode, semi.label_fraction, semi.num_epochs) == ('finetune', fraction, epochs)
  with pytest.raises(ValueError, match='label percentage'):
    finetune_semi.get_config('5')
  for arg, fraction, epochs in (('1', 0.01, 60.0), ('10', 0.1, 30.0)):
    v2 = finetune_simclr_v2.get_config(arg)
    assert (v2.mode, v2.head_layers, v2.label_fraction, v2.num_epochs) == (
        'finetune', 1, fraction, epochs)
    assert (v2.optim.name, v2.optim.base_lr, v2.optim.lr_scaling, v2.optim.weight_decay,
            v2.optim.warmup_epochs) == ('lars', 0.005, 'sqrt', 0.0, 0.0)
  with pytest.raises(ValueError, match='label percentage'):
    finetune_simclr_v2.get_config('100')


# ----------------------------------------------------------------------------- head layers
# The fixture's head has num_layers=2: one hidden layer, Dense_0 -> BatchNorm_0 -> ReLU.

def test_kept_head_layer_is_the_pretrained_head_first_layer(pretrained_workdir):
  """Against the pretraining checkpoint's own arrays, BN in inference mode."""
  pretrained = reader.load_pretrained(pretrained_workdir)
  backbone = downstream.load_backbone(_config(pretrained_workdir, head_layers=1), pretrained)
  saved = _restore_final_state(pretrained_workdir)
  assert set(backbone.variables['params']['head']) == {'Dense_0', 'BatchNorm_0'}
  images = np.random.default_rng(0).uniform(size=(6, 16, 16, 3)).astype(np.float32)
  features, got = jax.jit(lambda encoder_variables, variables: (
      pretrained.encoder.apply(encoder_variables, images, train=False),
      backbone.module.apply(variables, images, train=False)))(pretrained.variables,
                                                              backbone.variables)
  dense, bn = saved['params']['head']['Dense_0'], saved['params']['head']['BatchNorm_0']
  stats = saved['model_state']['batch_stats']['head']['BatchNorm_0']
  assert 'bias' not in dense                       # use_bn: the Dense has no bias
  x = np.asarray(features) @ dense['kernel']
  expected = np.maximum((x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * bn['scale']
                        + bn['bias'], 0)
  assert got.shape == expected.shape == (6, backbone.num_features)
  assert np.mean(expected > 0) > 0.1                # the ReLU passes something
  tolerances.assert_close(got, expected)


def test_export_with_the_head_layer_gives_the_downstream_backbone(pretrained_workdir, tmp_path):
  """``--head_layers=1``: the flax file computes the same features as the
  downstream backbone, and the torchvision dict's ``head.0`` (Linear) and
  ``head.1`` (BatchNorm1d), applied as torch would, give them from the
  encoder's features; detectron2 refuses."""
  backbone = downstream.load_backbone(_config(pretrained_workdir, head_layers=1),
                                      reader.load_pretrained(pretrained_workdir))
  export.export_flax(pretrained_workdir, str(tmp_path / 'v2.msgpack'), head_layers=1)
  module, variables = export.load_flax_encoder(str(tmp_path / 'v2.msgpack'))
  images = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  want = np.asarray(backbone.module.apply(backbone.variables, images, train=False))
  np.testing.assert_array_equal(module.apply(variables, images, train=False), want)

  pretrained = reader.load_pretrained(pretrained_workdir, head_layers=1)
  state = torch_resnet.torchvision_state_dict(pretrained)
  features = np.asarray(pretrained.encoder.encoder.apply(
      {c: v['encoder'] for c, v in pretrained.variables.items()}, images, train=False))
  x = features @ state['head.0.weight'].T                      # torch Linear: x W^T
  x = ((x - state['head.1.running_mean']) / np.sqrt(state['head.1.running_var'] + 1e-5)
       * state['head.1.weight'] + state['head.1.bias'])
  tolerances.assert_close(np.maximum(x, 0), want)
  assert {'conv1.weight', 'bn1.running_var'} <= set(state)      # the backbone is there too
  with pytest.raises(ValueError, match='--head_layers: detectron2'):
    torch_resnet.detectron2_state_dict(pretrained)


def _save_pretraining_arrays(workdir, step, head_params):
  """A checkpoint with only what :func:`contrastive.reader.read_head_layers` looks at."""
  manager = ocp.CheckpointManager(str(workdir / 'checkpoints'),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  manager.save(step, args=ocp.args.PyTreeSave({
      'params': {'encoder': {'w': np.ones(2)}, 'head': head_params},
      'batch_stats': {'encoder': {'mean': np.zeros(2)}}}))
  manager.wait_until_finished()
  manager.close()


def test_head_layers_read_without_bn_and_refused_without_one_head(tmp_path):
  """A head without BN (MoCo v2's) has biases and no statistics to read; one head
  per view (CMC's) has no single head to keep layers of."""
  head = heads.ProjectionHead(num_layers=3, hidden_dim=8, out_dim=4, use_bn=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), x, train=False))['params']
  head_params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  _save_pretraining_arrays(tmp_path, 3, head_params)
  variables = reader.read_head_layers(str(tmp_path), 3, 2)
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'Dense_0', 'Dense_1'}
  y = x
  for name in ('Dense_0', 'Dense_1'):
    y = np.maximum(y @ head_params[name]['kernel'] + head_params[name]['bias'], 0)
  got = heads.hidden_layers(head, 2).apply(variables, x, train=False)
  tolerances.assert_close(got, y)

  _save_pretraining_arrays(tmp_path, 4, {'l': head_params, 'ab': head_params})
  with pytest.raises(ValueError, match=r'config\.head_layers=1; .* no Dense_0 under '
                                       r'params\["head"\]: it holds one projection head '
                                       r'per view \(ab, l\)'):
    reader.read_head_layers(str(tmp_path), 4, 1)


def test_linear_from_head_layer_freezes_it_and_trains_the_classifier(pretrained_workdir,
                                                                    tmp_path):
  config = _config(pretrained_workdir, head_layers=1, num_epochs=1.0)   # 4 steps
  results = downstream.train_and_evaluate(config, str(tmp_path))
  assert results['backbone_unchanged'] is True and results['head_layers'] == 1
  pretrained = reader.load_pretrained(pretrained_workdir)
  backbone = downstream.load_backbone(config, pretrained)
  before, after = _restore_final_state(str(tmp_path), 2), _restore_final_state(str(tmp_path))
  assert set(after['params']) == {'classifier'}
  assert _trees_equal(after['model_state']['batch_stats'], backbone.variables['batch_stats'])
  assert set(after['model_state']['batch_stats']) == {'encoder', 'head'}
  assert not np.array_equal(before['params']['classifier']['kernel'],
                            after['params']['classifier']['kernel'])


def test_backbone_check_covers_the_head_layers(pretrained_workdir):
  config = _config(pretrained_workdir, head_layers=1)
  variables = downstream.load_backbone(config, reader.load_pretrained(pretrained_workdir)
                                       ).variables
  for collection in ('params', 'batch_stats'):
    changed = jax.tree.map(np.copy, variables)
    leaf = changed[collection]['head']['BatchNorm_0']['scale' if collection == 'params'
                                                      else 'var']
    leaf.flat[0] = np.nextafter(leaf.flat[0], np.inf)
    with pytest.raises(RuntimeError, match='backbone changed'):
      downstream._check_backbone_unchanged(variables, changed)


def test_finetune_from_head_layer_trains_it(pretrained_workdir, tmp_path):
  config = _config(pretrained_workdir, mode='finetune', head_layers=1, num_epochs=0.5)
  config.optim.base_lr = 0.5
  downstream.train_and_evaluate(config, str(tmp_path))
  state = _restore_final_state(str(tmp_path))
  backbone = downstream.load_backbone(config, reader.load_pretrained(pretrained_workdir))
  trained = {'params': state['params']['encoder'],
             'batch_stats': state['model_state']['batch_stats']}
  for collection in ('params', 'batch_stats'):
    before, after = backbone.variables[collection], trained[collection]
    assert jax.tree.structure(before) == jax.tree.structure(after)
    moved = {part: [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]),
                                                             jax.tree.leaves(after[part]))]
             for part in ('encoder', 'head')}
    assert sum(moved['encoder']) > len(moved['encoder']) // 2, collection
    assert all(moved['head']), collection


def test_head_layers_beyond_the_runs_head_name_the_field(pretrained_workdir, tmp_path):
  with pytest.raises(ValueError, match=r'config\.head_layers=2; .*\(head\.num_layers=2\) has '
                                       r'1 hidden layer\(s\): valid 0 to 1'):
    downstream.train_and_evaluate(_config(pretrained_workdir, head_layers=2), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.head_layers=1; .*\(head\.num_layers=1\) has '
                                       'no hidden layer'):
    reader.check_head_layers(1, ml_collections.ConfigDict({'num_layers': 1}))
  for value in (3, -1):
    with pytest.raises(ValueError, match=rf'config\.head_layers={value}; valid: 0, 1, 2'):
      config_checks.validate_downstream(_config(pretrained_workdir, head_layers=value))


def test_data_fields_a_pretraining_run_predates_take_their_defaults():
  """A pretraining workdir saved before a data field existed still serves: the
  field takes today's default, a set downstream field still wins."""
  from contrastive import config as config_lib  # pylint: disable=import-outside-toplevel
  saved = config_lib.base_config().data.to_dict()
  del saved['prefetch']
  saved['image_size'] = 32
  overrides = config_lib.downstream_config().data
  overrides.eval_crop_fraction = 1.0
  data = downstream._resolve_data(overrides, ml_collections.ConfigDict(saved))
  assert data.prefetch == config_lib.base_config().data.prefetch
  assert data.image_size == 32 and data.eval_crop_fraction == 1.0
