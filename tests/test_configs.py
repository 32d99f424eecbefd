"""Every experiment file loads, names its run command, and fits the schema."""

import importlib
import os
import re
import subprocess
import sys

import pytest

from contrastive import config as config_lib
from contrastive import config_checks
from contrastive import models
from contrastive import train
from contrastive.methods import METHODS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'configs')
PRETRAINING = sorted(
    name[:-3] for name in os.listdir(CONFIG_DIR)
    if name.endswith('.py')
    and not name.startswith(('linear_eval', 'finetune', 'negatives_study', 'methods_study',
                                 '__')))
DOWNSTREAM = sorted(name[:-3] for name in os.listdir(CONFIG_DIR)
                    if name.startswith(('linear_eval', 'finetune')) and name.endswith('.py'))


def _keys(tree, prefix=''):
  keys = set()
  for key, value in tree.items():
    if hasattr(value, 'items'):
      keys |= _keys(value, f'{prefix}{key}.')
    else:
      keys.add(prefix + key)
  return keys


@pytest.mark.parametrize('name', PRETRAINING)
def test_pretraining_config_loads_and_fits_the_schema(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  for arg in (None, *getattr(module, 'ARGS', ())):
    config = module.get_config(arg)
    assert _keys(config) == _keys(config_lib.base_config())
    assert config.method in METHODS
    models.build_model(config.model, config.head)          # names and modes are valid
    if config.method == 'moco':
      assert config.moco.queue_size % config.global_batch_size == 0
    assert config_checks.pretraining_problems(config) == []
    train.check_config(config, METHODS[config.method])     # its section and views too


def test_moco_recipes():
  from configs import moco_v1_imagenet, moco_v2_cifar10, moco_v2_imagenet  # pylint: disable=import-outside-toplevel
  v1, v2 = moco_v1_imagenet.get_config(), moco_v2_imagenet.get_config()
  assert (v1.moco.queue_size, v1.moco.temperature, v1.head.num_layers) == (65536, 0.07, 1)
  assert (v2.moco.temperature, v2.head.num_layers, v2.aug.blur_prob) == (0.2, 2, 0.5)
  assert v1.optim.decay_epochs == (120.0, 160.0) and v2.optim.schedule == 'cosine'
  cifar = moco_v2_cifar10.get_config('symmetric')
  assert cifar.moco.symmetric and (cifar.moco.queue_size, cifar.moco.momentum) == (4096, 0.99)
  with pytest.raises(ValueError, match='valid arguments: symmetric'):
    moco_v2_cifar10.get_config('symetric')


def test_byol_and_moco_v3_recipes():
  from configs import byol_cifar10, byol_imagenet, moco_v3_cifar10, moco_v3_imagenet  # pylint: disable=import-outside-toplevel
  byol = byol_imagenet.get_config()
  assert (byol.aug.blur_prob, byol.aug2.blur_prob) == (1.0, 0.1)
  assert (byol.aug.solarize_prob, byol.aug2.solarize_prob) == (0.0, 0.2)
  assert (byol.byol.momentum, byol.byol.momentum_schedule) == (0.996, 'cosine')
  assert (byol.optim.name, byol.optim.base_lr, byol.optim.weight_decay) == ('lars', 0.2, 1.5e-6)
  assert (byol.global_batch_size, byol.head.hidden_dim, byol.head.out_dim) == (4096, 4096, 256)
  assert not byol.head.output_bn and byol.predictor.hidden_dim == 4096
  solo = byol_cifar10.get_config()
  assert (solo.optim.base_lr, solo.optim.trust_coefficient, solo.byol.momentum) == (1.0, 0.02, 0.99)
  v3 = moco_v3_imagenet.get_config('1000')
  assert (v3.moco_v3.temperature, v3.moco_v3.momentum, v3.optim.base_lr) == (1.0, 0.996, 0.3)
  assert moco_v3_imagenet.get_config().optim.base_lr == 0.6 and v3.head.output_bn
  assert moco_v3_cifar10.get_config().moco_v3.temperature == 0.2


def test_negatives_study_plans_one_run_per_mechanism_and_count():
  from configs import negatives_study  # pylint: disable=import-outside-toplevel
  from contrastive.studies import negatives  # pylint: disable=import-outside-toplevel
  config = negatives_study.get_config()
  runs = negatives.planned_runs(config)
  assert [(r['method'], r['negatives'], r['batch_size']) for r in runs] == [
      ('simclr', 62, 32), ('simclr', 254, 128), ('simclr', 1022, 512),
      ('membank', 256, 128), ('membank', 1024, 128), ('membank', 4096, 128),
      ('moco', 256, 128), ('moco', 1024, 128), ('moco', 4096, 128),
      ('instance_cls', None, 128), ('instance_cls', None, 128),
      ('instance_cls', None, 128), ('instance_cls', None, 128)]
  assert [(r['config'].instance_cls.contrastive_prior, r['config'].instance_cls.smoothing)
          for r in runs[9:]] == [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)]
  assert len({r['name'] for r in runs}) == len(runs)     # one directory each
  for run in runs:        # everything else is shared
    assert _keys(run['config']) == _keys(config_lib.base_config())
    assert run['config'].model.to_dict() == config.base.model.to_dict()
    assert run['config'].num_epochs == config.base.num_epochs
    assert run['config'].method == run['method']
  assert config_checks.pretraining_problems(config.base) == [
      "config.data.path=''; data.source='folder' needs the image folder"]
  config.base.data.path = '/data/cifar10/train'        # as its run command gives it
  for run in negatives.planned_runs(config):
    config_checks.validate_pretraining(run['config'])
  assert runs[7]['config'].moco.queue_size == 1024
  assert runs[3]['config'].membank.num_negatives == 256
  assert {r['config'].simclr.temperature for r in runs} == {config.temperature}
  assert {r['config'].instance_cls.temperature for r in runs} == {config.temperature}


@pytest.mark.parametrize('name', DOWNSTREAM)
def test_downstream_config_loads_fits_the_schema_and_validates(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__
  assert module.downstream_config is config_lib.downstream_config
  for arg in (None, *getattr(module, 'ARGS', ())):
    config = module.get_config(arg)
    assert _keys(config) == _keys(config_lib.downstream_config())
    assert config.mode in config_checks.DOWNSTREAM_MODES
    assert config_checks.downstream_problems(config) == [        # given on the command line
        "config.pretrained=''; must be the workdir of a pretraining run"]
    config.pretrained = '/tmp/quickstart'
    config_checks.validate_downstream(config)


def test_the_tiny_test_config_validates(config):
  assert config_checks.pretraining_problems(config) == []
  config_checks.validate_pretraining(config, extra=[])


# (fields set on the tiny test config (digits, 50 held out per class, eval off),
#  the one problem expected)
BROKEN_PRETRAINING = [
    ({'optim.name': 'lamb'}, "config.optim.name='lamb'; valid: lars, sgd, adamw"),
    ({'optim.lr_scaling': 'log'}, "config.optim.lr_scaling='log'; valid: linear, sqrt, none"),
    ({'optim.schedule': 'linear'}, "config.optim.schedule='linear'; valid: cosine, steps"),
    ({'model.name': 'resnet51'}, "config.model.name='resnet51'; valid: resnet10, resnet18,"),
    ({'model.stem': 'tiny'}, "config.model.stem='tiny'; valid: imagenet, cifar"),
    ({'model.bn': 'sync'}, "config.model.bn='sync'; valid: global, local"),
    ({'head.num_layers': 4}, 'config.head.num_layers=4; valid: 1, 2, 3'),
    ({'data.source': 'hdf5'}, "config.data.source='hdf5'; valid: digits, tfds, folder"),
    ({'global_batch_size': 0}, 'config.global_batch_size=0; must be > 0'),
    ({'num_epochs': -1.0}, 'config.num_epochs=-1.0; must be >= 0'),
    ({'log_every_steps': 0}, 'config.log_every_steps=0; must be >= 1'),
    ({'keep_checkpoints': 0}, 'config.keep_checkpoints=0; must be >= 1'),
    ({'skip_nonfinite_steps': -1}, 'config.skip_nonfinite_steps=-1; must be >= 0'),
    ({'model.width': 0.0}, 'config.model.width=0.0; must be > 0'),
    ({'model.bn_momentum': 1.0}, 'config.model.bn_momentum=1.0; must be in [0, 1)'),
    ({'head.out_dim': 0}, 'config.head.out_dim=0; must be >= 1'),
    ({'head.hidden_dim': -1}, 'config.head.hidden_dim=-1; must be >= 0'),
    ({'data.image_size': 0}, 'config.data.image_size=0; must be >= 1'),
    ({'data.eval_crop_fraction': 1.5}, 'config.data.eval_crop_fraction=1.5; must be in (0, 1]'),
    ({'data.holdout_per_class': -1}, 'config.data.holdout_per_class=-1; must be >= 0'),
    ({'optim.base_lr': -0.1}, 'config.optim.base_lr=-0.1; must be >= 0'),
    ({'optim.momentum': 1.0}, 'config.optim.momentum=1.0; must be in [0, 1)'),
    ({'optim.weight_decay': -1e-4}, 'config.optim.weight_decay=-0.0001; must be >= 0'),
    ({'optim.decay_epochs': (80.0, 60.0)}, 'config.optim.decay_epochs=(80.0, 60.0); must be'),
    ({'optim.decay_epochs': (-1.0,)}, 'config.optim.decay_epochs=(-1.0,); must be epochs >= 0'),
    ({'optim.decay_factor': 0.0}, 'config.optim.decay_factor=0.0; must be > 0'),
    ({'eval.batch_size': 0}, 'config.eval.batch_size=0; must be > 0'),
    ({'eval.knn_k': 0}, 'config.eval.knn_k=0; must be >= 1'),
    ({'eval.knn_temperature': 0.0}, 'config.eval.knn_temperature=0.0; must be > 0'),
    ({'eval.knn_every_epochs': -1.0}, 'config.eval.knn_every_epochs=-1.0; must be >= 0'),
    ({'aug.flip_prob': 1.5}, 'config.aug.flip_prob=1.5; must be in [0, 1]'),
    ({'aug.solarize_prob': -0.2}, 'config.aug.solarize_prob=-0.2; must be in [0, 1]'),
    ({'aug.saturation': -0.4}, 'config.aug.saturation=-0.4; must be >= 0'),
    ({'aug.hue': 0.6}, 'config.aug.hue=0.6; must be in [0, 0.5]'),
    ({'aug.crop_area': (0.5, 0.2)}, 'config.aug.crop_area=(0.5, 0.2); must be a pair '
     '0 < lo <= hi <= 1'),
    ({'aug.crop_area': (0.5,)}, 'config.aug.crop_area=(0.5,); must be a pair'),
    ({'aug.crop_aspect': (0.0, 1.0)}, 'config.aug.crop_aspect=(0.0, 1.0); must be a pair '
     '0 < lo <= hi'),
    ({'aug.blur_sigma': (2.0, 0.1, 3.0)}, 'config.aug.blur_sigma=(2.0, 0.1, 3.0); must be a pair'),
    ({'aug.mean': (0.5, 0.5, 0.5)}, 'config.aug.std=None; set together with config.aug.mean='),
    ({'aug.mean': (0.5, 0.5, 0.5), 'aug.std': (0.2, 0.0, 0.2)},
     'config.aug.std=(0.2, 0.0, 0.2); must be 3 numbers > 0'),
    ({'aug.mean': (0.5, 0.5), 'aug.std': (0.2, 0.2, 0.2)},
     'config.aug.mean=(0.5, 0.5); must be 3 numbers'),
    ({'data.source': 'folder'}, "config.data.path=''; data.source='folder' needs the image"),
    ({'data.in_memory': False}, "config.data.in_memory=False; data.source='digits' is "
     'in-memory only'),
    ({'data.eval_path': '/val', 'data.holdout_per_class': 0},
     "config.data.eval_path='/val'; only data.source='folder' reads it, not "
     "data.source='digits'"),
    ({'data.source': 'folder', 'data.path': '/train', 'data.eval_path': '/val'},
     "config.data.eval_path='/val'; not together with data.holdout_per_class=50"),
    ({'data.holdout_per_class': 0, 'eval.enabled': True},
     'config.data.holdout_per_class=0; config.eval.enabled=True needs an eval split'),
    ({'data.holdout_per_class': 0, 'eval.knn_every_epochs': 1.0},
     'config.data.holdout_per_class=0; config.eval.knn_every_epochs=1.0 needs an eval split'),
    ({'data.source': 'folder', 'data.path': '/train', 'data.holdout_per_class': 0,
      'eval.enabled': True}, 'data.holdout_per_class > 0 or data.eval_path'),
]


def _override(config, fields):
  for path, value in fields.items():
    *sections, name = path.split('.')
    section = config
    for key in sections:
      section = section[key]
    section[name] = value
  return config


@pytest.mark.parametrize('fields,expected', BROKEN_PRETRAINING,
                         ids=[' '.join(fields) for fields, _ in BROKEN_PRETRAINING])
def test_a_broken_pretraining_field_is_named_with_its_value(config, fields, expected):
  _override(config, fields)
  with pytest.raises(ValueError, match=re.escape(expected)) as error:
    config_checks.validate_pretraining(config)
  assert '\n' not in str(error.value)                  # that one problem, nothing else
  assert config_checks.pretraining_problems(config) == [str(error.value)]


def test_the_evaluation_split_of_folder_runs():
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  config = _override(quickstart.get_config(), {
      'data.source': 'folder', 'data.path': '/train', 'data.holdout_per_class': 0,
      'data.eval_path': '/val', 'eval.enabled': True})
  config_checks.validate_pretraining(config)                # a separate eval folder
  config.data.eval_path = ''
  config.eval.enabled = False
  config_checks.validate_pretraining(config)                # no evaluation, no eval split


def _downstream_config():
  from configs import linear_eval_moco  # pylint: disable=import-outside-toplevel
  config = linear_eval_moco.get_config()
  config.pretrained = '/tmp/quickstart'
  return config


BROKEN_DOWNSTREAM = [
    ({'pretrained': ''}, "config.pretrained=''; must be the workdir of a pretraining run"),
    ({'mode': 'frozen'}, "config.mode='frozen'; valid: linear, finetune"),
    ({'label_fraction': 0.0}, 'config.label_fraction=0.0; must be in (0, 1]'),
    ({'label_fraction': 1.5}, 'config.label_fraction=1.5; must be in (0, 1]'),
    ({'global_batch_size': -8}, 'config.global_batch_size=-8; must be > 0'),
    ({'eval_batch_size': 0}, 'config.eval_batch_size=0; must be > 0'),
    ({'checkpoint_every_steps': 0}, 'config.checkpoint_every_steps=0; must be >= 1'),
    ({'aug.crop_area': (0.0, 1.0)}, 'config.aug.crop_area=(0.0, 1.0); must be a pair'),
    ({'aug.crop_aspect': (4 / 3, 3 / 4)}, 'config.aug.crop_aspect=(1.33'),
    ({'aug.flip_prob': -0.1}, 'config.aug.flip_prob=-0.1; must be in [0, 1]'),
    ({'optim.name': 'lamb'}, "config.optim.name='lamb'; valid: lars, sgd, adamw"),
    ({'optim.decay_epochs': (80.0, 60.0)}, 'config.optim.decay_epochs=(80.0, 60.0)'),
    ({'data.source': 'hdf5'}, "config.data.source='hdf5'; valid: digits, tfds, folder"),
    ({'data.image_size': 0}, 'config.data.image_size=0; must be >= 1'),
    ({'data.eval_crop_fraction': 0.0}, 'config.data.eval_crop_fraction=0.0; must be in (0, 1]'),
    ({'data.source': 'digits', 'data.in_memory': False},
     "config.data.in_memory=False; data.source='digits' is in-memory only"),
    ({'data.source': 'folder', 'data.path': ''}, "config.data.path=''; data.source='folder'"),
    ({'data.source': 'digits', 'data.holdout_per_class': 0, 'data.eval_path': ''},
     'config.data.holdout_per_class=0; the downstream evaluation needs an eval split'),
]


@pytest.mark.parametrize('fields,expected', BROKEN_DOWNSTREAM,
                         ids=[' '.join(fields) for fields, _ in BROKEN_DOWNSTREAM])
def test_a_broken_downstream_field_is_named_with_its_value(fields, expected):
  config = _override(_downstream_config(), fields)
  with pytest.raises(ValueError, match=re.escape(expected)) as error:
    config_checks.validate_downstream(config)
  assert '\n' not in str(error.value)
  assert config_checks.downstream_problems(config) == [str(error.value)]


def test_downstream_data_left_unset_is_the_pretraining_runs_and_not_checked():
  config = _override(_downstream_config(), {'data.source': 'folder'})  # data.path inherited
  config_checks.validate_downstream(config)
  assert all(value is None for value in _downstream_config().data.values())


def test_every_problem_is_listed_in_one_error_with_the_callers_own(config):
  _override(config, {'optim.name': 'lamb', 'global_batch_size': 0, 'aug.hue': 0.7,
                     'model.stem': 'tiny', 'data.in_memory': False})
  method_problems = ["config.moco.key_bn='shufle'; valid: shuffle, global, local"]
  with pytest.raises(ValueError) as error:
    config_checks.validate_pretraining(config, extra=method_problems)
  assert str(error.value).splitlines() == [
      '6 problems in the config:',
      '  config.global_batch_size=0; must be > 0',
      "  config.model.stem='tiny'; valid: imagenet, cifar",
      "  config.data.in_memory=False; data.source='digits' is in-memory only: set "
      'data.in_memory=True',
      '  config.aug.hue=0.7; must be in [0, 0.5]',
      "  config.optim.name='lamb'; valid: lars, sgd, adamw",
      "  config.moco.key_bn='shufle'; valid: shuffle, global, local"]
  _override(config, {'optim.name': 'sgd', 'global_batch_size': 16, 'aug.hue': 0.1,
                     'model.stem': 'cifar', 'data.in_memory': True})
  with pytest.raises(ValueError, match=r"^config.moco.key_bn='shufle'"):
    config_checks.validate_pretraining(config, extra=method_problems)  # one: no header
  config_checks.validate_pretraining(config)
  config_checks.raise_if([])


def test_check_augmentation_names_the_view_it_checks():
  from contrastive.data import augment_config  # pylint: disable=import-outside-toplevel
  for version in (1, 2):
    assert config_checks.check_augmentation(augment_config.moco_augment_config(version), 'view1') == []
  view = augment_config.simclr_augment_config()
  view.blur_sigma = (0.0, 2.0)
  view.grayscale_prob = 2.0
  assert config_checks.check_augmentation(view, 'moco.key_aug') == [
      'config.moco.key_aug.grayscale_prob=2.0; must be in [0, 1]',
      'config.moco.key_aug.blur_sigma=(0.0, 2.0); must be a pair 0 < lo <= hi']


def test_validation_needs_neither_tensorflow_nor_data():
  code = ('import sys\n'
          'from configs import simclr_cifar10\n'
          'from contrastive import config_checks\n'
          'cfg = simclr_cifar10.get_config()\n'
          "cfg.optim.name = 'lamb'\n"
          'try:\n'
          '  config_checks.validate_pretraining(cfg)\n'
          'except ValueError as err:\n'
          '  print(err)\n'
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
  result = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(CONFIG_DIR),
                          capture_output=True, text=True, check=True, timeout=120)
  assert result.stdout == "config.optim.name='lamb'; valid: lars, sgd, adamw\n"


def test_negatives_study_checks_every_run_before_training_any(tmp_path):
  from configs import negatives_study  # pylint: disable=import-outside-toplevel
  from contrastive.studies import negatives  # pylint: disable=import-outside-toplevel
  config = negatives_study.get_config()
  config.base.data.path = str(tmp_path)
  config.moco_queue_sizes = (256, 1000)       # the last run's queue: not x 128
  with pytest.raises(ValueError, match=r'config.moco.queue_size=1000 must be a positive'):
    negatives.run_study(config, str(tmp_path / 'study'))
  assert not os.path.exists(tmp_path / 'study')     # no run started


def test_methods_study_applies_one_budget_to_every_recipe():
  from configs import methods_study  # pylint: disable=import-outside-toplevel
  from contrastive.studies import methods  # pylint: disable=import-outside-toplevel
  config = methods_study.get_config()
  config.budget.data_path = '/data/cifar10'
  runs = {recipe: methods.run_config(recipe, config.budget) for _, recipe in config.runs}
  assert {run.method for run in runs.values()} == {'simclr', 'moco', 'byol', 'moco_v3',
                                                    'cmc', 'cpc', 'amdim'}
  for recipe, run in runs.items():
    assert (run.global_batch_size, run.num_epochs, run.model.width) == (128, 5.0, 0.125)
    assert (run.data.path, run.data.holdout_per_class) == ('/data/cifar10', 500), recipe
    assert run.optim.warmup_epochs <= 0.5 and run.eval.knn_every_epochs == 1.0
    for field in methods.QUEUE_FIELDS:
      section, key = field.split('.')
      assert run[section][key] <= 4096
    train.check_config(run, METHODS[run.method])
  # The recipes stay their own: BYOL keeps its asymmetric views, SimCLR v2 its queue.
  assert runs['byol_cifar10'].aug2.solarize_prob == 0.2
  assert runs['simclr_v2_cifar10'].simclr.queue_size > 0
  assert runs['cpc_cifar10'].model.norm == 'layer'
