"""Every experiment file loads, names its run command, and fits the schema."""

import importlib
import os

import pytest

from contrastive import config as config_lib
from contrastive import models
from contrastive.methods import METHODS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'configs')
PRETRAINING = sorted(
    name[:-3] for name in os.listdir(CONFIG_DIR)
    if name.endswith('.py')
    and not name.startswith(('linear_eval', 'finetune', 'negatives_study', '__')))


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


def test_negatives_study_plans_one_run_per_mechanism_and_count():
  from configs import negatives_study  # pylint: disable=import-outside-toplevel
  from contrastive.studies import negatives  # pylint: disable=import-outside-toplevel
  config = negatives_study.get_config()
  runs = negatives.planned_runs(config)
  assert [(r['method'], r['negatives'], r['batch_size']) for r in runs] == [
      ('simclr', 62, 32), ('simclr', 254, 128), ('simclr', 1022, 512),
      ('membank', 256, 128), ('membank', 1024, 128), ('membank', 4096, 128),
      ('moco', 256, 128), ('moco', 1024, 128), ('moco', 4096, 128)]
  for run in runs:        # everything else is shared
    assert _keys(run['config']) == _keys(config_lib.base_config())
    assert run['config'].model.to_dict() == config.base.model.to_dict()
    assert run['config'].num_epochs == config.base.num_epochs
    assert run['config'].method == run['method']
  assert runs[7]['config'].moco.queue_size == 1024
  assert runs[3]['config'].membank.num_negatives == 256
  assert {r['config'].simclr.temperature for r in runs} == {config.temperature}
